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

import functools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from . import failpoints
from .errors import AdapterError

# Bounded: a hung endpoint must fail a step, not hang a worker forever.
_CONFIG = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"})
TAG_RELEASE = "greenlight:release"  # the release's uuid (a plain id for releases made before uuids)
TAG_RELEASE_NUMBER = "greenlight:release-number"  # its id, for people
TAG_INSTALLATION = "greenlight:installation"
TAG_ENVIRONMENT = "greenlight:environment"
TAG_SLOT = "greenlight:slot"
TAG_REVISION = "greenlight:revision"
TAG_DEREGISTERED_IMAGE = "greenlight:deregistered-image"  # on a snapshot whose image the clean-up deregisters
SANDBOX_CREDENTIALS = ("sandbox", "sandbox")
SANDBOX_REGION = "us-west-1"  # the sandbox's own (deployer/sandbox/runner.py), whatever botocore lists
# An access key id (long-term AKIA, temporary ASIA): a value shaped so is a key, never a reference to one.
ACCESS_KEY_ID = re.compile(r"(?:AKIA|ASIA)[A-Z0-9]{16}")


def looks_like_access_key(value: str) -> bool:
    return bool(value) and ACCESS_KEY_ID.search(value) is not None


@functools.cache
def ec2_regions() -> frozenset[str]:
    """Every EC2 region botocore knows, in every partition (aws, aws-cn,
    aws-us-gov, ...): read from botocore's own data, with no request."""
    session = boto3.session.Session()
    return frozenset({SANDBOX_REGION}.union(*(session.get_available_regions("ec2", partition_name=partition)
                                              for partition in session.get_available_partitions())))


@dataclass(frozen=True)
class Account:
    region: str
    endpoint_url: str | None = None  # None means AWS itself
    access_key_id: str | None = None  # None means boto3's default chain
    secret_access_key: str | None = None
    profile: str | None = None
    session_token: str | None = None  # with temporary keys

    def __repr__(self) -> str:  # never print the keys
        return f"Account(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    @classmethod
    def from_reference(cls, region: str, endpoint_url: str, credentials: str) -> Account:
        """Credentials are a reference, resolved on the worker, never stored keys:
        "" (boto3's default chain), "profile:NAME", "env:PREFIX" (PREFIX_ACCESS_KEY_ID,
        PREFIX_SECRET_ACCESS_KEY and, for temporary keys, PREFIX_SESSION_TOKEN), or "sandbox"."""
        if looks_like_access_key(credentials):
            raise AdapterError("the credentials reference holds an access key id (not shown): store a reference, "
                               'such as "profile:NAME" or "env:PREFIX", never the keys')
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
            return cls(region, endpoint, key_id, secret, session_token=os.environ.get(f"{value}_SESSION_TOKEN") or None)
        if credentials == "sandbox":
            return cls(region, endpoint, *SANDBOX_CREDENTIALS)
        # never echoed: a person may have pasted a key here
        raise AdapterError('the credentials reference is not one of "", "profile:NAME", "env:PREFIX" or "sandbox" '
                           "(it is not shown: it may be a key)")


def credential_values(account: Account) -> list[str]:
    """The account's secret values, for redaction: its keys, or what its
    profile resolves to. boto3's default chain is left alone here (resolving
    it may ask the instance metadata service); its environment variables are
    among the worker's own secrets anyway."""
    if account.profile:
        try:
            return [v for v in _profile_keys(account.profile) if v]
        except Exception:  # a profile that does not resolve fails the first call, with the reason
            return []
    return [v for v in (account.access_key_id, account.secret_access_key, account.session_token) if v]


def _profile_keys(profile: str) -> tuple[str, str, str | None]:
    """What a named profile resolves to on this worker: key id, secret, session token."""
    try:
        found = boto3.session.Session(profile_name=profile).get_credentials()
        frozen = found.get_frozen_credentials() if found else None
    except BotoCoreError as exc:
        raise _error(exc, f"reading the credentials of profile {profile}") from None
    if not frozen or not frozen.access_key or not frozen.secret_key:
        raise AdapterError(f"profile {profile} has no credentials on this worker")
    return frozen.access_key, frozen.secret_key, frozen.token


