"""The steps and gates of a release, by strategy, frozen onto the release.

The default `bake` strategy is procedure.md step by step. `deploy_from_image`
starts from the environment's last baked AMI, which already carries the
provisioning, so it skips `provision`.

Each entry says what it runs (the action of the same key in `steps`), how it
is undone, and which limits bound its waits, the way Capistrano's phases and
Spinnaker's tasks do. A rollback is the plan reversed: the undo steps of
every entry that started, each once, in that order. The order matters for
zero downtime: the old fleet is back in service (`restore_old`) before the
new one leaves the load balancer (`retire_new`).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTION, GATE, ROLLBACK = "action", "gate", "rollback"


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str = ACTION
    undo: tuple[str, ...] = ()  # rollback steps, in the order they run
    limits: tuple[str, ...] = ()  # what bounds its waits (README: "How long a release may wait")


BAKE = (
    Entry("launch", undo=("stop_new",), limits=("instance_timeout",)),
    Entry("provision", limits=("ssh_timeout", "command_timeout")),
    Entry("deploy", limits=("ssh_timeout", "command_timeout")),
    Entry("open_access", undo=("revoke_access",)),
    Entry("smoke_direct", limits=("smoke_timeout",)),
    Entry("verify_directly", GATE, limits=("gate_timeout",)),
    Entry("close_access"),
    Entry("bake_image", undo=("stop_new", "remove_image"), limits=("instance_timeout", "image_timeout")),
    Entry("launch_clones", undo=("stop_new",), limits=("instance_timeout",)),
    Entry("smoke_clones", limits=("smoke_timeout",)),
    Entry("swap_elb", GATE, limits=("gate_timeout",)),
    Entry("register_new", undo=("restore_old", "retire_new"), limits=("health check",)),
    Entry("verify_production"),
    Entry("deregister_old", undo=("restore_old",), limits=("draining",)),
    Entry("stop_old", undo=("restore_old",), limits=("instance_timeout",)),
)
# What a rollback runs, each step idempotent and cheap when there is nothing to do.
UNDO = (
    Entry("restore_old", ROLLBACK, limits=("instance_timeout", "health check")),  # old started, registered, in service
    Entry("retire_new", ROLLBACK, limits=("draining",)),  # new deregistered and drained
    Entry("stop_new", ROLLBACK, limits=("instance_timeout",)),  # new stopped, never terminated
    Entry("remove_image", ROLLBACK, limits=("image_timeout",)),  # its own image deregistered, snapshots deleted
    Entry("revoke_access", ROLLBACK),  # the verification rule closed
)
ENTRIES = {entry.key: entry for entry in (*BAKE, *UNDO)}
STRATEGIES = {
    "bake": BAKE,
    "deploy_from_image": tuple(entry for entry in BAKE if entry.key != "provision"),
}
GATES = {entry.key for entry in BAKE if entry.kind == GATE}
# Once the old fleet is being stopped, traffic has moved to the new one and the
# old one has drained: the release's work is done, and a cancel would undo a
# finished swap. From this step on a release cannot be cancelled; "Roll back"
# is what undoes it (as in Spinnaker or CodeDeploy, where a finished
# deployment is rolled back, not cancelled).
CANCEL_ENDS_AT = "stop_old"
ROLLBACK_POSITION = 1000  # rollback steps sort after the plan's

# What the engine needs from the environment, copied so that editing the
# environment never changes a release that is under way.
ENVIRONMENT_FIELDS = (
    "name", "region", "aws_endpoint_url", "aws_credentials", "load_balancer_name", "target_group_arn",
    "public_url", "verify_security_group_id", "verify_cidr", "security_group_ids", "app_port", "health_path",
    "expected_text", "ssh_user", "ssh_port", "ssh_key_file", "address", "instance_type", "subnet_id",
    "key_name", "base_ami", "last_baked_ami", "name_prefix", "repository", "gate_timeout", "retention", "four_eyes",
    "approvals_required",  # how many eyes, like four_eyes: a release keeps what it started with (issue 11)
    "instance_timeout", "ssh_timeout", "image_timeout", "smoke_timeout", "command_timeout", "time_scale",
    *(LAUNCH_FIELDS := ("instance_profile", "user_data", "root_volume_size", "root_volume_type", "root_volume_encrypted",
                        "require_imdsv2", "public_ip", "extra_tags", "extra_subnet_ids")),
    *(ACCESS_FIELDS := ("bastion_host", "bastion_port", "bastion_user", "bastion_key_file", "bastion_host_key",
                        "verify_url_template")),
)
# A release frozen before these settings existed launches and connects as it did then.
FROZEN_DEFAULTS = {"instance_profile": "", "user_data": "", "root_volume_size": None, "root_volume_type": "",
                   "root_volume_encrypted": False, "require_imdsv2": False, "public_ip": "subnet", "extra_tags": {},
                   "extra_subnet_ids": [], "bastion_host": "", "bastion_port": 22, "bastion_user": "",
                   "bastion_key_file": "", "bastion_host_key": "", "verify_url_template": ""}
# A release frozen before a limit existed waits as long as the default says.
LIMIT_DEFAULTS = {"instance_timeout": 600, "ssh_timeout": 600, "image_timeout": 3600, "smoke_timeout": 300,
                  "command_timeout": 1800, "time_scale": 1.0}


class PlanError(ValueError):
    pass


def settings_of(environment) -> dict:
    return {field: getattr(environment, field) for field in ENVIRONMENT_FIELDS}


def freeze(environment, *, strategy: str, revision: str, fleet_size: int, installation: str = "") -> dict:
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; choose {' or '.join(STRATEGIES)}")
    if fleet_size < 1:
        raise PlanError("the fleet needs at least one instance")
    settings = settings_of(environment)
    if strategy == "deploy_from_image" and not environment.last_baked_ami:
        raise PlanError(f"{environment.name} has no baked image yet; run a bake release first")
    settings["image"] = environment.last_baked_ami if strategy == "deploy_from_image" else environment.base_ami
    return {
        "strategy": strategy,
        "revision": revision,
        "fleet_size": fleet_size,
        "environment": settings,
        "recipe": environment.recipe.definition,
        "steps": [{"key": entry.key, "kind": entry.kind} for entry in STRATEGIES[strategy]],
        # its AWS resources are named by the release's uuid (releases/identity.py);
        # a plan without this is from before, and names them by the release's id
        "identity": {"installation": installation},
    }


def rollback_steps(started: list[str]) -> list[str]:
    """The undo steps for the plan steps that `started`, in the plan's reverse order."""
    keys: list[str] = []
    for key in reversed(started):
        for undo in ENTRIES[key].undo if key in ENTRIES else ():
            if undo not in keys:
                keys.append(undo)
    return keys
