"""What each step of a release does, through the AWS and SSH adapters.

Every step runs many times. A worker can die between doing something and
recording it, and a step that waits on AWS does not sleep: it raises `Wait`
(what it waits for, how long it may take) and the engine frees the worker,
then runs the step again from the top when its timer is due. So each step
first looks at what is already done -- the instances by their release and
slot tags, the image by its name, the load balancer's registrations -- does
only what is missing, and logs what it did, not what it found.

Durations that come from AWS (instance states, images, SSH coming up, health
checks, draining) are multiplied by the environment's `time_scale`: 1 on
AWS, smaller for a sandbox that plays AWS's timings faster.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from deployer import aws, local, recipe, ssh
from deployer.errors import AdapterError, Cancelled as CommandCancelled

from . import identity as naming
from .logs import LogWriter
from .models import Environment, Instance, Release, Step
from .plan import CANCEL_ENDS_AT, FROZEN_DEFAULTS, LIMIT_DEFAULTS

SSH_WORKERS = 8
CHECK_WORKERS = 16
IN_SERVICE_MARGIN = 120  # AWS seconds beyond interval x healthy threshold: registration takes a while to reach the checks
DRAINING_MARGIN = 60  # AWS seconds beyond the draining timeout before giving up on a target still draining
MAX_DRAINING = 3600  # AWS's own ceiling for connection draining and deregistration delay
IMAGE_VISIBLE = 60  # AWS seconds a new image may take to be listed (EC2 is eventually consistent)
ERROR_LINE = 400  # characters of a command's output quoted in a step's error (the log has the whole line)
UP = ("pending", "running")
NEW = (Instance.Role.CANARY, Instance.Role.CLONE)


class StepFailed(Exception):
    """The step cannot succeed; the message says why, for the person reading it."""


class Cancelled(Exception):
    pass


class LeaseLost(Exception):
    """This worker no longer holds the step: it was paused or cut off past its
    lease and another worker runs the step now. The step stops where it is,
    quietly; the engine records nothing."""


class Lease:
    """A worker's hold on the step it runs, as the step's code sees it.

    `held()` is a cheap conditional read of the step's row (still ours, still
    running), unless the heartbeat already found the lease lost; `check` is
    the fence put before every AWS mutation, command and state write."""

    def __init__(self, step_id: int, owner: str):
        self.step_id, self.owner = step_id, owner
        self.lost = threading.Event()  # set by the heartbeat, or by a check that found the row gone

    def rows(self):
        """The step's row while this worker holds it: what the heartbeat renews and `held` looks for."""
        return Step.objects.filter(pk=self.step_id, lease_owner=self.owner, status=Step.Status.RUNNING)

    def held(self) -> bool:
        if self.lost.is_set():
            return False
        if not self.rows().exists():
            self.lost.set()
        return not self.lost.is_set()

    def check(self, *_) -> None:
        if not self.held():
            raise LeaseLost()


class Wait(Exception):
    """Not done yet: run the step again later; the worker is free meanwhile.

    `key` names the wait: while it stays the same across runs, the wait keeps
    its start, so `timeout` (seconds from that start) is a real deadline.
    `poll`: the longest sensible pause between looks (a health-check
    interval, say). `at`: seconds from now when the wait is over by itself
    (a timer, such as connection draining)."""

    def __init__(self, key: str, text: str, *, timeout: float, poll: float | None = None, at: float | None = None):
        super().__init__(text)
        self.key, self.text, self.timeout, self.poll, self.at = key, text, timeout, poll, at