_sessions: dict[str | None, boto3.session.Session] = {}
_sessions_lock = threading.Lock()


def _forget_sessions() -> None:  # in a forked child (a worker's pool process): its own sessions, a free lock
    global _sessions_lock
    _sessions.clear()
    _sessions_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_sessions)


def client(account: Account, service: str):
    """A client of the account's, from the process's one session for its
    profile (or for none). A new session loads the service's model from disk
    again: about 0.4 s of CPU a step (a step's cloud has two clients), against
    about 20 ms for a client of a session that has it. A session is not
    thread-safe, so clients are made under a lock; a client is, once made."""
    with _sessions_lock:
        session = _sessions.get(account.profile)
        if session is None:
            session = _sessions[account.profile] = (boto3.session.Session(profile_name=account.profile) if account.profile
                                                    else boto3.session.Session())
        made = session.client(
            service,
            region_name=account.region,
            endpoint_url=account.endpoint_url,
            aws_access_key_id=account.access_key_id,
            aws_secret_access_key=account.secret_access_key,
            aws_session_token=account.session_token,
            config=_CONFIG,
        )
    if record_to := os.environ.get(RECORD_CALLS):
        made.meta.events.register("before-parameter-build", _Recorder(record_to, made.meta.service_model.signing_name))
    return made


# The name of an environment variable: when it names a file, every AWS call
# this process makes is appended to it as an IAM action ("ec2:RunInstances"),
# with the actions IAM authorizes beside it (tags on create, passing a role).
# The test that keeps docs/iam-policy.json true sets it; nothing else does.
RECORD_CALLS = "GREENLIGHT_RECORD_AWS_CALLS"


class _Recorder:
    def __init__(self, path: str, service: str):
        self.path, self.service = path, service

    def __call__(self, model, params, **_):
        actions = [f"{self.service}:{model.name}"]
        if params.get("TagSpecifications"):
            actions.append("ec2:CreateTags")  # IAM authorizes tagging on create as CreateTags
        if params.get("IamInstanceProfile"):
            actions.append("iam:PassRole")  # an instance profile hands its role to the instance
        with open(self.path, "a") as file:  # one short write per call: lines from several processes stay whole
            file.write("".join(f"{action}\n" for action in actions))


def task_environment(account: Account) -> dict[str, str]:
    """The variables a recipe's local task that declares `"aws": true` gets:
    the account's own keys, region and endpoint, resolved here on the worker.

    Never the worker's own credentials: an account on boto3's default chain
    (the worker's environment, its ~/.aws, its instance role) is refused, and
    a profile is resolved to its keys, so the task needs no file of ours."""
    if account.profile:
        key_id, secret, token = _profile_keys(account.profile)
    elif account.access_key_id and account.secret_access_key:
        key_id, secret, token = account.access_key_id, account.secret_access_key, account.session_token
    else:
        raise AdapterError("a task that declares aws gets the environment's own credentials, and this environment uses "
                           "the worker's default credential chain: give it a credentials reference (profile:NAME or env:PREFIX)")
    variables = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": account.region}
    if token:
        variables["AWS_SESSION_TOKEN"] = token
    if account.endpoint_url:
        variables["AWS_ENDPOINT_URL"] = account.endpoint_url
    return variables


# AWS's codes for "no such thing", and what the thing is called for people
MISSING = {
    "InvalidAMIID.NotFound": "image", "InvalidAMIID.Malformed": "image",
    "InvalidGroup.NotFound": "security group", "InvalidGroupId.Malformed": "security group",
    "InvalidKeyPair.NotFound": "key pair", "InvalidSubnetID.NotFound": "subnet",
    "LoadBalancerNotFound": "load balancer", "TargetGroupNotFound": "target group",
    "NoSuchEntity": "instance profile",
}


