"""Seed the sandbox account with what procedure.md starts from.

A VPC on loopback, a key pair, security groups, a classic ELB `prepan` (or an
application load balancer `prepan`, its listener and its target group
`prepan-app`), and instances `app-1` and `app-2` provisioned and serving `v1`
behind it, all made
through boto3 against the moto server and paramiko against the instances'
SSH servers, the way the release engine will. Every step looks before it
creates, so a second start changes nothing; once the ELB exists the
environment belongs to its releases and is never re-seeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from .. import aws, recipe, ssh
from ..errors import AdapterError
from .demo_recipe import RECIPE
from .timings import FAST, Timings

log = logging.getLogger("sandbox.seed")


class SeedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    environment: str
    network: str  # the VPC's CIDR
    subnet: str  # this environment's part of it
    ssh_port: int
    ssh_user: str
    app_port: int
    health_path: str
    instance_type: str
    key_file: Path
    host_keys_dir: Path  # instances/<id>/ssh_host_ed25519_key.pub
    repository: str
    revision: str
    seed_count: int = 2
    name_prefix: str = "app-"
    load_balancer: str = "classic"  # or "alb": an application load balancer and a target group
    timings: Timings = FAST  # the load balancer's settings come from here
    patience: float = 30  # seconds to wait for a new instance to boot and answer SSH
    jump: ssh.Target | None = None  # the bastion the instances are reached through, if any

    @property
    def target_group_name(self) -> str:
        return f"{self.environment}-app"


def _by_name(items: list[dict], name: str) -> dict | None:
    for item in items:
        if {"Key": "Name", "Value": name} in item.get("Tags", []):
            return item
    return None


def ensure_key_file(path: Path) -> str:
    """The sandbox key pair's private key, made once and kept under var/."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        path.touch(mode=0o600)
        path.write_bytes(key.export_private_key("openssh"))
    return path.read_text()


def ensure_account(ec2, plan: Plan) -> dict:
    """Network, key pair and security groups; returns their ids."""
    name = f"greenlight-sandbox-{plan.environment}"
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": [name]}])["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
    else:
        vpc_id = ec2.create_vpc(
            CidrBlock=plan.network,
            TagSpecifications=[{"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": name}]}],
        )["Vpc"]["VpcId"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    subnet_id = subnets[0]["SubnetId"] if subnets else ec2.create_subnet(VpcId=vpc_id, CidrBlock=plan.subnet)["Subnet"]["SubnetId"]

    key_name = plan.environment
    public_key = asyncssh.import_private_key(ensure_key_file(plan.key_file)).export_public_key().decode()
    if not ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [key_name]}])["KeyPairs"]:
        ec2.import_key_pair(KeyName=key_name, PublicKeyMaterial=public_key)

    def group(group_name: str, description: str, rules: list[dict]) -> str:
        found = ec2.describe_security_groups(
            Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [group_name]}]
        )["SecurityGroups"]
        if found:
            return found[0]["GroupId"]
        group_id = ec2.create_security_group(GroupName=group_name, Description=description, VpcId=vpc_id)["GroupId"]
        if rules:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=rules)
        return group_id

    def tcp(port: int, cidr: str) -> dict:
        return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": cidr}]}

    app_sg = group(
        f"{plan.environment}-app",
        "app servers: the load balancer and the deploy worker",
        [tcp(plan.app_port, plan.network), tcp(plan.ssh_port, "127.0.0.0/8")],
    )
    verify_sg = group(f"{plan.environment}-verify", "temporary access for direct verification", [])
    images = ec2.describe_images(
        Owners=["amazon"],
        Filters=[{"Name": "name", "Values": ["amzn2-ami-hvm-*-x86_64-gp2"]}],
    )["Images"]
    if not images:
        raise SeedError("the moto server lists no Amazon Linux 2 image to use as the base AMI")
    base_ami = max(images, key=lambda image: image.get("CreationDate", ""))["ImageId"]
    return {
        "vpc_id": vpc_id,
        "subnet_id": subnet_id,
        "key_name": key_name,
        "app_security_group_id": app_sg,
        "verify_security_group_id": verify_sg,
        "base_ami": base_ami,
    }


def ensure_instance_profile(iam, plan: Plan) -> str:
    """An IAM instance profile for the environment's instances, so that an
    environment can name one (RunInstances refuses a profile that does not
    exist). Made on every start: the sandbox keeps no IAM state across restarts."""
    name = f"{plan.environment}-app"
    try:
        iam.get_instance_profile(InstanceProfileName=name)
    except iam.exceptions.NoSuchEntityException:
        iam.create_instance_profile(InstanceProfileName=name)
    return name