@dataclass
class Context:
    release: Release
    step: Step | None
    cloud: aws.Cloud
    log: LogWriter
    lease: Lease | None = None  # None: run outside the engine (a test, a tool), with no lease to lose
    _cancel_checked: float = field(default=0.0)
    _cancelled: bool = field(default=False)
    _lease_checked: float = field(default=0.0)

    @property
    def env(self) -> dict:
        frozen = self.release.plan["environment"]
        return frozen if FROZEN_DEFAULTS.keys() <= frozen.keys() else {**FROZEN_DEFAULTS, **frozen}

    @property
    def state(self) -> dict:
        return self.release.state

    @property
    def key(self) -> str:
        return self.step.key if self.step else "rollback"

    @property
    def identity(self) -> naming.Identity:
        return naming.of(self.release)

    @property
    def scale(self) -> float:
        return float(self.env.get("time_scale", 1.0))

    def limit(self, name: str) -> float:
        """An environment's limit on an AWS wait, in this cloud's seconds."""
        return float(self.env.get(name, LIMIT_DEFAULTS.get(name, 600))) * self.scale

    def waited(self, key: str) -> float:
        """Seconds since the wait `key` began; 0 if the step is not in it."""
        wait = self.step.wait if self.step else {}
        if wait.get("key") != key:
            return 0.0
        return (timezone.now() - datetime.fromisoformat(wait["since"])).total_seconds()

    def info(self, text: str, host: str = "") -> None:
        self.log.write(self.key, text, host=host)

    def save(self, **values) -> None:
        """Update the release's `state`; under a lease, only while the lease
        holds, in the same statement, so a worker that lost its step cannot
        write over what the worker that took it over saved."""
        self.release.state.update(values)
        rows = Release.objects.filter(pk=self.release.pk)
        if self.lease is not None:
            rows = rows.filter(steps__pk=self.lease.step_id, steps__lease_owner=self.lease.owner,
                               steps__status=Step.Status.RUNNING)
        if not rows.update(state=self.release.state) and self.lease is not None:
            self.lease.lost.set()
            raise LeaseLost()

    def lease_lost(self) -> bool:
        """At most one look at the row a second (the heartbeat's flag is seen at once)."""
        if self.lease is None:
            return False
        if self.lease.lost.is_set():
            return True
        if time.monotonic() - self._lease_checked > 1:
            self._lease_checked = time.monotonic()
            return not self.lease.held()
        return False

    def check_lease(self) -> None:
        """The fence before touching AWS or a host: a fresh look at the row."""
        if self.lease is not None:
            self.lease.check()

    def cancelled(self) -> bool:
        if self.step is None or self.step.kind == Step.Kind.ROLLBACK or self.step.key == CANCEL_ENDS_AT:
            return False  # a rollback is not itself cancellable, nor a release that is past its swap
        if not self._cancelled and time.monotonic() - self._cancel_checked > 1:
            self._cancel_checked = time.monotonic()
            self._cancelled = Release.objects.filter(pk=self.release.pk, cancel_requested=True).exists()
        return self._cancelled

    def stopping(self) -> bool:
        """What a running command asks, several times a second: stop (cancelled, or the lease lost)?"""
        return self.lease_lost() or self.cancelled()

    def check_cancel(self) -> None:
        """Before a command: LeaseLost if the step is no longer ours, Cancelled if a person cancelled."""
        self.check_lease()
        if self.cancelled():
            raise Cancelled()

    # -- instances: the rows are the one record of what the release made ---------

    def record(self, info: aws.InstanceInfo, role: str, slot: str = "") -> Instance:
        row, _ = Instance.objects.update_or_create(
            release=self.release,
            instance_id=info.id,
            defaults={"name": info.name, "role": role, "slot": slot, "state": info.state,
                      "address": info.address(self.env["address"])},
        )
        return row

    def refresh(self, infos) -> None:
        for info in infos:
            Instance.objects.filter(release=self.release, instance_id=info.id).update(
                state=info.state, address=info.address(self.env["address"]))

    def new_rows(self) -> list[Instance]:
        rows = Instance.objects.filter(release=self.release, role__in=NEW)
        return sorted(rows, key=lambda r: (r.slot != "canary", len(r.slot), r.slot))

    def new_ids(self) -> list[str]:
        return [r.instance_id for r in self.new_rows()]

    def canary(self) -> Instance:
        row = Instance.objects.filter(release=self.release, slot="canary").first()
        if row is None:
            raise StepFailed("the release has no canary instance; its launch step did not run")
        return row

    def old_ids(self) -> list[str]:
        new = set(self.new_ids())
        old = Instance.objects.filter(release=self.release, role=Instance.Role.OLD).values_list("instance_id", flat=True)
        return [i for i in old if i not in new]

    def names(self, ids: list[str]) -> str:
        named = dict(Instance.objects.filter(release=self.release, instance_id__in=ids).values_list("instance_id", "name"))
        return ", ".join(named.get(i) or i for i in ids) or "nothing"

    def url(self, instance: Instance | aws.InstanceInfo, path: str = "/") -> str:
        """Where the worker reaches the instance's app: its checks go here."""
        address = instance.address if isinstance(instance, Instance) else instance.address(self.env["address"])
        return f"http://{address}:{self.env['app_port']}{path}"

    def direct_url(self, row: Instance) -> str:
        """Where a person opens the canary at the direct check: the environment's
        `verify_url_template` when it has one (a public address, a DNS name, a
        tunnel), else the address the worker uses."""
        template = self.env.get("verify_url_template") or ""
        if not template:
            return self.url(row)
        [info] = self.cloud.instances(ids=[row.instance_id]) or [None]
        return template.format(
            private_ip=info.private_ip if info else "", public_ip=info.public_ip if info else "",
            public_dns=info.public_dns if info else "", address=row.address, port=self.env["app_port"], name=row.name)


# -- instances that die behind Greenlight's back -----------------------------------


def fail_if_down(ctx: Context, ids: list[str], when: str) -> None:
    """StepFailed naming each of `ids` that EC2 says is no longer up (someone
    stopped or terminated it), `when` saying what the step was doing; their
    rows take the state EC2 reports, so the page and the API show it too.
    Asked when something about an instance went wrong (a command failed, a
    check did not answer), so that the error says why, not only what."""
    infos = ctx.cloud.instances(ids=ids) if ids else []
    ctx.refresh(infos)
    down = [i for i in infos if i.state not in UP]
    if down:
        raise StepFailed("; ".join(
            f"the instance {i.id} ({i.name or ctx.names([i.id])}) "
            f"{'stopped' if i.state in ('stopping', 'stopped') else 'was terminated'} (state: {i.state}) {when}"
            for i in down))


def excerpt(text: str) -> str:
    return text if len(text) <= ERROR_LINE else f"{text[:ERROR_LINE]}... [{len(text) - ERROR_LINE} more characters cut]"


# -- waits ------------------------------------------------------------------------