def _error(exc: Exception, doing: str, names: dict[str, str] | None = None) -> AdapterError:
    """A short message: AWS's error code and message, never a response body
    (what answered may not be AWS, and its page is not for people to read).
    `names`: what the call was given, by kind ("image": "ami-..."), so that a
    thing AWS does not know is named in words, not in AWS's own formats."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        kind = MISSING.get(error.get("Code", ""))
        if kind and names and names.get(kind):
            named = names[kind].split(", ")
            # of several groups, the ones AWS's message names (AWS and moto both quote the id)
            named = [n for n in named if n in str(error.get("Message", ""))] or named
            return AdapterError(f"the {kind} {', '.join(named)} does not exist ({doing}: {error['Code']})")
        return AdapterError(f"{doing}: {error.get('Code', 'error')}: {str(error.get('Message', ''))[:300]}".rstrip(": "))
    if isinstance(exc, ResponseParserError):
        return AdapterError(f"{doing}: the endpoint did not answer like AWS")
    return AdapterError(f"{doing}: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}")


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    state: str
    private_ip: str
    public_dns: str
    name: str
    tags: dict
    public_ip: str = ""
    image_id: str = ""

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
        public_ip=raw.get("PublicIpAddress", ""),
        image_id=raw.get("ImageId", ""),
    )


def _tags(tags: dict) -> list[dict]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


@dataclass(frozen=True)
class LaunchOptions:
    """What RunInstances gets beside the image, type, key, network and tags.
    The defaults ask for nothing: AWS's, the image's and the subnet's own."""

    instance_profile: str = ""  # a name, or an ARN (arn:aws:iam::...:instance-profile/NAME)
    user_data: str = ""
    root_volume_size: int | None = None  # GiB
    root_volume_type: str = ""  # "": the image's own
    root_volume_encrypted: bool = False  # False: as the image (or the account's default) says
    require_imdsv2: bool = False
    public_ip: str = "subnet"  # "subnet": as the subnet says; "yes" or "no"
    extra_tags: dict = field(default_factory=dict)

    def root_volume(self) -> dict:
        """The root volume's mapping (its Ebs part), only what is set; {} to leave it as the image has it."""
        ebs: dict = {}
        if self.root_volume_size:
            ebs["VolumeSize"] = self.root_volume_size
        if self.root_volume_type:
            ebs["VolumeType"] = self.root_volume_type
        if self.root_volume_encrypted:
            ebs["Encrypted"] = True
        if ebs:
            ebs["DeleteOnTermination"] = True  # a root volume never outlives its instance
        return ebs


def run_instances_request(*, tags: dict, identity: dict, image_id: str, instance_type: str, key_name: str,
                          subnet_id: str, security_group_ids: list[str], client_token: str, options: LaunchOptions,
                          root_device: str = "", root_snapshot: str = "") -> dict:
    """RunInstances' parameters. With the default options, exactly those of a
    launch before the options existed (a release frozen then launches as it did)."""
    request = {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "KeyName": key_name,
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": client_token,
        # Greenlight's own tags and Name win over an extra tag of the same key
        "TagSpecifications": [{"ResourceType": "instance", "Tags": _tags({**options.extra_tags, **tags, **identity})}],
    }
    if options.public_ip in ("yes", "no"):
        # a public address is asked of the primary network interface, which then carries the subnet and groups
        request["NetworkInterfaces"] = [{"DeviceIndex": 0, "SubnetId": subnet_id, "Groups": security_group_ids,
                                         "AssociatePublicIpAddress": options.public_ip == "yes",
                                         "DeleteOnTermination": True}]
    else:
        request["SubnetId"] = subnet_id
        request["SecurityGroupIds"] = security_group_ids
    if profile := options.instance_profile:
        request["IamInstanceProfile"] = {"Arn": profile} if profile.startswith("arn:") else {"Name": profile}
    if options.user_data:
        request["UserData"] = options.user_data  # boto3 base64-encodes it
    if ebs := options.root_volume():
        # the image's own snapshot, named again: AWS assumes it, moto needs it said
        snapshot = {"SnapshotId": root_snapshot} if root_snapshot else {}
        request["BlockDeviceMappings"] = [{"DeviceName": root_device, "Ebs": {**snapshot, **ebs}}]
    if options.require_imdsv2:
        request["MetadataOptions"] = {"HttpTokens": "required", "HttpEndpoint": "enabled"}
    return request


