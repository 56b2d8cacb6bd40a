"""Preflight: every check a release of an environment depends on, before anything is made.

`run` asks AWS (reads, and DryRun calls that change nothing), the
repository (`git ls-remote`) and one instance of the current fleet (over
SSH: it answers, its host key is the pinned one, the recipe's user exists),
and returns one `Check` per thing asked: ok, warning or failed, with what to
do. It changes nothing: its cloud refuses every mutation before it is sent.

It runs where the releases run, on a worker: the workers' credentials, key
files and network are what a release will use (the web process asks a
worker; releases/tasks.py).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from django.conf import settings

from deployer import aws, git, ssh
from deployer.errors import AdapterError

from . import engine, identity, plan, steps
from .steps import StepFailed
from .models import Environment, Installation, Instance

OK, WARNING, FAILED = "ok", "warning", "failed"
POLICY = "docs/iam-policy.json"
SSH_TIMEOUT = 20  # seconds for the one command on a current instance


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warning or failed
    message: str
    fix: str = ""  # what to do, when it is not ok

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.status:<7} {self.name}: {self.message}" + (f" -- {self.fix}" if self.fix else "")


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == FAILED]


class _NoChanges(AdapterError):
    pass


def _refuse_mutation(action: str, resource: str) -> None:
    raise _NoChanges(f"preflight changes nothing, and was about to call {action} on {resource}")


def run(environment: Environment, *, revision: str = "", strategy: str = "") -> list[Check]:
    """Every check, in the order a release meets them. `revision` and
    `strategy`, when given, are the release's: its revision must exist and
    its image must be there."""
    values = plan.settings_of(environment)
    checks: list[Check] = []
    try:
        cloud = engine.cloud_for(values, before_mutation=_refuse_mutation)
    except AdapterError as exc:
        return [Check("credentials", FAILED, str(exc), "set the environment's credentials reference to one the workers have")]
    state: dict = {}
    for check in CHECKS:
        if check not in WITHOUT_AWS and checks and checks[0].name == "credentials" and checks[0].status == FAILED:
            continue  # AWS did not answer the first call: every other call would wait out its retries to say the same
        try:
            found = check(cloud, values, state, revision=revision, strategy=strategy)
        except AdapterError as exc:  # a check's own errors are its result; one check never stops the others
            found = Check(check.__name__.removeprefix("check_").replace("_", " "), FAILED, str(exc))
        checks.extend(found if isinstance(found, list) else [found])
    return checks


# -- the checks: each gets the cloud, the environment's settings and what earlier checks found ----------


def check_credentials(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    try:
        who = aws.caller_identity(cloud.account)
    except AdapterError as exc:
        return Check("credentials", FAILED, str(exc), "give the workers credentials (an instance role, a profile or "
                     "environment variables) and the environment a reference to them")
    return Check("credentials", OK, f"{who['Arn']} (account {who['Account']})")


def check_region(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    try:
        zones = cloud.zones()
    except AdapterError as exc:
        return Check("region", FAILED, f"{env['region']}: {exc}", "set the environment's region to the one its resources are in")
    if not zones:
        return Check("region", FAILED, f"{env['region']} has no available availability zone")
    return Check("region", OK, f"{env['region']}: {len(zones)} availability zones ({', '.join(zones[:6])})")


def check_load_balancer(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    kind = "classic load balancer" if env["load_balancer_name"] else "target group"
    name = env["load_balancer_name"] or env["target_group_arn"]
    fix = f"name an existing {kind} in {env['region']}" + (" (its ARN)" if not env["load_balancer_name"] else "")
    try:
        check = cloud.health_check()
        health = cloud.health()
        draining = cloud.draining_timeout()
    except AdapterError as exc:
        return Check("load balancer", FAILED, str(exc), fix)
    state["registered"] = list(health)
    state["in_service"] = [i for i, s in health.items() if s == "InService"]
    text = (f"{kind} {name}: health check every {check.interval:g}s, healthy after {check.healthy_threshold}; "
            f"draining {draining:g}s; {len(state['in_service'])} of {len(health)} registered instances in service")
    if not health:
        return Check("load balancer", WARNING, text, "nothing is registered: the first release puts its fleet in service")
    return Check("load balancer", OK, text)


def check_subnets(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    ids = [env["subnet_id"], *env.get("extra_subnet_ids", [])]
    missing, found = [], []
    for subnet in ids:  # one by one: AWS names only the first unknown id of a list
        try:
            found += cloud.subnets([subnet])
        except AdapterError as exc:
            if "NotFound" not in str(exc) and "Malformed" not in str(exc):
                return Check("subnets", FAILED, str(exc))
            missing.append(subnet)
    if missing:
        return Check("subnets", FAILED, f"no such subnet: {', '.join(missing)} (in {env['region']})",
                     "name subnets that exist in the environment's region and VPC")
    vpcs = sorted({s.get("VpcId", "") for s in found})
    state["vpcs"] = vpcs
    zones = ", ".join(f"{s['SubnetId']} ({s.get('AvailabilityZone', '?')}, {s.get('AvailableIpAddressCount', '?')} free)"
                      for s in found)
    if len(vpcs) > 1:
        return Check("subnets", FAILED, f"the subnets are in different VPCs ({', '.join(vpcs)}): {zones}",
                     "use subnets of one VPC, the security groups' own")
    return Check("subnets", OK, zones)


def check_security_groups(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    ids = list(dict.fromkeys([*env["security_group_ids"], env["verify_security_group_id"]]))
    missing, found = [], []
    for group in ids:
        try:
            found += cloud.security_groups([group])
        except AdapterError as exc:
            if "NotFound" not in str(exc) and "Malformed" not in str(exc) and "does not exist" not in str(exc):
                return Check("security groups", FAILED, str(exc))
            missing.append(group)
    if missing:
        return Check("security groups", FAILED, f"no such security group: {', '.join(missing)}",
                     "name security groups that exist in the subnets' VPC")
    other = [g["GroupId"] for g in found if state.get("vpcs") and g.get("VpcId") and g["VpcId"] not in state["vpcs"]]
    if other:
        return Check("security groups", FAILED, f"{', '.join(other)} not in the subnets' VPC ({', '.join(state['vpcs'])})",
                     "use security groups of the subnets' VPC")
    return Check("security groups", OK, ", ".join(f"{g['GroupId']} ({g.get('GroupName', '')})" for g in found))


def check_key_pair(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    try:
        pair = cloud.key_pair(env["key_name"])
    except AdapterError as exc:
        return Check("key pair", FAILED, f"no key pair {env['key_name']!r} in {env['region']} ({exc})",
                     "import the public key as an EC2 key pair of that name, or name an existing one")
    return Check("key pair", OK, f"{pair['KeyName']} ({pair.get('KeyFingerprint', 'no fingerprint')})")


def check_key_file(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    path = env["ssh_key_file"]
    fix = f"put the key pair's private key at {path} on every worker, readable by the worker's user only"
    try:
        text = Path(path).read_text()
    except OSError as exc:
        return Check("key file", FAILED, f"cannot read the SSH key file {path}: {exc.strerror}", fix)
    try:
        key = ssh.load_private_key(text)
    except AdapterError as exc:
        return Check("key file", FAILED, f"{path}: {exc}", fix)
    state["private_key"] = text
    return Check("key file", OK, f"{path}: {key.get_name()} key, readable on this worker")


def check_images(cloud: aws.Cloud, env: dict, state: dict, *, strategy: str = "", **_) -> list[Check]:
    checks = []
    wanted = {"bake": "base_ami", "deploy_from_image": "last_baked_ami"}.get(strategy)
    for field, what in (("base_ami", "base image"), ("last_baked_ami", "last baked image")):
        image_id = env[field]
        needed = field == wanted or (not wanted and field == "base_ami")
        if not image_id:
            if needed:
                checks.append(Check(what, FAILED, "none yet", "run a bake release first"))
            continue
        image = cloud.image(image_id)
        if image is None or image.get("State") != "available":
            status = FAILED if needed else WARNING
            checks.append(Check(what, status, f"{image_id} is {image.get('State') if image else 'not found'} in {env['region']}",
                                f"set the environment's {field.replace('_', ' ')} to an available image of this region"))
            continue
        if field == "last_baked_ami":
            state["baked"] = image
        checks.append(Check(what, OK, f"{image_id} ({image.get('Name', '')}), available"))
    return checks


def check_instance_profile(cloud: aws.Cloud, env: dict, state: dict, **_) -> list[Check]:
    if not env.get("instance_profile"):
        return []
    try:
        profile = aws.instance_profile(cloud.account, env["instance_profile"])
    except AdapterError as exc:
        return [Check("instance profile", FAILED, str(exc), "create the instance profile, or empty the setting")]
    if not profile["roles"]:
        return [Check("instance profile", WARNING, f"{profile['name']} holds no role", "add the instances' role to it")]
    return [Check("instance profile", OK, f"{profile['name']} (role {', '.join(profile['roles'])})")]


def check_permissions(cloud: aws.Cloud, env: dict, state: dict, **_) -> list[Check]:
    """DryRun=True for each EC2 change a release makes. A change about an
    instance is asked about one of the current fleet, as the policy's tag
    conditions judge it; with no fleet yet, it waits for the first release."""
    # tagged as a release's canary is: the policy's conditions on request tags judge the DryRun as they would the launch
    fake = identity.Identity(env["name"], 0, "00000000-0000-0000-0000-000000000000", Installation.current_id())
    image = env["last_baked_ami"] if state.get("baked") else env["base_ami"]
    launch = cloud.launch_request(
        image_id=image, instance_type=env["instance_type"], key_name=env["key_name"], subnet_id=env["subnet_id"],
        security_group_ids=[*env["security_group_ids"], env["verify_security_group_id"]],
        tags={"Name": f"{env['name_prefix']}preflight", **fake.tags(), **fake.instance("canary")},
        options=steps.launch_options({**plan.FROZEN_DEFAULTS, **env}))
    rule = {"GroupId": env["verify_security_group_id"], "IpPermissions": [{
        "IpProtocol": "tcp", "FromPort": env["app_port"], "ToPort": env["app_port"], "IpRanges": [{"CidrIp": env["verify_cidr"]}]}]}
    asked: list[tuple[str, dict, str]] = [("RunInstances", launch, f"from {image}"),
                                          ("AuthorizeSecurityGroupIngress", rule, f"on {env['verify_security_group_id']}"),
                                          ("RevokeSecurityGroupIngress", rule, f"on {env['verify_security_group_id']}")]
    current = (state.get("in_service") or state.get("registered") or [None])[0]
    about = ("CreateImage", "StopInstances", "StartInstances", "TerminateInstances")
    if current:
        asked += [("CreateImage", {"InstanceId": current, "Name": "greenlight-preflight"}, f"of {current}")]
        asked += [(action, {"InstanceIds": [current]}, f"on {current}") for action in about[1:]]
    if baked := state.get("baked"):
        asked.append(("DeregisterImage", {"ImageId": baked["ImageId"]}, f"on {baked['ImageId']}"))
        asked += [("DeleteSnapshot", {"SnapshotId": snapshot}, f"on {snapshot}") for snapshot in cloud.image_snapshots(baked)[:1]]
    checks = []
    for action, params, on in asked:
        refusal = cloud.permitted(action, **params)
        if not refusal:
            checks.append(Check(f"may {action}", OK, f"DryRun {on}: allowed"))
        elif "UnauthorizedOperation" in refusal or "AccessDenied" in refusal:
            checks.append(Check(f"may {action}", FAILED, f"AWS refused {action} {on}: {refusal}",
                                f"allow ec2:{action} to the workers' role ({POLICY})"
                                + (f"; its condition needs {current} tagged {aws.TAG_RELEASE}" if action in about else "")))
        else:
            checks.append(Check(f"may {action}", FAILED, f"DryRun {on}: {refusal}", "fix what AWS names above"))
    if not current:
        checks.append(Check("may change instances", WARNING, f"no current instance to ask {', '.join(about)} about",
                            "the first release finds out; docs/iam-policy.json lists what it needs"))
    return checks


def check_repository(cloud: aws.Cloud, env: dict, state: dict, *, revision: str = "", **_) -> Check:
    fix = "make the repository readable from the workers (a deploy key, a token), or correct its URL"
    shown = git.shown(env["repository"])  # a token in its URL is never part of a check's message
    try:
        refs = git.revisions(env["repository"], allow_file=settings.ALLOW_FILE_REPOSITORIES)
    except AdapterError as exc:
        return Check("repository", FAILED, str(exc), fix)
    listed = f"{len(refs['branches'])} branches ({', '.join(refs['branches'][:3])}), {len(refs['tags'])} tags" + (
        f" (latest listed: {', '.join(refs['tags'][-3:])})" if refs["tags"] else "")
    if not refs["branches"] and not refs["tags"]:
        return Check("repository", FAILED, f"{shown} lists no branch or tag", fix)
    if revision:
        try:
            found = git.resolve(env["repository"], revision, allow_file=settings.ALLOW_FILE_REPOSITORIES)
        except AdapterError as exc:
            return Check("repository", FAILED, str(exc), fix)
        if found is None:
            return Check("repository", FAILED, f"{shown} has no branch or tag {revision!r}; it lists {listed}",
                         "push the revision, or choose one it lists")
        return Check("repository", OK, f"{revision} is {found[:12]}; {listed}")
    return Check("repository", OK, f"{shown}: {listed}")


def check_ssh(cloud: aws.Cloud, env: dict, state: dict, **_) -> Check:
    current = (state.get("in_service") or state.get("registered") or [None])[0]
    if current is None:
        return Check("ssh", WARNING, "no instance is registered with the load balancer to try",
                     "the first release's launch step finds out whether new instances answer")
    if "private_key" not in state:
        return Check("ssh", FAILED, f"not tried on {current}: the key file cannot be read")
    [info] = cloud.instances(ids=[current]) or [None]
    if info is None:
        return Check("ssh", FAILED, f"{current} is registered with the load balancer but EC2 does not list it")
    pinned = (Instance.objects.filter(instance_id=current).exclude(host_key="").order_by("-created_at")
              .values_list("host_key", flat=True).first() or "")
    address, user, name = info.address(env["address"]), env["ssh_user"], info.name or current
    try:
        jump = steps.bastion(env)
    except StepFailed as exc:
        return Check("ssh", FAILED, f"not tried on {current}: {exc}")
    target = ssh.Target(host=address, port=env["ssh_port"], user=user, private_key=state["private_key"], host_key=pinned,
                        jump=jump)
    try:
        result = ssh.run(target, f"id -u -- {shlex.quote(user)}", timeout=SSH_TIMEOUT)
    except AdapterError as exc:
        fix = ("the instance's key changed, or something else answers at its address: find out which before a release "
               "trusts it") if "host key" in str(exc) else (
            f"let the workers reach {address}:{env['ssh_port']} (security group, route, bastion) as {user} with the key file")
        return Check("ssh", FAILED, f"{name} ({current}): {exc}", fix)
    if not result.ok:
        return Check("ssh", FAILED, f"{name} ({current}) answers, but has no user {user!r} (id -u exit {result.exit_status})",
                     "set the environment's SSH user to the image's login user (ec2-user, ubuntu, admin...)")
    where = f"{user}@{address}:{env['ssh_port']} ({name})"
    if not pinned:
        return Check("ssh", WARNING, f"{where} answers, user {user} exists; no host key of {current} is pinned, "
                     f"it presented {result.host_key.split()[0]} {result.host_key.split()[1][:16]}...",
                     "compare it with the instance's console output; instances Greenlight launches are pinned for you")
    return Check("ssh", OK, f"{where} answers with its pinned host key; user {user} exists")


CHECKS: tuple[Callable, ...] = (
    check_credentials, check_region, check_load_balancer, check_subnets, check_security_groups, check_key_pair,
    check_key_file, check_images, check_instance_profile, check_permissions, check_repository, check_ssh,
)
WITHOUT_AWS = (check_credentials, check_key_file, check_repository)