def wait_for_states(ctx: Context, ids: list[str], wanted: str, key: str) -> list[aws.InstanceInfo]:
    """The instances once every one is `wanted`; else Wait. An id EC2 does not
    list yet (it is eventually consistent) counts as not there yet."""
    infos = {i.id: i for i in ctx.cloud.instances(ids=ids)} if ids else {}
    ctx.refresh(infos.values())
    lost = [i for i in ids if i in infos and infos[i].state in ("shutting-down", "terminated")]
    if lost:
        raise StepFailed(f"{ctx.names(lost)} {'is' if len(lost) == 1 else 'are'} terminated; the release cannot go on")
    behind = [i for i in ids if i not in infos or infos[i].state != wanted]
    if behind:
        states = ", ".join(f"{ctx.names([i])} {infos[i].state if i in infos else 'not listed yet'}" for i in behind)
        raise Wait(key, f"{len(behind)} of {len(ids)} instances to be {wanted} ({states})",
                   timeout=ctx.limit("instance_timeout"), poll=5 * ctx.scale)
    return [infos[i] for i in ids]


def in_service(ctx: Context, ids: list[str], key: str) -> None:
    """Every one of `ids` in service, within what the load balancer's own
    health check needs: interval x healthy threshold, plus a margin."""
    if not ids:
        return
    states = ctx.cloud.health(ids)
    behind = [i for i in ids if states.get(i) != "InService"]
    if behind:
        fail_if_down(ctx, behind, f"while {ctx.key} waited for it to be in service")
        check = ctx.cloud.health_check()
        detail = ", ".join(f"{ctx.names([i])} {states.get(i, 'not registered')}" for i in behind)
        raise Wait(key, f"{len(behind)} of {len(ids)} instances to be in service ({detail})",
                   timeout=(check.interval * (check.healthy_threshold + 1) + IN_SERVICE_MARGIN) * ctx.scale,
                   poll=check.interval * ctx.scale)


def drained(ctx: Context, ids: list[str], key: str) -> None:
    """Deregistered `ids` finished their requests. A target group says when
    a target leaves `draining`; a classic ELB cannot, so its whole
    connection-draining timeout is waited out."""
    timeout = min(ctx.cloud.draining_timeout(), MAX_DRAINING)
    if not ids or timeout <= 0:
        return
    still = ctx.cloud.draining(ids)
    if still is None:
        remaining = timeout * ctx.scale - ctx.waited(key)
        if remaining > 0:
            raise Wait(key, f"connection draining of {ctx.names(ids)} ({timeout:g}s)",
                       timeout=(timeout + DRAINING_MARGIN) * ctx.scale, at=remaining)
    elif still:
        raise Wait(key, f"{ctx.names(still)} to finish draining (up to {timeout:g}s)",
                   timeout=(timeout + DRAINING_MARGIN) * ctx.scale, poll=max(timeout / 20, 5) * ctx.scale)


# -- helpers ----------------------------------------------------------------------


def next_names(ctx: Context, count: int) -> list[str]:
    prefix = ctx.env["name_prefix"]
    taken = set()
    for info in ctx.cloud.instances(states=("pending", "running", "stopping", "stopped")):
        suffix = info.name[len(prefix):] if info.name.startswith(prefix) else ""
        if suffix.isdigit():
            taken.add(int(suffix))
    start = max(taken, default=0) + 1
    return [f"{prefix}{start + i}" for i in range(count)]


def subnet_for(env: dict, slot: str) -> str:
    """The canary goes in the environment's subnet; clone N in the Nth of
    [subnet, *extra subnets], round the list, as a fleet spreads over
    availability zones. By the slot, so a launch tried again goes where its
    first try went."""
    subnets = [env["subnet_id"], *env["extra_subnet_ids"]]
    number = int(slot.rpartition("-")[2]) if slot.startswith("clone-") else 0
    return subnets[number % len(subnets)]


def launch_options(env: dict) -> aws.LaunchOptions:
    """The frozen environment's launch settings, as RunInstances gets them."""
    return aws.LaunchOptions(
        instance_profile=env["instance_profile"], user_data=env["user_data"], root_volume_size=env["root_volume_size"],
        root_volume_type=env["root_volume_type"], root_volume_encrypted=env["root_volume_encrypted"],
        require_imdsv2=env["require_imdsv2"], public_ip=env["public_ip"], extra_tags=dict(env["extra_tags"]))


def launch_one(ctx: Context, *, slot: str, name: str, image: str, role: str) -> Instance:
    if row := Instance.objects.filter(release=ctx.release, slot=slot).first():
        return row
    identity = ctx.identity
    subnet = subnet_for(ctx.env, slot)
    info, launched = ctx.cloud.launch(
        tags={"Name": name, **identity.tags(), aws.TAG_REVISION: ctx.release.revision},
        identity=identity.instance(slot),
        image_id=image,
        instance_type=ctx.env["instance_type"],
        key_name=ctx.env["key_name"],
        subnet_id=subnet,
        security_group_ids=[*ctx.env["security_group_ids"], ctx.env["verify_security_group_id"]],
        client_token=identity.client_token(slot),
        options=launch_options(ctx.env),
    )
    if launched:
        ctx.info(f"launched {name} as {info.id} from {image}{f' in {subnet}' if ctx.env['extra_subnet_ids'] else ''}")
    else:  # an earlier run of this step made it, and crashed before recording it
        ctx.info(f"adopted {info.name or name} ({info.id}), which an earlier run of {ctx.key} launched")
    return ctx.record(info, role, slot)


