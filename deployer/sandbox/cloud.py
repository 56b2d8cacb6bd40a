"""The sandbox's AWS: a moto server in this process, made a little more like AWS.

moto keeps its state in memory; the sandbox pickles it on a clean stop and
loads it on the next start, so instance ids, images and registrations survive
a restart like they would in a real account. The hooks below close gaps where
moto would accept what AWS refuses, and tell the sandbox when an image is
made so it can snapshot the instance's directory at that moment.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# moto reads these when a request arrives: without them an unknown AMI,
# instance type or key pair would be accepted where AWS refuses it.
VALIDATION = {
    "MOTO_ENABLE_AMI_VALIDATION": "true",
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
    "MOTO_ENABLE_KEYPAIR_VALIDATION": "true",
}
ACCOUNT_ID = "123456789012"  # moto's default account
log = logging.getLogger("sandbox.cloud")


@dataclass(frozen=True)
class InstanceView:
    id: str
    state: str
    private_ip: str
    image_id: str
    key_name: str
    name: str


class Cloud:
    def __init__(self, *, host: str, port: int, region: str, state_file: Path):
        os.environ.update(VALIDATION)
        from moto.server import ThreadedMotoServer

        self.region = region
        self.state_file = state_file
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.on_image_created: Callable[[str, str], None] = lambda image_id, instance_id: None
        # (instance_id) -> (state, description) as the sandbox's load balancer sees it
        self.instance_health: Callable[[str, str], tuple[str, str] | None] = lambda lb, instance_id: None
        # instance id -> its SSH host public keys, printed to the console as cloud-init does
        self.host_keys: Callable[[str], list[str]] = lambda instance_id: []
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> str:
        self._load()
        self._install_hooks()
        self._server.start()
        host, port = self._server.get_host_and_port()
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"

    def stop(self) -> None:
        self._server.stop()
        self.save()

    def _backends(self):
        from moto.backends import get_backend

        return {
            service: get_backend(service)[ACCOUNT_ID][self.region]
            for service in ("ec2", "elb", "elbv2")
        }

    def save(self) -> None:
        data = pickle.dumps(self._backends())
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.state_file)

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

    # -- where moto differs from AWS ----------------------------------------

    def _install_hooks(self) -> None:
        from moto.ec2.exceptions import EC2ClientError
        from moto.ec2.models import EC2Backend
        from moto.elb.models import ELBBackend

        cloud = self
        if getattr(EC2Backend.create_image, "_greenlight", False):
            EC2Backend.create_image = EC2Backend.create_image._original
            ELBBackend.describe_instance_health = ELBBackend.describe_instance_health._original

        original_create_image = EC2Backend.create_image

        def create_image(backend, instance_id, name, *args, **kwargs):
            if any(ami.name == name for ami in backend.amis.values() if ami.owner_id == backend.account_id):
                raise EC2ClientError(
                    "InvalidAMIName.Duplicate",
                    f"AMI name {name} is already in use by an AMI you own",
                )
            ami = original_create_image(backend, instance_id, name, *args, **kwargs)
            cloud.on_image_created(ami.id, instance_id)
            return ami

        original_health = ELBBackend.describe_instance_health

        def describe_instance_health(backend, lb_name, instances):
            states = original_health(backend, lb_name, instances)
            for state in states:
                if state["State"] == "InService":
                    seen = cloud.instance_health(lb_name, state["InstanceId"])
                    if seen:
                        state["State"] = seen[0]
            return states

        from moto.ec2.responses import general

        original_console = general.General.get_console_output
        if getattr(original_console, "_greenlight", False):
            original_console = original_console._original

        def get_console_output(response):
            instance_id = response._get_param("InstanceId")
            keys = cloud.host_keys(instance_id)
            if not keys:
                return original_console(response)
            response.ec2_backend.get_instance(instance_id)  # unknown ids fail as before
            text = "\n".join([general.SAMPLE_CONSOLE_OUTPUT, "-----BEGIN SSH HOST KEY KEYS-----", *keys, "-----END SSH HOST KEY KEYS-----", ""])
            return general.ActionResult(
                {"InstanceId": instance_id, "Timestamp": general.utcnow(), "Output": general.Base64EncodedString.from_raw_string(text)}
            )

        get_console_output._greenlight = True
        get_console_output._original = original_console
        general.General.get_console_output = get_console_output

        for patched, original in (
            (create_image, original_create_image),
            (describe_instance_health, original_health),
        ):
            patched._greenlight = True
            patched._original = original
        EC2Backend.create_image = create_image
        ELBBackend.describe_instance_health = describe_instance_health

    # -- read side for the sandbox's hosts -------------------------------------

    def instances(self) -> list[InstanceView]:
        ec2 = self._backends()["ec2"]
        views = []
        for instance in ec2.all_instances():
            tags = {t["key"]: t["value"] for t in ec2.describe_tags(filters={"resource-id": [instance.id]})}
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