Mutation = Callable[[str, str, str], None]  # (action, resource, request id)


@dataclass(frozen=True)
class HealthCheck:
    """A load balancer's own health-check settings, in its seconds."""

    interval: float
    timeout: float
    healthy_threshold: int
    unhealthy_threshold: int

    @property
    def time_to_healthy(self) -> float:
        """How long a healthy new instance takes to be called healthy, at best."""
        return self.interval * self.healthy_threshold


# EC2 is eventually consistent: an id just created may be unknown for a few
# seconds. A call about it that answers one of these is tried again.
NOT_YET_VISIBLE = ("InvalidInstanceID.NotFound", "InvalidAMIID.NotFound", "InvalidInstance", "InvalidTarget")
VISIBILITY_RETRIES = (0.5, 1, 2, 4, 8)  # seconds between tries: about 15 s in all


class Cloud:
    """EC2 and one load balancer (a classic ELB or an ELBv2 target group).

    Nothing here waits: callers ask for states and decide when to ask again,
    so a wait on AWS never holds a worker.
    """

    def __init__(
        self,
        account: Account,
        *,
        load_balancer_name: str = "",
        target_group_arn: str = "",
        on_mutation: Mutation | None = None,
        before_mutation: Callable[[str, str], None] | None = None,
    ):
        self.account = account
        self.ec2 = client(account, "ec2")
        self.elb = client(account, "elb") if load_balancer_name else None
        self.elbv2 = client(account, "elbv2") if target_group_arn else None
        self.load_balancer_name = load_balancer_name
        self.target_group_arn = target_group_arn
        self.on_mutation = on_mutation or (lambda action, resource, request_id: None)
        # (action, resource) before every try of a mutation; it may raise to stop the call
        # (the engine's fence: a worker that lost its lease must not change anything)
        self.before_mutation = before_mutation

    def _mutate(self, action: str, resource: str, call, *args, ok_codes: Iterable[str] = (), names: dict | None = None,
                **kwargs) -> dict:
        for pause in (*VISIBILITY_RETRIES, None):
            if self.before_mutation is not None:
                self.before_mutation(action, resource)
            try:
                response = call(*args, **kwargs)
                break
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ok_codes:
                    return {}
                if code in NOT_YET_VISIBLE and pause is not None:
                    time.sleep(pause)
                    continue
                raise _error(exc, f"{action} {resource}", names) from None
            except (BotoCoreError, ResponseParserError) as exc:
                raise _error(exc, f"{action} {resource}") from None
        failpoints.reached(f"aws:{action}")
        self.on_mutation(action, resource, response.get("ResponseMetadata", {}).get("RequestId", ""))
        return response

    def _read(self, doing: str, call, *args, names: dict | None = None, **kwargs) -> dict:
        try:
            return call(*args, **kwargs)
        except (ClientError, BotoCoreError, ResponseParserError) as exc:
            raise _error(exc, doing, {**self._names, **(names or {})}) from None

    @property
    def _names(self) -> dict[str, str]:
        return {"load balancer": self.load_balancer_name, "target group": self.target_group_arn}

    def _pages(self, doing: str, client, operation: str, key: str, **kwargs) -> list:
        try:
            return [item for page in client.get_paginator(operation).paginate(**kwargs) for item in page[key]]
        except (ClientError, BotoCoreError, ResponseParserError) as exc:
            raise _error(exc, doing) from None

    # -- instances -------------------------------------------------------------

    def instances(self, *, ids: Iterable[str] = (), tags: dict | None = None, states: Iterable[str] = (),
                  image_ids: Iterable[str] = ()) -> list[InstanceInfo]:
        """What EC2 reports now. An id it does not know (yet) is left out rather
        than failing the call: ids go in as a filter, never as InstanceIds."""
        filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in (tags or {}).items()]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        if image_ids := sorted(set(image_ids)):
            filters.append({"Name": "image-id", "Values": image_ids})
        ids = sorted(set(ids))
        if ids:
            filters.append({"Name": "instance-id", "Values": ids})
        kwargs = {"Filters": filters} if filters else {}
        reservations = self._pages("describe instances", self.ec2, "describe_instances", "Reservations", **kwargs)
        return [_instance_info(i) for r in reservations for i in r["Instances"]]

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
        options: LaunchOptions | None = None,
    ) -> tuple[InstanceInfo, bool]:
        """One instance, and whether this call launched it: False when it was
        found by its `identity` tags, made by an earlier try.

        The client token makes AWS itself return the first instance to a
        repeated call, which covers the seconds in which a new instance is not
        yet found by its tags."""
        live = ("pending", "running", "stopping", "stopped")
        found = self.instances(tags=identity, states=live)
        if found:
            return found[0], False
        options = options or LaunchOptions()
        root_device, root_snapshot = self._root_device(image_id) if options.root_volume() else ("", "")
        response = self._mutate(
            "RunInstances",
            image_id,
            self.ec2.run_instances,
            **run_instances_request(
                tags=tags, identity=identity, image_id=image_id, instance_type=instance_type, key_name=key_name,
                subnet_id=subnet_id, security_group_ids=security_group_ids, client_token=client_token, options=options,
                root_device=root_device, root_snapshot=root_snapshot),
            names={"image": image_id, "security group": ", ".join(security_group_ids), "key pair": key_name,
                   "subnet": subnet_id, "instance profile": options.instance_profile},
        )
        return _instance_info(response["Instances"][0]), True

    def _root_device(self, image_id: str) -> tuple[str, str]:
        """The device name of an image's root volume, which a mapping must name
        to change it, and the snapshot the image makes it from."""
        images = self._read(f"describe image {image_id}", self.ec2.describe_images, ImageIds=[image_id],
                            names={"image": image_id})["Images"]
        if not images or not images[0].get("RootDeviceName"):
            raise AdapterError(f"the image {image_id} names no root device, so its root volume cannot be changed")
        device = images[0]["RootDeviceName"]
        mapping = next((m for m in images[0].get("BlockDeviceMappings", []) if m.get("DeviceName") == device), {})
        return device, mapping.get("Ebs", {}).get("SnapshotId", "")

    def start(self, ids: Iterable[str]) -> None:
        if ids := list(ids):
            self._mutate("StartInstances", ",".join(ids), self.ec2.start_instances, InstanceIds=ids)

    def stop(self, ids: Iterable[str]) -> None:
        if ids := list(ids):
            self._mutate("StopInstances", ",".join(ids), self.ec2.stop_instances, InstanceIds=ids)

    def terminate(self, ids: Iterable[str]) -> None:
        if ids := list(ids):
            self._mutate("TerminateInstances", ",".join(ids), self.ec2.terminate_instances, InstanceIds=ids)

    def console_host_keys(self, instance_id: str) -> list[str]:
        """The SSH host keys cloud-init printed to the console, if it has yet
        (none while the instance is too new for EC2 to know it)."""
        try:
            output = self.ec2.get_console_output(InstanceId=instance_id).get("Output") or ""
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_YET_VISIBLE:
                return []
            raise _error(exc, f"get console output of {instance_id}") from None
        except (BotoCoreError, ResponseParserError) as exc:
            raise _error(exc, f"get console output of {instance_id}") from None
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

    def image_named(self, name: str) -> dict | None:
        images = self._pages("describe images", self.ec2, "describe_images", "Images", Owners=["self"],
                             Filters=[{"Name": "name", "Values": [name]}])
        return images[0] if images else None

    def images(self, *, tags: dict, tag_keys: Iterable[str] = ()) -> list[dict]:
        """This account's own images with these tags (and tag keys), as DescribeImages shows them."""
        filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in tags.items()]
        filters += [{"Name": "tag-key", "Values": [key]} for key in tag_keys]
        return self._pages("describe images", self.ec2, "describe_images", "Images", Owners=["self"], Filters=filters)

    def snapshots_tagged(self, key: str) -> list[dict]:
        """This account's own snapshots that carry the tag `key`."""
        return self._pages("describe snapshots", self.ec2, "describe_snapshots", "Snapshots", OwnerIds=["self"],
                           Filters=[{"Name": "tag-key", "Values": [key]}])

    def tag(self, resource_ids: Iterable[str], tags: dict) -> None:
        if resource_ids := list(resource_ids):
            self._mutate("CreateTags", ",".join(resource_ids), self.ec2.create_tags, Resources=resource_ids,
                         Tags=_tags(tags))

    def create_image(self, instance_id: str, name: str, tags: dict) -> str:
        """An AMI of the instance, found by name if an earlier try made it."""
        if found := self.image_named(name):
            return found["ImageId"]
        return self._mutate(
            "CreateImage",
            instance_id,
            self.ec2.create_image,
            InstanceId=instance_id,
            Name=name,
            TagSpecifications=[{"ResourceType": "image", "Tags": _tags(tags)}],
        )["ImageId"]

    def image(self, image_id: str) -> dict | None:
        """The image as DescribeImages shows it; None while EC2 does not list
        it yet, or once it is deregistered."""
        images = self._pages("describe image", self.ec2, "describe_images", "Images",
                             Filters=[{"Name": "image-id", "Values": [image_id]}])
        return images[0] if images else None

    def image_state(self, image_id: str) -> str:
        """pending, available, failed...; "unknown" while EC2 does not list it yet."""
        found = self.image(image_id)
        return found["State"] if found else "unknown"

    @staticmethod
    def image_snapshots(image: dict) -> list[str]:
        """The EBS snapshots an image is made of (they outlive its deregistration)."""
        return [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")]

    def deregister_image(self, image_id: str) -> None:
        """Deregistered; one already gone counts as done."""
        self._mutate("DeregisterImage", image_id, self.ec2.deregister_image, ImageId=image_id,
                     ok_codes=("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"))

    def delete_snapshots(self, snapshot_ids: Iterable[str]) -> list[str]:
        """Deletes each snapshot; one already gone counts as done. Returns
        those EC2 says are still in use (by an image), which are left alone."""
        in_use = []
        for snapshot_id in snapshot_ids:
            try:
                self._mutate("DeleteSnapshot", snapshot_id, self.ec2.delete_snapshot, SnapshotId=snapshot_id,
                             ok_codes=("InvalidSnapshot.NotFound",))
            except AdapterError as exc:
                if "InvalidSnapshot.InUse" not in str(exc):
                    raise
                in_use.append(snapshot_id)
        return in_use

    # -- preflight: reads, and DryRun calls that change nothing --------------------

    def zones(self) -> list[str]:
        """The region's availability zones that are available: a read that fails for a region that is not there."""
        found = self._read("describe availability zones", self.ec2.describe_availability_zones)["AvailabilityZones"]
        return [z["ZoneName"] for z in found if z.get("State", "available") == "available"]

    def subnets(self, ids: list[str]) -> list[dict]:
        return self._read("describe subnets", self.ec2.describe_subnets, SubnetIds=ids)["Subnets"] if ids else []

    def security_groups(self, ids: list[str]) -> list[dict]:
        if not ids:
            return []
        return self._read("describe security groups", self.ec2.describe_security_groups, GroupIds=ids)["SecurityGroups"]

    def key_pair(self, name: str) -> dict:
        return self._read("describe key pair", self.ec2.describe_key_pairs, KeyNames=[name])["KeyPairs"][0]

    def permitted(self, action: str, **params) -> str:
        """Whether these credentials may call `action` with `params`, asked
        with DryRun=True, so nothing is made, changed or stopped: "" when
        allowed, else what AWS said (UnauthorizedOperation: not allowed)."""
        call = getattr(self.ec2, _snake(action))
        try:
            call(DryRun=True, **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") == "DryRunOperation":
                return ""
            return _error(exc, f"{action} (DryRun)").args[0]
        except (BotoCoreError, ResponseParserError) as exc:
            return _error(exc, f"{action} (DryRun)").args[0]
        return f"{action} (DryRun): the endpoint ran the call instead of only checking it"

    def launch_request(self, *, image_id: str, instance_type: str, key_name: str, subnet_id: str,
                       security_group_ids: list[str], tags: dict, options: LaunchOptions | None = None) -> dict:
        """RunInstances' parameters exactly as a release's launch sends them
        (launch settings included), for a DryRun; no client token."""
        options = options or LaunchOptions()
        root_device, root_snapshot = self._root_device(image_id) if options.root_volume() else ("", "")
        request = run_instances_request(
            tags=tags, identity={}, image_id=image_id, instance_type=instance_type, key_name=key_name,
            subnet_id=subnet_id, security_group_ids=security_group_ids, client_token="", options=options,
            root_device=root_device, root_snapshot=root_snapshot)
        request.pop("ClientToken")
        return request

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

    def _classic(self) -> dict:
        described = self._read("describe load balancer", self.elb.describe_load_balancers, LoadBalancerNames=[self.load_balancer_name])
        return described["LoadBalancerDescriptions"][0]

    def _target_health(self, ids: list[str] = ()) -> list[dict]:
        kwargs = {"Targets": [{"Id": i} for i in ids]} if ids else {}
        health = self._read("describe target health", self.elbv2.describe_target_health, TargetGroupArn=self.target_group_arn, **kwargs)
        return health["TargetHealthDescriptions"]

    def registered(self) -> list[str]:
        """Instances the load balancer sends (or will send) traffic to; not the draining ones."""
        if self.elb:
            # moto lists an instance twice if it was registered twice; AWS never does
            return list(dict.fromkeys(i["InstanceId"] for i in self._classic()["Instances"]))
        leaving = ("draining", "unused")
        return list(dict.fromkeys(t["Target"]["Id"] for t in self._target_health() if t["TargetHealth"]["State"] not in leaving))

    def health(self, ids: Iterable[str] = ()) -> dict[str, str]:
        """Instance id -> "InService" or another state, for registered instances."""
        ids = list(ids)
        if self.elb:
            kwargs = {"Instances": [{"InstanceId": i} for i in ids]} if ids else {}
            states = self._read("describe instance health", self.elb.describe_instance_health, LoadBalancerName=self.load_balancer_name, **kwargs)
            return {s["InstanceId"]: s["State"] for s in states["InstanceStates"]}
        return {
            t["Target"]["Id"]: "InService" if t["TargetHealth"]["State"] == "healthy" else t["TargetHealth"]["State"]
            for t in self._target_health(ids)
        }

    def health_check(self) -> HealthCheck:
        if self.elb:
            check = self._classic().get("HealthCheck", {})
            return HealthCheck(float(check.get("Interval", 30)), float(check.get("Timeout", 5)),
                               int(check.get("HealthyThreshold", 10)), int(check.get("UnhealthyThreshold", 2)))
        groups = self._read("describe target group", self.elbv2.describe_target_groups, TargetGroupArns=[self.target_group_arn])
        group = groups["TargetGroups"][0]
        return HealthCheck(float(group.get("HealthCheckIntervalSeconds", 30)), float(group.get("HealthCheckTimeoutSeconds", 5)),
                           int(group.get("HealthyThresholdCount", 5)), int(group.get("UnhealthyThresholdCount", 2)))

    def draining(self, ids: Iterable[str]) -> list[str] | None:
        """Of `ids`, those still draining; None when the load balancer cannot
        tell (a classic ELB: wait out its draining timeout instead)."""
        if self.elb or not (ids := list(ids)):
            return None if self.elb else []
        return [t["Target"]["Id"] for t in self._target_health(ids) if t["TargetHealth"]["State"] == "draining"]

    def register(self, ids: Iterable[str]) -> list[str]:
        """Registers what is not registered yet; returns those ids."""
        registered = set(self.registered())
        missing = [i for i in dict.fromkeys(ids) if i not in registered]
        self._change_membership(missing, register=True)
        return missing

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
        """Seconds the load balancer lets a deregistered instance finish its requests."""
        if self.elb:
            attributes = self._read("describe load balancer attributes", self.elb.describe_load_balancer_attributes, LoadBalancerName=self.load_balancer_name)
            draining = attributes["LoadBalancerAttributes"].get("ConnectionDraining", {})
            return float(draining.get("Timeout", 300)) if draining.get("Enabled") else 0.0
        attributes = self._read("describe target group attributes", self.elbv2.describe_target_group_attributes, TargetGroupArn=self.target_group_arn)
        values = {a["Key"]: a["Value"] for a in attributes["Attributes"]}
        return float(values.get("deregistration_delay.timeout_seconds", 300))


def _snake(action: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in action).lstrip("_")


def caller_identity(account: Account) -> dict:
    """Whose credentials these are: {"Account", "Arn", "UserId"}."""
    try:
        found = client(account, "sts").get_caller_identity()
    except (ClientError, BotoCoreError, ResponseParserError) as exc:
        raise _error(exc, "get caller identity") from None
    return {key: found.get(key, "") for key in ("Account", "Arn", "UserId")}


def instance_profile(account: Account, name_or_arn: str) -> dict:
    """An IAM instance profile (by name, or by ARN: its last path segment) and its roles."""
    name = name_or_arn.rsplit("/", 1)[-1]
    try:
        profile = client(account, "iam").get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchEntity":
            raise AdapterError(f"the instance profile {name} does not exist (get instance profile: NoSuchEntity)") from None
        raise _error(exc, f"get instance profile {name}") from None
    except (BotoCoreError, ResponseParserError) as exc:
        raise _error(exc, f"get instance profile {name}") from None
    return {"name": profile["InstanceProfileName"], "arn": profile["Arn"],
            "roles": [role["RoleName"] for role in profile.get("Roles", [])]}


def _imported(raw: dict) -> dict:
    """An instance as an import shows it: what a new environment copies from it."""
    return {
        "id": raw["InstanceId"],
        "state": raw["State"]["Name"],
        "image_id": raw.get("ImageId", ""),
        "instance_type": raw.get("InstanceType", ""),
        "key_name": raw.get("KeyName", ""),
        "subnet_id": raw.get("SubnetId", ""),
        "security_groups": [g["GroupId"] for g in raw.get("SecurityGroups", [])],
        "address": raw.get("PrivateIpAddress", ""),
        "tags": {t["Key"]: t["Value"] for t in raw.get("Tags", [])},
    }


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
        "instances": [_imported(i) for i in raw],
    }


def describe_target_group(account: Account, arn: str) -> dict:
    """What an existing ELBv2 target group tells about itself, its load
    balancer and its registered instances, for importing it as an
    environment; the same shape as describe_classic_load_balancer's."""
    elbv2, ec2 = client(account, "elbv2"), client(account, "ec2")
    try:
        group = elbv2.describe_target_groups(TargetGroupArns=[arn])["TargetGroups"][0]
        lb_arns = group.get("LoadBalancerArns", [])
        lbs = elbv2.describe_load_balancers(LoadBalancerArns=lb_arns[:1])["LoadBalancers"] if lb_arns else []
        health = elbv2.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
        # draining targets are on their way out; what stays is what the environment runs
        states = {t["Target"]["Id"]: t["TargetHealth"]["State"] for t in health if t["TargetHealth"]["State"] != "draining"}
        ids = list(states)
        raw = [i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]] if ids else []
    except (ClientError, BotoCoreError, ResponseParserError) as exc:
        raise _error(exc, f"describe target group {arn}") from None
    lb = lbs[0] if lbs else {}
    return {
        "name": group["TargetGroupName"],
        "target_group_arn": group["TargetGroupArn"],
        "load_balancer_name": lb.get("LoadBalancerName", ""),
        "dns_name": lb.get("DNSName", ""),
        "vpc_id": group.get("VpcId", ""),
        "instance_port": group.get("Port"),
        "health_path": group.get("HealthCheckPath", ""),
        "subnets": [zone["SubnetId"] for zone in lb.get("AvailabilityZones", []) if zone.get("SubnetId")],
        "security_groups": lb.get("SecurityGroups", []),
        "instances": [{**_imported(i), "health": states.get(i["InstanceId"], "")} for i in raw],
    }