def read_key(path: str, what: str = "SSH key file") -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise StepFailed(f"cannot read the {what} {path}: {exc.strerror}") from None


def bastion(env: dict) -> ssh.Target | None:
    """The (frozen) environment's bastion as a jump target, or None when the instances are reached directly."""
    env = {**FROZEN_DEFAULTS, **env}
    if not env["bastion_host"]:
        return None
    key_file = env["bastion_key_file"] or env["ssh_key_file"]
    return ssh.Target(host=env["bastion_host"], port=env["bastion_port"], user=env["bastion_user"] or env["ssh_user"],
                      private_key=read_key(key_file, "bastion's SSH key file"), host_key=env["bastion_host_key"])


def target(ctx: Context, row: Instance) -> ssh.Target:
    return ssh.Target(host=row.address, port=ctx.env["ssh_port"], user=ctx.env["ssh_user"],
                      private_key=read_key(ctx.env["ssh_key_file"]), host_key=row.host_key, jump=bastion(ctx.env))


def no_host_key(ctx: Context, row: Instance, limit: float) -> str:
    return (f"{row.name} ({row.instance_id}) answers SSH, but its console output showed no SSH host key within "
            f"{limit:g}s, so Greenlight cannot check whom it would talk to and does not connect. Look at the instance's "
            f"console output (aws ec2 get-console-output --instance-id {row.instance_id}, or the EC2 console's "
            "\"Get system log\"): cloud-init prints the keys between -----BEGIN SSH HOST KEY KEYS----- and -----END "
            "SSH HOST KEY KEYS-----; an image without cloud-init, or with its keys-to-console module off, prints none. "
            "Fix the image, or retry the step once the console shows the keys (an administrator may set "
            "SSH_TRUST_FIRST_CONTACT to trust the first key instead)")


def reachable(ctx: Context, row: Instance) -> None:
    """SSH answers on the instance (through the bastion, if there is one),
    with its host key pinned; else Wait.

    The key is pinned from the console output (cloud-init prints it there)
    before the first SSH contact. AWS posts the console a minute or so after
    boot, often after sshd answers, so a listening port with no key in the
    console yet waits for the console, up to the environment's SSH limit;
    then the step fails saying what to look at. Only where an administrator
    opted in (SSH_TRUST_FIRST_CONTACT) is the key the host presents at first
    contact trusted instead, and the log says so."""
    if not row.host_key:
        keys = ctx.cloud.console_host_keys(row.instance_id)
        preferred = [k for k in keys if k.startswith("ssh-ed25519")] or keys
        if preferred:
            Instance.objects.filter(pk=row.pk).update(host_key=preferred[0])
            row.host_key = preferred[0]
            ctx.info(f"pinned {row.name}'s host key from its console output", host=row.name)
    jump = bastion(ctx.env)
    via = f" through the bastion {jump.host}:{jump.port}" if jump else ""

    def ssh_wait(why: str) -> Wait:
        return Wait(f"ssh:{row.instance_id}", f"SSH on {row.name} at {row.address}:{ctx.env['ssh_port']}{via} ({why})",
                    timeout=ctx.limit("ssh_timeout"), poll=10 * ctx.scale)

    try:
        up = ssh.listening(row.address, ctx.env["ssh_port"], jump=jump)
    except AdapterError as exc:  # the bastion itself
        if "host key" in str(exc):
            raise StepFailed(f"{exc}: check the environment's pinned bastion host key against the bastion") from None
        raise ssh_wait(str(exc)) from None
    if not up:
        [info] = ctx.cloud.instances(ids=[row.instance_id]) or [None]
        ctx.refresh([info] if info else [])
        if info is not None and info.state in ("shutting-down", "terminated"):
            raise StepFailed(f"the instance {row.instance_id} ({row.name}) was terminated (state: {info.state}); "
                             "the release cannot go on")
        if info is not None and info.state == "stopped":
            # stopped behind our back (a retry after that failed the step): what the step needs is it running
            ctx.cloud.start([row.instance_id])
            ctx.info(f"{row.name} ({row.instance_id}) is stopped; starting it again", host=row.name)
        raise ssh_wait(f"it is {info.state}" if info is not None and info.state != "running" else "nothing answers yet")
    if not row.host_key:
        limit = ctx.limit("ssh_timeout")
        if ctx.waited(f"console:{row.instance_id}") < limit:
            # the deadline is past the limit, so the step itself says why when the limit passes
            raise Wait(f"console:{row.instance_id}", f"{row.name}'s host key in its console output",
                       timeout=limit + 60 * ctx.scale, poll=10 * ctx.scale)
        if not settings.SSH_TRUST_FIRST_CONTACT:
            raise StepFailed(no_host_key(ctx, row, limit))
    try:
        result = ssh.run(target(ctx, row), "true", timeout=30)
    except AdapterError as exc:
        if "host key" in str(exc):
            raise
        raise ssh_wait(str(exc)) from None  # a refused key may be cloud-init not done yet; the deadline says when not
    if not row.host_key:
        Instance.objects.filter(pk=row.pk).update(host_key=result.host_key)
        row.host_key = result.host_key
        ctx.log.write(ctx.key, f"{row.name}'s console showed no host key within {ctx.limit('ssh_timeout'):g}s; "
                      f"trusting {result.host_key.split()[0]} from the first contact (SSH_TRUST_FIRST_CONTACT is on)",
                      host=row.name, stream="stderr")


