"""The sandbox's AWS: a moto server in this process, made a little more like AWS.

moto keeps its state in memory; the sandbox pickles it on a clean stop (and
every few seconds while it runs, for a sandbox that is killed) and loads it
on the next start, so instance ids, images and registrations survive a
restart like they would in a real account. The hooks below close gaps where
moto would accept what AWS refuses, tell the sandbox when an image is made so
it can snapshot the instance's directory at that moment, let the sandbox's
load balancers answer the health APIs, and, in the `aws` timings profile,
play AWS's durations: pending instances and images, stopping instances, a
fresh instance id unknown for a few seconds, console output after boot.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .timings import FAST, Timings

# moto reads these when a request arrives: without them an unknown AMI,
# instance type or key pair would be accepted where AWS refuses it.
VALIDATION = {
    "MOTO_ENABLE_AMI_VALIDATION": "true",
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
    "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
}
ACCOUNT_ID = "123456789012"  # moto's default account
NEVER = float("inf")
log = logging.getLogger("sandbox.cloud")


@dataclass(frozen=True)
class InstanceView:
    id: str
    state: str
    private_ip: str
    image_id: str
    key_name: str
    name: str


def _patch(owner, name: str, make: Callable) -> None:
    """Replace owner.name with make(original); a second Cloud in the same
    process wraps moto's own method again, not the first Cloud's wrapper."""
    current = getattr(owner, name)
    original = getattr(current, "_greenlight_original", current)
    patched = make(original)
    patched._greenlight_original = original
    setattr(owner, name, patched)


class Cloud:
    def __init__(self, *, host: str, port: int, region: str, state_file: Path, timings: Timings = FAST,
                 scale: float = 1.0, aws_behaviour: bool = False):
        os.environ.update(VALIDATION)
        from moto.server import ThreadedMotoServer

        self.region = region
        self.state_file = state_file
        self._checkpointed = b""
        self.timings = timings
        self.scale = scale
        # AWS behaviour that is not a duration (ClientToken idempotency)
        self.aws_behaviour = aws_behaviour
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.on_image_created: Callable[[str, str], None] = lambda image_id, instance_id: None
        # (load balancer name, instance id) -> (State, Description) as the sandbox's balancer sees it
        self.instance_health: Callable[[str, str], tuple[str, str] | None] = lambda lb, instance_id: None
        # (target group arn, target id, registered in moto) -> (State, Reason, Description), or None for moto's answer
        self.target_health: Callable[[str, str, bool], tuple[str, str, str] | None] = lambda arn, target_id, registered: None
        # (target group arn, ids registered in moto) -> (id, port) the sandbox's balancer still drains
        self.draining_targets: Callable[[str, set[str]], list[tuple[str, int]]] = lambda arn, registered: []
        # instance id -> its SSH host public keys, printed to the console as cloud-init does
        self.host_keys: Callable[[str], list[str]] = lambda instance_id: []
        self._lock = threading.Lock()
        self._due: dict[tuple[str, str], tuple[float, str]] = {}  # (kind, id) -> (when, the state it reaches)
        self._hidden: dict[str, float] = {}  # new instance id -> when other calls may see it
        self._running_since: dict[str, float] = {}  # instance id -> when it last turned running
        self._console_at: dict[str, float] = {}  # instance id -> when its console output is posted
        self._started = time.monotonic()
        self._ticking = threading.Event()
        self._ticker: threading.Thread | None = None
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    def delay(self, name: str) -> float:
        """A Timings entry in sandbox seconds."""
        return getattr(self.timings, name) * self.scale

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> str:
        self._load()
        self._resume_transitions()
        self._install_hooks()
        self._server.start()
        self._ticker = threading.Thread(target=self._tick, name="cloud-clock", daemon=True)
        self._ticker.start()
        host, port = self._server.get_host_and_port()
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    def stop(self) -> None:
        self._ticking.set()
        if self._ticker:
            self._ticker.join(timeout=5)
        self._server.stop()
        self.save()

    def _backends(self):
        from moto.backends import get_backend

        return {
            service: get_backend(service)[ACCOUNT_ID][self.region]
            for service in ("ec2", "elb", "elbv2")
        }

    def save(self) -> None:
        self._write(pickle.dumps(self._backends()))

    def checkpoint(self) -> None:
        """Save the state while it is served, so that a killed sandbox (SIGKILL,
        no clean stop) comes back with what it had a few seconds before, as an
        AWS account would, rather than empty. Written only when it changed."""
        try:
            data = pickle.dumps(self._backends())
        except RuntimeError:  # a request changed a dict while it was read: the next checkpoint takes it
            return
        if data != self._checkpointed:
            self._write(data)

    def _write(self, data: bytes) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.state_file)  # whole or not at all, even if we are killed mid-write
        self._checkpointed = data

    def _load(self) -> None:
        if not self.state_file.exists():
            return
        from moto.backends import get_backend

        try:
            saved = pickle.loads(self.state_file.read_bytes())
        except Exception as exc:  # a moto upgrade can change the classes
            log.warning("cannot read the saved AWS state (%s); starting empty", exc)
            return
        for service, backend in saved.items():
            get_backend(service)[ACCOUNT_ID][self.region] = backend

    # -- AWS's durations -------------------------------------------------------

    def _schedule(self, kind: str, resource_id: str, after: str, seconds: float) -> None:
        with self._lock:
            self._due[(kind, resource_id)] = (time.monotonic() + seconds, after)

    def _resume_transitions(self) -> None:
        """A restart mid-transition: what was pending or stopping finishes its wait."""
        ec2 = self._backends()["ec2"]
        for instance in self._all_instances():
            if instance.state == "pending":
                self._schedule("instance", instance.id, "running", self.delay("instance_pending"))
            elif instance.state == "stopping":
                self._schedule("instance", instance.id, "stopped", self.delay("instance_stopping"))
        for ami in ec2.amis.values():
            if ami.state == "pending":
                self._schedule("image", ami.id, "available", self.delay("image_pending"))

    def _tick(self) -> None:
        while not self._ticking.wait(0.02):
            now = time.monotonic()
            with self._lock:
                due = [(key, after) for key, (when, after) in self._due.items() if when <= now]
                for key, _ in due:
                    del self._due[key]
                for instance_id in [i for i, when in self._hidden.items() if when <= now]:
                    del self._hidden[instance_id]
            for (kind, resource_id), after in due:
                try:
                    self._arrive(kind, resource_id, after, now)
                except Exception:
                    log.exception("cannot move %s %s to %s", kind, resource_id, after)

    def _arrive(self, kind: str, resource_id: str, after: str, now: float) -> None:
        ec2 = self._backends()["ec2"]
        if kind == "image":
            ami = ec2.amis.get(resource_id)
            if ami is not None and ami.state == "pending":
                ami.state = after
            return
        instance = next((i for i in self._all_instances() if i.id == resource_id), None)
        expected = {"running": "pending", "stopped": "stopping"}[after]
        if instance is None or instance.state != expected:
            return  # terminated (or changed) while it waited
        instance._state.name, instance._state.code = after, {"running": 16, "stopped": 80}[after]
        if after == "running":
            self._running_since[resource_id] = now
            if self._console_at.get(resource_id) == NEVER:
                self._console_at[resource_id] = now + self.delay("console_output")

    def _launched(self, instance) -> None:
        if self.delay("not_found"):
            with self._lock:
                self._hidden[instance.id] = time.monotonic() + self.delay("not_found")
        if self.delay("instance_pending"):
            instance._state.name, instance._state.code = "pending", 0
            self._console_at[instance.id] = NEVER
            self._schedule("instance", instance.id, "running", self.delay("instance_pending"))

    def hidden(self) -> set[str]:
        with self._lock:
            return set(self._hidden)

    def ready_to_boot(self, view: InstanceView) -> bool:
        """Whether the instance's OS is up: running, and booted for `boot` seconds."""
        if view.state == "pending":
            return not self.delay("instance_pending")  # moto's own pending (never, today) stays bootable
        if view.state != "running":
            return False
        return time.monotonic() >= self._running_since.get(view.id, self._started) + self.delay("boot")

    def console_posted(self, instance_id: str) -> bool:
        return time.monotonic() >= self._console_at.get(instance_id, 0)

    # -- where moto differs from AWS ----------------------------------------

    def _install_hooks(self) -> None:
        self._hook_images()
        self._hook_instances()
        self._hook_visibility()
        self._hook_console()
        self._hook_health()

    def _hook_images(self) -> None:
        from moto.ec2.exceptions import EC2ClientError
        from moto.ec2.models import EC2Backend

        cloud = self

        def make(original):
            def create_image(backend, instance_id, name, *args, **kwargs):
                if any(ami.name == name for ami in backend.amis.values() if ami.owner_id == backend.account_id):
                    raise EC2ClientError(
                        "InvalidAMIName.Duplicate",
                        f"AMI name {name} is already in use by an AMI you own",
                    )
                ami = original(backend, instance_id, name, *args, **kwargs)
                cloud.on_image_created(ami.id, instance_id)  # the disk as it is now, even while pending
                if cloud.delay("image_pending"):
                    ami.state = "pending"
                    cloud._schedule("image", ami.id, "available", cloud.delay("image_pending"))
                return ami

            return create_image

        _patch(EC2Backend, "create_image", make)

    def _hook_instances(self) -> None:
        from moto.core.responses import ActionResult
        from moto.ec2.exceptions import EC2ClientError
        from moto.ec2.models import EC2Backend
        from moto.ec2.models.instances import Instance
        from moto.ec2.responses.instances import InstanceResponse

        cloud = self

        def make_run(original):
            def run_instances(backend, image_id, *args, **kwargs):
                ami = backend.amis.get(image_id)
                if ami is not None and ami.state != "available":
                    raise EC2ClientError("InvalidAMIID.Unavailable", f"The image id '[{image_id}]' is not available")
                for mapping in kwargs.get("block_device_mappings") or []:  # moto makes a volume of any size
                    ebs = mapping.get("Ebs") or {}
                    snapshot = backend.snapshots.get(ebs.get("SnapshotId") or "")
                    if snapshot is not None and ebs.get("VolumeSize") and int(ebs["VolumeSize"]) < snapshot.volume.size:
                        raise EC2ClientError(
                            "InvalidBlockDeviceMapping",
                            f"Volume of size {ebs['VolumeSize']}GB is smaller than snapshot '{snapshot.id}', "
                            f"expect size >= {snapshot.volume.size}GB")
                reservation = original(backend, image_id, *args, **kwargs)
                for instance in reservation.instances:
                    cloud._launched(instance)
                return reservation

            return run_instances

        def make_idempotent(original):
            def run_instances(response):
                token = response._get_param("ClientToken")  # moto fills in "ABCDE" when absent
                if token and cloud.aws_behaviour:
                    for reservation in list(response.ec2_backend.reservations.values()):
                        if any(i.client_token == token for i in reservation.instances):
                            return ActionResult(reservation)  # AWS answers a repeat with the first launch
                return original(response)

            return run_instances

        def incorrect(instance, action: str):
            return EC2ClientError(
                "IncorrectInstanceState", f"The instance '{instance.id}' is not in a state from which it can be {action}."
            )

        def make_start(original):
            def start(instance):
                if instance.state == "stopping":
                    raise incorrect(instance, "started")
                previous = original(instance)
                if previous.name == "stopped" and cloud.delay("instance_pending"):
                    instance._state.name, instance._state.code = "pending", 0
                    cloud._schedule("instance", instance.id, "running", cloud.delay("instance_pending"))
                elif previous.name == "pending":  # starting a pending instance changes nothing
                    instance._state.name, instance._state.code = "pending", 0
                return previous

            return start

        def make_stop(original):
            def stop(instance):
                if instance.state == "pending":
                    raise incorrect(instance, "stopped")
                if instance.state in ("stopping", "stopped"):
                    return copy.copy(instance._state)
                previous = original(instance)
                if cloud.delay("instance_stopping"):
                    instance._state.name, instance._state.code = "stopping", 64
                    cloud._schedule("instance", instance.id, "stopped", cloud.delay("instance_stopping"))
                return previous

            return stop

        _patch(EC2Backend, "run_instances", make_run)
        _patch(InstanceResponse, "run_instances", make_idempotent)
        _patch(Instance, "start", make_start)
        _patch(Instance, "stop", make_stop)

    def _hook_visibility(self) -> None:
        """A new instance id is unknown to every other call for `not_found`
        seconds: by id it is InvalidInstanceID.NotFound, in a listing it is
        absent, and tagging it fails, as AWS's eventual consistency does."""
        from moto.ec2.exceptions import InvalidInstanceIdError
        from moto.ec2.models import EC2Backend

        cloud = self

        def make_reservations(original):
            def all_reservations(backend, filters=None):
                reservations = original(backend, filters)
                hidden = cloud.hidden()
                if not hidden:
                    return reservations
                visible = []
                for reservation in reservations:  # moto's copies: their lists are ours to replace
                    if any(i.id in hidden for i in reservation.instances):
                        reservation.instances = [i for i in reservation.instances if i.id not in hidden]
                    if reservation.instances:
                        visible.append(reservation)
                return visible

            return all_reservations

        def make_tags(original):
            def create_tags(backend, resource_ids, tags):
                unknown = [r for r in resource_ids if r in cloud.hidden()]
                if unknown:
                    raise InvalidInstanceIdError(unknown)
                return original(backend, resource_ids, tags)

            return create_tags

        _patch(EC2Backend, "all_reservations", make_reservations)
        _patch(EC2Backend, "create_tags", make_tags)

    def _hook_console(self) -> None:
        from moto.ec2.responses import general

        cloud = self

        def make(original):
            def get_console_output(response):
                instance_id = response._get_param("InstanceId")
                response.ec2_backend.get_instance(instance_id)  # unknown (or not yet known) ids fail
                keys = cloud.host_keys(instance_id) if cloud.console_posted(instance_id) else []
                if not keys:
                    if cloud.delay("console_output") or cloud.delay("boot") or cloud.delay("instance_pending"):
                        # AWS has posted nothing yet: no Output at all
                        return general.ActionResult({"InstanceId": instance_id, "Timestamp": general.utcnow()})
                    return original(response)
                text = "\n".join([general.SAMPLE_CONSOLE_OUTPUT, "-----BEGIN SSH HOST KEY KEYS-----", *keys,
                                  "-----END SSH HOST KEY KEYS-----", ""])
                return general.ActionResult(
                    {"InstanceId": instance_id, "Timestamp": general.utcnow(), "Output": general.Base64EncodedString.from_raw_string(text)}
                )

            return get_console_output

        _patch(general.General, "get_console_output", make)

    def _hook_health(self) -> None:
        """moto calls every registered running instance healthy; the sandbox's
        balancers answer instead, from their own health checks."""
        from moto.elb.models import ELBBackend
        from moto.elbv2.models import ELBv2Backend, FakeHealthStatus

        cloud = self

        def make_classic(original):
            def describe_instance_health(backend, lb_name, instances):
                states = original(backend, lb_name, instances)
                for state in states:
                    if state["State"] == "InService":
                        seen = cloud.instance_health(lb_name, state["InstanceId"])
                        if seen:
                            state["State"] = seen[0]
                            state["Description"] = seen[1]
                return states

            return describe_instance_health

        def make_target(original):
            def describe_target_health(backend, target_group_arn, targets):
                answers = original(backend, target_group_arn, targets)
                group = backend.target_groups[target_group_arn]
                described = []
                for answer in answers:
                    registered = answer.instance_id in group.targets
                    if answer.status == "unused" and registered:
                        described.append(answer)  # a stopped instance: moto says so as AWS does
                        continue
                    seen = cloud.target_health(target_group_arn, answer.instance_id, registered)
                    if seen:
                        answer = FakeHealthStatus(answer.instance_id, answer.port, answer.health_check_port, *seen)
                    described.append(answer)
                if not targets:  # the whole group: what is still draining is listed too
                    for target_id, port in cloud.draining_targets(target_group_arn, set(group.targets)):
                        if target_id not in group.targets:
                            described.append(FakeHealthStatus(
                                target_id, port, group.health_check_port, "draining",
                                "Target.DeregistrationInProgress", "Target deregistration is in progress",
                            ))
                return described

            return describe_target_health

        _patch(ELBBackend, "describe_instance_health", make_classic)
        _patch(ELBv2Backend, "describe_target_health", make_target)

    # -- read side for the sandbox's hosts -------------------------------------

    def _all_instances(self) -> list:
        """Every instance, hidden ones too (the sandbox itself always sees them)."""
        ec2 = self._backends()["ec2"]
        return [i for reservation in list(ec2.reservations.values()) for i in reservation.instances]

    def instances(self) -> list[InstanceView]:
        ec2 = self._backends()["ec2"]
        views = []
        for instance in self._all_instances():
            tags = ec2.tags.get(instance.id, {})
            views.append(
                InstanceView(
                    id=instance.id,
                    state=instance.state,
                    private_ip=instance.private_ip or "",
                    image_id=instance.image_id,
                    key_name=instance.key_name or "",
                    name=tags.get("Name", ""),
                )
            )
        return views

    def image_ids(self) -> set[str]:
        return set(self._backends()["ec2"].amis)

    def public_key(self, key_name: str) -> str:
        pair = self._backends()["ec2"].key_pairs.get(key_name)
        return pair.material_public.decode() if pair else ""