def target_for(instance: dict, plan: Plan) -> ssh.Target:
    host_key = plan.host_keys_dir / instance["InstanceId"] / "ssh_host_ed25519_key.pub"
    return ssh.Target(
        host=instance["PrivateIpAddress"],
        port=plan.ssh_port,
        user=plan.ssh_user,
        private_key=plan.key_file.read_text(),
        host_key=host_key.read_text().strip() if host_key.exists() else "",
        jump=plan.jump,
    )


def wait_for_ssh(target: ssh.Target, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ssh.run(target, "true", timeout=10)
            return
        except AdapterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def apply(target: ssh.Target, phases: list[str], values: dict) -> None:
    """Run the demo recipe's phases on one host, stopping at the first failure."""
    for phase in phases:
        for command in recipe.render(RECIPE, phase, values):
            lines: list[str] = []
            result = ssh.run(
                target,
                command.text,
                timeout=120,
                on_line=lambda stream, text: lines.append(f"{stream}: {text}"),
            )
            for line in lines:
                log.debug("%s %s %s", values["name"], command.task, line)
            if not result.ok:
                tail = "\n".join(lines[-10:])
                raise SeedError(f"{command.task} failed on {values['name']} (exit {result.exit_status}):\n{tail}")


def ensure_environment(
    account: aws.Account,
    plan: Plan,
    wait_until_routable: Callable[[set[str]], None],
) -> dict:
    ec2 = aws.client(account, "ec2")
    ids = {**ensure_account(ec2, plan), "instance_profile": ensure_instance_profile(aws.client(account, "iam"), plan)}
    seeded = _seeded_alb(aws.client(account, "elbv2"), plan) if plan.load_balancer == "alb" else _seeded_classic(aws.client(account, "elb"), plan)
    if seeded is not None:
        log.info("environment %s is already seeded", plan.environment)
        registered, lb_ids = seeded
        running = ec2.describe_instances(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}],
            InstanceIds=registered,
        )["Reservations"] if registered else []
        try:  # a restart: give the services the boot script started time to answer
            wait_until_routable({i["InstanceId"] for r in running for i in r["Instances"]})
        except SeedError as exc:
            log.warning("%s; starting anyway", exc)
        return {**ids, **lb_ids}

    instances = [(name, _launch(ec2, plan, ids, name)) for name in (f"{plan.name_prefix}{n}" for n in range(1, plan.seed_count + 1))]
    with ThreadPoolExecutor(max_workers=len(instances) or 1) as pool:  # hosts are independent, as on AWS
        list(pool.map(lambda pair: _provision(plan, *pair), instances))
    instance_ids = [instance["InstanceId"] for _, instance in instances]
    if plan.load_balancer == "alb":
        lb_ids = _create_alb(aws.client(account, "elbv2"), plan, ids, instance_ids)
    else:
        lb_ids = _create_classic(aws.client(account, "elb"), plan, ids, instance_ids)
    wait_until_routable(set(instance_ids))
    return {**ids, **lb_ids}


def _launch(ec2, plan: Plan, ids: dict, name: str) -> dict:
    live = ec2.describe_instances(
        Filters=[
            {"Name": "tag:Name", "Values": [name]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )["Reservations"]
    if live:
        return live[0]["Instances"][0]
    instance = ec2.run_instances(
        ImageId=ids["base_ami"],
        InstanceType=plan.instance_type,
        KeyName=ids["key_name"],
        SubnetId=ids["subnet_id"],
        SecurityGroupIds=[ids["app_security_group_id"], ids["verify_security_group_id"]],
        MinCount=1,
        MaxCount=1,
        ClientToken=f"greenlight-sandbox-{plan.environment}-{name}",
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [{"Key": "Name", "Value": name}, {"Key": aws.TAG_ENVIRONMENT, "Value": plan.environment}],
            }
        ],
    )["Instances"][0]
    log.info("launched %s as %s at %s", name, instance["InstanceId"], instance["PrivateIpAddress"])
    return instance


def _provision(plan: Plan, name: str, instance: dict) -> None:
    deadline = time.monotonic() + plan.patience
    while not (plan.host_keys_dir / instance["InstanceId"] / "ssh_host_ed25519_key.pub").exists():
        if time.monotonic() > deadline:
            raise SeedError(f"{name} did not boot within {plan.patience:g}s")
        time.sleep(0.1)
    target = target_for(instance, plan)
    wait_for_ssh(target, plan.patience)
    apply(
        target,
        ["provision", "deploy"],
        {
            "host": target.host,
            "instance_id": instance["InstanceId"],
            "name": name,
            "ssh_user": plan.ssh_user,
            "ssh_port": plan.ssh_port,
            "ssh_key_file": str(plan.key_file),
            "revision": plan.revision,
            "repository": plan.repository,
            "app_port": plan.app_port,
            "environment": plan.environment,
        },
    )
    log.info("%s provisioned and serving %s", name, plan.revision)