def run_phase(ctx: Context, phase: str, rows: list[Instance]) -> None:
    """Run a recipe phase on every host at once; each host's commands in order."""
    definition = ctx.release.plan["recipe"]
    if not definition.get("phases", {}).get(phase):
        ctx.info(f"the recipe has no {phase} tasks")
        return
    default_timeout = float(ctx.env.get("command_timeout", LIMIT_DEFAULTS["command_timeout"]))

    def on_host(row: Instance) -> None:
        kit = None
        try:
            values = {
                "host": row.address,
                "instance_id": row.instance_id,
                "name": row.name,
                "ssh_user": ctx.env["ssh_user"],
                "ssh_port": ctx.env["ssh_port"],
                "ssh_key_file": ctx.env["ssh_key_file"],
                "ssh_config": "",  # local tasks only (recipe.LOCAL_ONLY_PARAMS): filled in below
                "known_hosts": "",
                "revision": ctx.release.revision,
                "repository": ctx.env["repository"],
                "app_port": ctx.env["app_port"],
                "environment": ctx.env["name"],
            }
            commands = recipe.render(definition, phase, values, role=row.role)
            if recipe.local_ssh_params(definition, phase):
                kit = ssh_kit(ctx, row)
                local_values = {**values, "ssh_key_file": kit.key_file, "ssh_config": kit.config, "known_hosts": kit.known_hosts}
                commands = [command if command.run == "remote" else theirs
                            for command, theirs in zip(commands, recipe.render(definition, phase, local_values, role=row.role))]
            for command in commands:
                run_command(ctx, row, command, command.timeout or default_timeout)
        finally:
            if kit is not None:
                kit.remove()
            connection.close()  # this thread's own database connection

    with ThreadPoolExecutor(max_workers=min(SSH_WORKERS, len(rows)) or 1) as pool:
        futures = [pool.submit(on_host, row) for row in rows]
        errors = [f.exception() for f in futures if f.exception()]
    for error in errors:
        raise error


def ssh_kit(ctx: Context, row: Instance) -> local.SSHKit:
    """The files a local task reaches `row` with (deployer.local.SSHKit): its
    pinned key only, so a local task never trusts a key the worker would not."""
    if not row.host_key:
        raise StepFailed(f"{row.name} has no pinned host key yet, so a local task could not check whom it talks to")
    try:
        return local.SSHKit(target=target(ctx, row), name=row.name, instance_id=row.instance_id,
                            user=settings.LOCAL_TASK_USER)
    except AdapterError as exc:
        raise StepFailed(f"cannot prepare SSH for the local tasks on {row.name}: {exc}") from None


def run_command(ctx: Context, row: Instance, command: recipe.Command, timeout: float) -> None:
    ctx.check_cancel()  # the lease too: a worker that lost its step must not run a command on a host
    ctx.log.write(ctx.key, f"$ {command.text}", host=row.name, stream="info")
    stderr: list[str] = []

    def on_line(stream: str, text: str) -> None:
        if stream == "stderr":
            stderr.append(text)
        ctx.log.write(ctx.key, text, host=row.name, stream=stream)

    try:
        if command.run == "local":
            # the environment's own AWS credentials only for a task that declares it calls AWS
            credentials = aws.task_environment(ctx.cloud.account) if command.aws else None
            status = local.run_in_scratch(command.text, user=settings.LOCAL_TASK_USER, extra_env=credentials,
                                          timeout=timeout, on_line=on_line, cancelled=ctx.stopping)
        else:
            status = ssh.run(target(ctx, row), command.text, timeout=timeout, on_line=on_line, cancelled=ctx.stopping).exit_status
    except CommandCancelled:
        ctx.check_lease()  # stopped because the lease was lost: LeaseLost, not a cancel
        raise Cancelled() from None
    except AdapterError as exc:  # timed out, or the connection dropped
        ctx.check_cancel()
        fail_if_down(ctx, [row.instance_id], f"while {command.task} ran on it")
        raise StepFailed(f"{command.task} failed on {row.name}: {exc}") from None
    ctx.check_cancel()
    if status != 0:
        # an exit by a signal (143: SIGTERM) is often the instance going down: say so if it is
        fail_if_down(ctx, [row.instance_id], f"while {command.task} ran on it")
        last = excerpt(ctx.log.redact(stderr[-1])) if stderr else "no output on stderr"
        raise StepFailed(f"{command.task} failed on {row.name} (exit {status}): {last}")


