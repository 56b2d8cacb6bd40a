"""boto3, behind a small surface the release engine needs.

Clients are built in one place (`client`), with the endpoint from the
caller (an environment's settings, or the sandbox's), so the sandbox and AWS
take exactly the same path. `Cloud` wraps the calls the engine makes: every
mutation is idempotent (it looks before it creates, and treats "already
done" as done), every wait is bounded, every mutation is reported to
`on_mutation` with its AWS request id for the audit trail, and every AWS
error comes out as one AdapterError with a readable message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from .errors import AdapterError

# Bounded: a hung endpoint must fail a step, not hang a worker forever.
_CONFIG = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"})
TAG_RELEASE = "greenlight:release"
TAG_ENVIRONMENT = "greenlight:environment"
TAG_SLOT = "greenlight:slot"
TAG_REVISION = "greenlight:revision"
SANDBOX_CREDENTIALS = ("sandbox", "sandbox")


@dataclass(frozen=True)
class Account:
    region: str
    endpoint_url: str | None = None  # None means AWS itself
    access_key_id: str | None = None  # None means boto3's default chain
    secret_access_key: str | None = None
    profile: str | None = None

    def __repr__(self) -> str:  # never print the keys
        return f"Account(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    @classmethod
    def from_reference(cls, region: str, endpoint_url: str, credentials: str) -> Account:
        """Credentials are a reference, resolved on the worker, never stored keys:
        "" (boto3's default chain), "profile:NAME", "env:PREFIX", or "sandbox"."""
        kind, _, value = credentials.partition(":")
        endpoint = endpoint_url or None
        if not credentials:
            return cls(region, endpoint)
        if kind == "profile" and value:
            return cls(region, endpoint, profile=value)
        if kind == "env" and value:
            key_id = os.environ.get(f"{value}_ACCESS_KEY_ID")
            secret = os.environ.get(f"{value}_SECRET_ACCESS_KEY")
            if not key_id or not secret:
                raise AdapterError(f"{value}_ACCESS_KEY_ID and {value}_SECRET_ACCESS_KEY are not set on this worker")
            return cls(region, endpoint, key_id, secret)
        if credentials == "sandbox":
            return cls(region, endpoint, *SANDBOX_CREDENTIALS)
        raise AdapterError(f"unknown credentials reference {credentials!r}")


def client(account: Account, service: str):
    session = boto3.session.Session(profile_name=account.profile) if account.profile else boto3.session.Session()
    return session.client(
        service,
        region_name=account.region,
        endpoint_url=account.endpoint_url,
        aws_access_key_id=account.access_key_id,
        aws_secret_access_key=account.secret_access_key,
        config=_CONFIG,
    )


def _error(exc: Exception, doing: str) -> AdapterError:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return AdapterError(f"{doing}: {error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": "))
    return AdapterError(f"{doing}: {exc}")


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    state: str
    private_ip: str
    public_dns: str
    name: str
    tags: dict

    def address(self, kind: str) -> str:
        return self.public_dns if kind == "public" and self.public_dns else self.private_ip


def _instance_info(raw: dict) -> InstanceInfo:
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    return InstanceInfo(
        id=raw["InstanceId"],
        state=raw["State"]["Name"],
        private_ip=raw.get("PrivateIpAddress", ""),
        public_dns=raw.get("PublicDnsName", ""),
        name=tags.get("Name", ""),
        tags=tags,
    )


def _tags(tags: dict) -> list[dict]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


Mutation = Callable[[str, str, str], None]  # (action, resource, request id)


class Cloud:
    """EC2 and one load balancer (a classic ELB or an ELBv2 target group)."""

    def __init__(
        self,
        account: Account,
        *,
        load_balancer_name: str = "",
        target_group_arn: str = "",
        on_mutation: Mutation | None = None,
        poll: float = 0.5,
    ):
        self.ec2 = client(account, "ec2")
        self.elb = client(account, "elb") if load_balancer_name else None
        self.elbv2 = client(account, "elbv2") if target_group_arn else None
        self.load_balancer_name = load_balancer_name
        self.target_group_arn = target_group_arn
        self.on_mutation = on_mutation or (lambda action, resource, request_id: None)
        self.poll = poll

    def _mutate(self, action: str, resource: str, call, *args, ok_codes: Iterable[str] = (), **kwargs) -> dict:
        try:
            response = call(*args, **kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ok_codes:
                return {}
            raise _error(exc, f"{action} {resource}") from None
        except (BotoCoreError, ResponseParserError) as exc:
            raise _error(exc, f"{action} {resource}") from None
        self.on_mutation(action, resource, response.get("ResponseMetadata", {}).get("RequestId", ""))
        return response

    def _read(self, doing: str, call, *args, **kwargs) -> dict:
        try:
            return call(*args, **kwargs)
        except (ClientError, BotoCoreError, ResponseParserError) as exc:
            raise _error(exc, doing) from None

    # -- instances -------------------------------------------------------------

    def instances(self, *, ids: Iterable[str] = (), tags: dict | None = None, states: Iterable[str] = ()) -> list[InstanceInfo]:
        filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in (tags or {}).items()]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        kwargs = {"Filters": filters} if filters else {}
        ids = sorted(set(ids))
        if ids:
            kwargs["InstanceIds"] = ids
        response = self._read("describe instances", self.ec2.describe_instances, **kwargs)
        return [_instance_info(i) for r in response["Reservations"] for i in r["Instances"]]

    def launch(
        self,
        *,
        tags: dict,
        identity: dict,
        image_id: str,
        instance_type: str,
        key_name: str,
        subnet_id: str,
        security_group_ids: list[str],
        client_token: str,
    ) -> InstanceInfo:
        """One instance, found by its `identity` tags if an earlier try made it."""
        live = ("pending", "running", "stopping", "stopped")
        found = self.instances(tags=identity, states=live)
        if found:
            return found[0]
        all_tags = {**tags, **identity}
        response = self._mutate(
            "RunInstances",
            image_id,
            self.ec2.run_instances,
            ImageId=image_id,
            InstanceType=instance_type,
            KeyName=key_name,
            SubnetId=subnet_id,
            SecurityGroupIds=security_group_ids,
            MinCount=1,
            MaxCount=1,
            ClientToken=client_token,
            TagSpecifications=[{"ResourceType": "instance", "Tags": _tags(all_tags)}],
        )
        return _instance_info(response["Instances"][0])

    def wait_for_state(self, ids: Iterable[str], state: str, timeout: float = 300) -> list[InstanceInfo]:
        ids = sorted(set(ids))
        deadline = time.monotonic() + timeout
        while True:
            found = self.instances(ids=ids) if ids else []
            if all(i.state == state for i in found) and len(found) == len(ids):
                return found
            if time.monotonic() > deadline:
                states = ", ".join(f"{i.id} {i.state}" for i in found)
                raise AdapterError(f"instances did not reach {state} within {timeout:g}s ({states})")
            time.sleep(self.poll)

    def start(self, ids: Iterable[str]) -> None:
        if ids := list(ids):
            self._mutate("StartInstances", ",".join(ids), self.ec2.start_instances, InstanceIds=ids)
            self.wait_for_state(ids, "running")

    def stop(self, ids: Iterable[str]) -> None:
        if ids := list(ids):
            self._mutate("StopInstances", ",".join(ids), self.ec2.stop_instances, InstanceIds=ids)
            self.wait_for_state(ids, "stopped")

    def terminate(self, ids: Iterable[str]) -> None:
        if ids := list(ids):
            self._mutate("TerminateInstances", ",".join(ids), self.ec2.terminate_instances, InstanceIds=ids)

    def console_host_keys(self, instance_id: str) -> list[str]:
        """The SSH host keys cloud-init printed to the console, if it has yet."""
        output = self._read("get console output", self.ec2.get_console_output, InstanceId=instance_id).get("Output") or ""
        keys, inside = [], False
        for line in output.splitlines():
            if "-----BEGIN SSH HOST KEY KEYS-----" in line:
                inside = True
            elif "-----END SSH HOST KEY KEYS-----" in line:
                inside = False
            elif inside and line.startswith(("ssh-", "ecdsa-")):
                keys.append(" ".join(line.split()[:2]))
        return keys

    # -- images ----------------------------------------------------------------

    def bake(self, instance_id: str, name: str, tags: dict, timeout: float = 1800) -> str:
        """An AMI of the instance, found by name if an earlier try made it."""
        found = self._read("describe images", self.ec2.describe_images, Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        if found:
            image_id = found[0]["ImageId"]
        else:
            image_id = self._mutate(
                "CreateImage",
                instance_id,
                self.ec2.create_image,
                InstanceId=instance_id,
                Name=name,
                TagSpecifications=[{"ResourceType": "image", "Tags": _tags(tags)}],
            )["ImageId"]
        deadline = time.monotonic() + timeout
        while True:
            image = self._read("describe image", self.ec2.describe_images, ImageIds=[image_id])["Images"][0]
            if image["State"] == "available":
                return image_id
            if image["State"] == "failed" or time.monotonic() > deadline:
                raise AdapterError(f"image {image_id} is {image['State']}")
            time.sleep(self.poll)

    # -- security groups -------------------------------------------------------

    def open_port(self, group_id: str, port: int, cidr: str, description: str) -> None:
        self._mutate(
            "AuthorizeSecurityGroupIngress",
            f"{group_id} tcp/{port} from {cidr}",
            self.ec2.authorize_security_group_ingress,
            GroupId=group_id,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": cidr, "Description": description}]}],
            ok_codes=("InvalidPermission.Duplicate",),
        )

    def close_port(self, group_id: str, port: int, cidr: str) -> None:
        self._mutate(
            "RevokeSecurityGroupIngress",
            f"{group_id} tcp/{port} from {cidr}",
            self.ec2.revoke_security_group_ingress,
            GroupId=group_id,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": cidr}]}],
            ok_codes=("InvalidPermission.NotFound",),
        )

    def port_open(self, group_id: str, port: int, cidr: str) -> bool:
        group = self._read("describe security group", self.ec2.describe_security_groups, GroupIds=[group_id])["SecurityGroups"][0]
        return any(
            p.get("FromPort") == port and any(r["CidrIp"] == cidr for r in p.get("IpRanges", []))
            for p in group.get("IpPermissions", [])
        )

    # -- the load balancer -------------------------------------------------------

    @property
    def _lb(self) -> str:
        return self.load_balancer_name or self.target_group_arn

    def registered(self) -> list[str]:
        if self.elb:
            described = self._read("describe load balancer", self.elb.describe_load_balancers, LoadBalancerNames=[self.load_balancer_name])
            # moto lists an instance twice if it was registered twice; AWS never does
            return list(dict.fromkeys(i["InstanceId"] for i in described["LoadBalancerDescriptions"][0]["Instances"]))
        health = self._read("describe target health", self.elbv2.describe_target_health, TargetGroupArn=self.target_group_arn)
        return [t["Target"]["Id"] for t in health["TargetHealthDescriptions"] if t["TargetHealth"]["State"] != "draining"]

    def health(self, ids: Iterable[str] = ()) -> dict[str, str]:
        """Instance id -> "InService" or another state, for registered instances."""
        ids = list(ids)
        if self.elb:
            kwargs = {"Instances": [{"InstanceId": i} for i in ids]} if ids else {}
            states = self._read("describe instance health", self.elb.describe_instance_health, LoadBalancerName=self.load_balancer_name, **kwargs)
            return {s["InstanceId"]: s["State"] for s in states["InstanceStates"]}
        kwargs = {"Targets": [{"Id": i} for i in ids]} if ids else {}
        health = self._read("describe target health", self.elbv2.describe_target_health, TargetGroupArn=self.target_group_arn, **kwargs)
        return {
            t["Target"]["Id"]: "InService" if t["TargetHealth"]["State"] == "healthy" else t["TargetHealth"]["State"]
            for t in health["TargetHealthDescriptions"]
        }

    def register(self, ids: Iterable[str]) -> None:
        registered = set(self.registered())
        self._change_membership([i for i in dict.fromkeys(ids) if i not in registered], register=True)

    def deregister(self, ids: Iterable[str]) -> None:
        self._change_membership(list(dict.fromkeys(ids)), register=False)

    def _change_membership(self, ids: list[str], *, register: bool) -> None:
        if not ids:
            return
        if self.elb:
            call = self.elb.register_instances_with_load_balancer if register else self.elb.deregister_instances_from_load_balancer
            action = "RegisterInstancesWithLoadBalancer" if register else "DeregisterInstancesFromLoadBalancer"
            self._mutate(action, self._lb, call, LoadBalancerName=self.load_balancer_name, Instances=[{"InstanceId": i} for i in ids])
        else:
            call = self.elbv2.register_targets if register else self.elbv2.deregister_targets
            action = "RegisterTargets" if register else "DeregisterTargets"
            self._mutate(action, self._lb, call, TargetGroupArn=self.target_group_arn, Targets=[{"Id": i} for i in ids])

    def draining_timeout(self) -> float:
        if self.elb:
            attributes = self._read("describe load balancer attributes", self.elb.describe_load_balancer_attributes, LoadBalancerName=self.load_balancer_name)
            draining = attributes["LoadBalancerAttributes"].get("ConnectionDraining", {})
            return float(draining.get("Timeout", 300)) if draining.get("Enabled") else 0.0
        attributes = self._read("describe target group attributes", self.elbv2.describe_target_group_attributes, TargetGroupArn=self.target_group_arn)
        values = {a["Key"]: a["Value"] for a in attributes["Attributes"]}
        return float(values.get("deregistration_delay.timeout_seconds", 300))

    def wait_in_service(self, ids: Iterable[str], timeout: float = 300, cancelled: Callable[[], bool] | None = None) -> None:
        ids = list(ids)
        deadline = time.monotonic() + timeout
        while True:
            states = self.health(ids)
            if all(states.get(i) == "InService" for i in ids):
                return
            if cancelled and cancelled():
                raise AdapterError("cancelled while waiting for instances to be in service")
            if time.monotonic() > deadline:
                detail = ", ".join(f"{i} {states.get(i, 'unregistered')}" for i in ids)
                raise AdapterError(f"not in service within {timeout:g}s: {detail}")
            time.sleep(self.poll)


def describe_classic_load_balancer(account: Account, name: str) -> dict:
    """What an existing classic ELB tells about itself and its instances,
    for importing it as an environment."""
    elb, ec2 = client(account, "elb"), client(account, "ec2")
    try:
        lb = elb.describe_load_balancers(LoadBalancerNames=[name])["LoadBalancerDescriptions"][0]
        ids = [i["InstanceId"] for i in lb["Instances"]]
        raw = [i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]] if ids else []
    except (ClientError, BotoCoreError, ResponseParserError) as exc:
        raise _error(exc, f"describe load balancer {name}") from None
    listener = lb["ListenerDescriptions"][0]["Listener"] if lb["ListenerDescriptions"] else {}
    target = lb.get("HealthCheck", {}).get("Target", "")
    return {
        "name": name,
        "dns_name": lb.get("DNSName", ""),
        "instance_port": listener.get("InstancePort"),
        "health_path": "/" + target.split("/", 1)[1] if "/" in target else "",
        "subnets": lb.get("Subnets", []),
        "security_groups": lb.get("SecurityGroups", []),
        "instances": [
            {
                "id": i["InstanceId"],
                "state": i["State"]["Name"],
                "image_id": i.get("ImageId", ""),
                "instance_type": i.get("InstanceType", ""),
                "key_name": i.get("KeyName", ""),
                "subnet_id": i.get("SubnetId", ""),
                "security_groups": [g["GroupId"] for g in i.get("SecurityGroups", [])],
                "address": i.get("PrivateIpAddress", ""),
                "tags": {t["Key"]: t["Value"] for t in i.get("Tags", [])},
            }
            for i in raw
        ],
    }