# -- a classic ELB -------------------------------------------------------------------


def _seeded_classic(elb, plan: Plan) -> tuple[list[str], dict] | None:
    try:
        described = elb.describe_load_balancers(LoadBalancerNames=[plan.environment])
    except elb.exceptions.AccessPointNotFoundException:
        return None
    return [i["InstanceId"] for i in described["LoadBalancerDescriptions"][0]["Instances"]], {}


def _create_classic(elb, plan: Plan, ids: dict, instance_ids: list[str]) -> dict:
    timings = plan.timings
    elb.create_load_balancer(
        LoadBalancerName=plan.environment,
        Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstanceProtocol": "HTTP", "InstancePort": plan.app_port}],
        Subnets=[ids["subnet_id"]],
        SecurityGroups=[ids["app_security_group_id"]],
        Tags=[{"Key": aws.TAG_ENVIRONMENT, "Value": plan.environment}],
    )
    elb.configure_health_check(
        LoadBalancerName=plan.environment,
        HealthCheck={
            "Target": f"HTTP:{plan.app_port}{plan.health_path}",
            "Interval": int(timings.elb_health_interval),
            "Timeout": int(timings.elb_health_timeout),
            "UnhealthyThreshold": timings.elb_unhealthy_threshold,
            "HealthyThreshold": timings.elb_healthy_threshold,
        },
    )
    elb.modify_load_balancer_attributes(
        LoadBalancerName=plan.environment,
        LoadBalancerAttributes={"ConnectionDraining": {"Enabled": True, "Timeout": int(timings.connection_draining)}},
    )
    elb.register_instances_with_load_balancer(
        LoadBalancerName=plan.environment,
        Instances=[{"InstanceId": instance_id} for instance_id in instance_ids],
    )
    return {}


# -- an application load balancer and its target group -------------------------------


def _seeded_alb(elbv2, plan: Plan) -> tuple[list[str], dict] | None:
    try:
        lb = elbv2.describe_load_balancers(Names=[plan.environment])["LoadBalancers"][0]
        group = elbv2.describe_target_groups(Names=[plan.target_group_name])["TargetGroups"][0]
    except (elbv2.exceptions.LoadBalancerNotFoundException, elbv2.exceptions.TargetGroupNotFoundException):
        return None
    health = elbv2.describe_target_health(TargetGroupArn=group["TargetGroupArn"])["TargetHealthDescriptions"]
    registered = [t["Target"]["Id"] for t in health if t["TargetHealth"]["State"] != "draining"]
    return registered, {"load_balancer_arn": lb["LoadBalancerArn"], "target_group_arn": group["TargetGroupArn"]}


def _create_alb(elbv2, plan: Plan, ids: dict, instance_ids: list[str]) -> dict:
    """A target group first, so that a crash before the load balancer exists
    leaves nothing that looks seeded; the next start finds the group by name."""
    timings = plan.timings
    try:
        group = elbv2.describe_target_groups(Names=[plan.target_group_name])["TargetGroups"][0]
    except elbv2.exceptions.TargetGroupNotFoundException:
        group = elbv2.create_target_group(
            Name=plan.target_group_name,
            Protocol="HTTP",
            Port=plan.app_port,
            VpcId=ids["vpc_id"],
            TargetType="instance",
            HealthCheckProtocol="HTTP",
            HealthCheckPath=plan.health_path,
            HealthCheckIntervalSeconds=int(timings.target_health_interval),
            HealthCheckTimeoutSeconds=int(timings.target_health_timeout),
            HealthyThresholdCount=timings.target_healthy_threshold,
            UnhealthyThresholdCount=timings.target_unhealthy_threshold,
            Tags=[{"Key": aws.TAG_ENVIRONMENT, "Value": plan.environment}],
        )["TargetGroups"][0]
    arn = group["TargetGroupArn"]
    elbv2.modify_target_group_attributes(
        TargetGroupArn=arn,
        Attributes=[{"Key": "deregistration_delay.timeout_seconds", "Value": str(int(timings.deregistration_delay))}],
    )
    lb = elbv2.create_load_balancer(
        Name=plan.environment,
        Type="application",
        Scheme="internal",
        Subnets=[ids["subnet_id"]],
        SecurityGroups=[ids["app_security_group_id"]],
        Tags=[{"Key": aws.TAG_ENVIRONMENT, "Value": plan.environment}],
    )["LoadBalancers"][0]
    elbv2.create_listener(
        LoadBalancerArn=lb["LoadBalancerArn"],
        Protocol="HTTP",
        Port=80,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": arn}],
    )
    elbv2.register_targets(TargetGroupArn=arn, Targets=[{"Id": instance_id} for instance_id in instance_ids])
    return {"load_balancer_arn": lb["LoadBalancerArn"], "target_group_arn": arn}