def http_check(url: str, expect: str = "") -> tuple[bool, str]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read(65536).decode(errors="replace")
            status = response.status
    except urllib.error.HTTPError as exc:
        status, body = exc.code, ""
    except OSError as exc:
        return False, f"GET {url}: {getattr(exc, 'reason', exc)}"
    took = int((time.monotonic() - started) * 1000)
    if status != 200:
        return False, f"GET {url} {status} ({took} ms)"
    if expect and expect not in body:
        return False, f"GET {url} 200 but {expect!r} is not in the page ({took} ms)"
    return True, f"GET {url} 200{f' {expect!r}' if expect else ''} ({took} ms)"


def smoke(ctx: Context, rows: list[Instance]) -> dict[str, list[str]]:
    """Both checks on every instance at once; the results once all pass, else Wait."""
    expect = ctx.env["expected_text"].replace("{revision}", ctx.release.revision)

    def check(row: Instance) -> list[tuple[bool, str]]:
        base = ctx.url(row, "").rstrip("/")
        return [http_check(base + "/", expect), http_check(base + ctx.env["health_path"])]

    with ThreadPoolExecutor(max_workers=min(CHECK_WORKERS, len(rows)) or 1) as pool:
        results = dict(zip((r.name for r in rows), pool.map(check, rows)))
    failing = {name: [line for ok, line in checks if not ok] for name, checks in results.items() if not all(ok for ok, _ in checks)}
    if failing:
        fail_if_down(ctx, [r.instance_id for r in rows if r.name in failing], f"while {ctx.key} checked it")
        name, lines = next(iter(failing.items()))
        raise Wait("smoke", f"{len(failing)} of {len(rows)} instances to pass their checks ({name}: {lines[0]})",
                   timeout=ctx.limit("smoke_timeout"), poll=5 * ctx.scale)
    for name, checks in results.items():
        for _, line in checks:
            ctx.info(line, host=name)
    return {name: [line for _, line in checks] for name, checks in results.items()}


# -- the steps -------------------------------------------------------------------


def launch(ctx: Context) -> dict:
    if not ctx.state.get("old_recorded"):
        old = ctx.cloud.registered()
        for info in ctx.cloud.instances(ids=old) if old else []:
            ctx.record(info, Instance.Role.OLD)
        ctx.save(old_recorded=True)
    name = ctx.state.get("canary_name") or next_names(ctx, 1)[0]
    ctx.save(canary_name=name)
    row = launch_one(ctx, slot="canary", name=name, image=ctx.env["image"], role=Instance.Role.CANARY)
    [info] = wait_for_states(ctx, [row.instance_id], "running", "running")
    ctx.info(f"{name} is {info.id}, running at {info.address(ctx.env['address'])} from {ctx.env['image']}")
    return {"instance": info.id, "name": name}


def provision(ctx: Context) -> dict:
    row = ctx.canary()
    reachable(ctx, row)
    run_phase(ctx, "provision", [row])
    return {}


def deploy(ctx: Context) -> dict:
    row = ctx.canary()
    reachable(ctx, row)
    run_phase(ctx, "deploy", [row])
    return {"revision": ctx.release.revision}


def open_access(ctx: Context) -> dict:
    env = ctx.env
    ctx.save(access={"group": env["verify_security_group_id"], "port": env["app_port"], "cidr": env["verify_cidr"]})
    ctx.cloud.open_port(env["verify_security_group_id"], env["app_port"], env["verify_cidr"], f"greenlight release {ctx.release.pk} verification")
    ctx.info(f"opened tcp/{env['app_port']} to {env['verify_cidr']} in {env['verify_security_group_id']}")
    return {}


def smoke_direct(ctx: Context) -> dict:
    row = ctx.canary()
    checks = smoke(ctx, [row])[row.name]
    url = ctx.direct_url(row)
    if url != ctx.url(row):
        ctx.info(f"checked at {ctx.url(row)}; people open it at {url}", host=row.name)
    return {"url": url, "checks": checks}


def close_access(ctx: Context) -> dict:
    revoke_access(ctx)
    return {}


def revoke_access(ctx: Context) -> dict:
    if access := ctx.state.get("access"):
        ctx.cloud.close_port(access["group"], access["port"], access["cidr"])
        ctx.info(f"closed tcp/{access['port']} to {access['cidr']} in {access['group']}")
    return {}


def bake_image(ctx: Context) -> dict:
    canary = ctx.canary()
    name = ctx.identity.image_name
    image = ctx.state.get("image")
    if not image:
        [info] = ctx.cloud.instances(ids=[canary.instance_id]) or [None]
        if info is not None and info.state == "running":
            ctx.cloud.stop([canary.instance_id])
            ctx.info(f"stopping {canary.name} to bake it")
        wait_for_states(ctx, [canary.instance_id], "stopped", "canary stopped")
        tags = {**ctx.identity.tags(), "revision": ctx.release.revision}
        image = ctx.cloud.create_image(canary.instance_id, name, tags)
        ctx.save(image=image)
        ctx.info(f"creating image {image} ({name}) from {canary.name}")
    state = ctx.cloud.image_state(image)
    if state in ("failed", "error", "invalid", "deregistered"):
        raise StepFailed(f"image {image} ({name}) is {state}")
    if state != "available":
        raise Wait("image", f"image {image} to be available (it is {state})", timeout=ctx.limit("image_timeout"),
                   poll=30 * ctx.scale)
    ctx.info(f"image {image} ({name}) is available")
    return {"image": image}


def launch_clones(ctx: Context) -> dict:
    canary = ctx.canary()
    [info] = ctx.cloud.instances(ids=[canary.instance_id]) or [None]
    if info is not None and info.state == "stopped":
        ctx.cloud.start([canary.instance_id])
        ctx.info(f"starting {canary.name} again")
    count = ctx.release.fleet_size - 1
    names = ctx.state.get("clone_names") or next_names(ctx, count)
    ctx.save(clone_names=names)
    for n, name in enumerate(names, 1):
        launch_one(ctx, slot=f"clone-{n}", name=name, image=ctx.state["image"], role=Instance.Role.CLONE)
    rows = ctx.new_rows()
    wait_for_states(ctx, [r.instance_id for r in rows], "running", "running")
    for row in Instance.objects.filter(pk__in=[r.pk for r in rows]):
        ctx.info(f"{row.name} is {row.instance_id}, running at {row.address}")
    return {"clones": [r.instance_id for r in rows if r.role == Instance.Role.CLONE]}


def smoke_clones(ctx: Context) -> dict:
    return {"checks": smoke(ctx, ctx.new_rows())}


def register_new(ctx: Context) -> dict:
    new = ctx.new_ids()
    if added := ctx.cloud.register(new):
        ctx.info(f"registered {ctx.names(added)} with the load balancer")
    in_service(ctx, new, "in service")
    ctx.info("every new instance is in service")
    return {}


def verify_production(ctx: Context, attempts: int = 10) -> dict:
    # the load balancer routes around a dead instance, so the checks below would pass without it
    fail_if_down(ctx, ctx.new_ids(), f"after it was put in service; {ctx.key} stops here")
    url = ctx.env["public_url"].rstrip("/")
    expect = ctx.env["expected_text"].replace("{revision}", ctx.release.revision)
    results = [http_check(url + "/") for _ in range(attempts)]
    failed = [line for ok, line in results if not ok]
    if failed:
        raise StepFailed(f"{len(failed)} of {attempts} requests through {url} failed: {failed[0]}")
    seen = sum(1 for _ in range(attempts) if http_check(url + "/", expect)[0])
    if expect and not seen:
        raise StepFailed(f"no response through {url} contained {expect!r}")
    ctx.info(f"{attempts} requests through {url} answered 200; {seen} of {attempts} more served {ctx.release.revision}")
    return {"url": url}


def take_out(ctx: Context, ids: list[str], mark: str) -> None:
    """Deregister `ids` and wait until they drained. The mark is saved before
    the call, so a run after a crash still waits for the draining it began."""
    registered = set(ctx.cloud.registered())
    leaving = [i for i in ids if i in registered]
    if leaving:
        ctx.save(**{mark: True})
        ctx.cloud.deregister(leaving)
        ctx.info(f"deregistered {ctx.names(leaving)}; draining")
    if ctx.state.get(mark):
        drained(ctx, ids, "draining")


def deregister_old(ctx: Context) -> dict:
    # never take the old fleet out from in front of a new one that is not there
    fail_if_down(ctx, ctx.new_ids(), "after it was put in service; the old instances stay in service")
    take_out(ctx, ctx.old_ids(), "old_deregistered")
    return {}


def stop(ctx: Context, ids: list[str]) -> list[str]:
    """Stop whichever of `ids` run; Wait until every one is stopped. An
    instance still pending cannot be stopped yet (EC2 refuses), so it is waited on."""
    infos = ctx.cloud.instances(ids=ids) if ids else []
    running = [i.id for i in infos if i.state == "running"]
    if running:
        ctx.cloud.stop(running)
        ctx.info(f"stopping {ctx.names(running)}")
    present = [i.id for i in infos if i.state not in ("terminated", "shutting-down")]
    if [i for i in infos if i.state != "stopped" and i.id in present]:
        wait_for_states(ctx, present, "stopped", "stopped")
    ctx.refresh(infos)
    return present


def stop_old(ctx: Context) -> dict:
    stopped = stop(ctx, ctx.old_ids())
    ctx.info(f"stopped {ctx.names(stopped)}; they are terminated after {ctx.env['retention']}s")
    return {"stopped": stopped}


# -- rollback: the plan's undo steps (plan.UNDO) -----------------------------------------


def restore_old(ctx: Context) -> dict:
    """The old fleet running, registered and in service, before anything new leaves."""
    old = ctx.old_ids()
    if not old:
        return {}
    infos = ctx.cloud.instances(ids=old)
    stopped = [i.id for i in infos if i.state == "stopped"]
    if stopped:
        ctx.cloud.start(stopped)
        ctx.info(f"starting {ctx.names(stopped)} again")
    live = [i.id for i in infos if i.state not in ("terminated", "shutting-down")]
    if not live:
        raise StepFailed(f"the old instances {ctx.names(old)} are gone; there is nothing to go back to")
    wait_for_states(ctx, live, "running", "old running")
    if added := ctx.cloud.register(live):
        ctx.info(f"registered {ctx.names(added)} again")
    in_service(ctx, live, "old in service")
    ctx.info(f"{ctx.names(live)} in service")
    return {}


def retire_new(ctx: Context) -> dict:
    take_out(ctx, ctx.new_ids(), "new_deregistered")
    return {}


def stop_new(ctx: Context) -> dict:
    """Stopped, never terminated: a person can still look at a bad canary."""
    stopped = stop(ctx, ctx.new_ids())
    if stopped:
        ctx.info(f"{ctx.names(stopped)} stopped")
    return {}


def remove_image(ctx: Context) -> dict:
    """The image this release baked, deregistered and its snapshots deleted:
    a rolled-back release's image is not one to launch from. Never an image
    another release launches from, or an environment names as its base or
    last baked image. Re-entrant: the snapshot ids are saved before the
    image (which lists them) is deregistered."""
    if removed := ctx.state.get("image_removed"):
        return {"removed": removed, "snapshots": ctx.state.get("image_snapshots", [])}
    identity = ctx.identity
    image_id = ctx.state.get("image")
    if not image_id and (found := ctx.cloud.image_named(identity.image_name)):
        image_id = found["ImageId"]  # made by a bake whose worker died before saving it
    if not image_id:
        ctx.info("this release made no image")
        return {}
    release = ctx.release
    # a succeeded release rolled back: its environment bakes from the image it had before
    if Environment.objects.filter(pk=release.environment_id, last_baked_ami=image_id).update(
            last_baked_ami=ctx.env.get("last_baked_ami") or ""):
        ctx.info(f"{ctx.env['name']}'s last baked image is {ctx.env.get('last_baked_ami') or 'none'} again")
    users = [f"release {pk}" for pk in Release.objects.filter(plan__environment__image=image_id).exclude(
        pk=release.pk).values_list("pk", flat=True)]
    users += [f"environment {name}" for name in Environment.objects.filter(
        Q(base_ami=image_id) | Q(last_baked_ami=image_id)).values_list("name", flat=True)]
    if users:
        ctx.info(f"keeping image {image_id}: {', '.join(users)} uses it")
        return {"kept": image_id}
    image = ctx.cloud.image(image_id)
    if image is not None and image.get("Name") != identity.image_name:
        ctx.info(f"keeping image {image_id}: it is {image.get('Name')!r}, not this release's {identity.image_name!r}")
        return {"kept": image_id}
    if image is not None and image["State"] == "pending":
        raise Wait("image", f"image {image_id} to be made before it is removed", timeout=ctx.limit("image_timeout"),
                   poll=30 * ctx.scale)
    if image is None and "image_snapshots" not in ctx.state and ctx.waited("image listed") < IMAGE_VISIBLE * ctx.scale:
        # never deregistered by us: it may be too new for EC2 to list yet
        raise Wait("image listed", f"image {image_id} to be listed", timeout=(IMAGE_VISIBLE + 60) * ctx.scale,
                   poll=5 * ctx.scale)
    if image is not None:
        ctx.save(image_snapshots=sorted({*ctx.state.get("image_snapshots", []), *ctx.cloud.image_snapshots(image)}))
        ctx.cloud.deregister_image(image_id)
        ctx.info(f"deregistered image {image_id} ({identity.image_name})")
    snapshots = ctx.state.get("image_snapshots", [])
    if in_use := ctx.cloud.delete_snapshots(snapshots):
        ctx.info(f"left snapshot {', '.join(in_use)} in place: EC2 says another image uses it")
    if deleted := [s for s in snapshots if s not in in_use]:
        ctx.info(f"deleted snapshot {', '.join(deleted)}")
    ctx.save(image_removed=image_id)
    return {"removed": image_id, "snapshots": snapshots}


ACTIONS = {
    "launch": launch,
    "provision": provision,
    "deploy": deploy,
    "open_access": open_access,
    "smoke_direct": smoke_direct,
    "close_access": close_access,
    "bake_image": bake_image,
    "launch_clones": launch_clones,
    "smoke_clones": smoke_clones,
    "register_new": register_new,
    "verify_production": verify_production,
    "deregister_old": deregister_old,
    "stop_old": stop_old,
    "restore_old": restore_old,
    "retire_new": retire_new,
    "stop_new": stop_new,
    "revoke_access": revoke_access,
    "remove_image": remove_image,
}


# -- gates: what a person needs to see to decide ------------------------------------


def verify_card(ctx: Context) -> dict:
    row = ctx.canary()
    smoke_step = ctx.release.steps.filter(key="smoke_direct").first()
    result = smoke_step.result if smoke_step else {}
    return {"instance": row.instance_id, "name": row.name, "url": result.get("url") or ctx.direct_url(row),
            "checks": result.get("checks", [])}


def swap_card(ctx: Context) -> dict:
    registered = ctx.cloud.health()

    def describe(ids):
        infos = {i.id: i for i in ctx.cloud.instances(ids=ids)} if ids else {}
        return [
            {"instance": i, "name": infos[i].name if i in infos else "", "state": infos[i].state if i in infos else "unknown",
             "health": registered.get(i, "not registered")}
            for i in ids
        ]

    return {"old": describe(ctx.old_ids()), "new": describe(ctx.new_ids())}


GATE_CARDS = {"verify_directly": verify_card, "swap_elb": swap_card}

__all__ = ["ACTIONS", "GATE_CARDS", "Cancelled", "Context", "Lease", "LeaseLost", "StepFailed", "Wait"]
