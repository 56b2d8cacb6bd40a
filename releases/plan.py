"""The steps and gates of a release, by strategy, frozen onto the release.

The default `bake` strategy is procedure.md step by step. `deploy_from_image`
starts from the environment's last baked AMI, which already carries the
provisioning, so it skips `provision`.
"""

from __future__ import annotations

ACTION, GATE = "action", "gate"

BAKE = (
    ("launch", ACTION),
    ("provision", ACTION),
    ("deploy", ACTION),
    ("open_access", ACTION),
    ("smoke_direct", ACTION),
    ("verify_directly", GATE),
    ("close_access", ACTION),
    ("bake_image", ACTION),
    ("launch_clones", ACTION),
    ("smoke_clones", ACTION),
    ("swap_elb", GATE),
    ("register_new", ACTION),
    ("verify_production", ACTION),
    ("deregister_old", ACTION),
    ("stop_old", ACTION),
)
STRATEGIES = {
    "bake": BAKE,
    "deploy_from_image": tuple(step for step in BAKE if step[0] != "provision"),
}
GATES = {key for key, kind in BAKE if kind == GATE}

# What the engine needs from the environment, copied so that editing the
# environment never changes a release that is under way.
ENVIRONMENT_FIELDS = (
    "name", "region", "aws_endpoint_url", "aws_credentials", "load_balancer_name", "target_group_arn",
    "public_url", "verify_security_group_id", "verify_cidr", "security_group_ids", "app_port", "health_path",
    "expected_text", "ssh_user", "ssh_port", "ssh_key_file", "address", "instance_type", "subnet_id",
    "key_name", "base_ami", "last_baked_ami", "name_prefix", "repository", "gate_timeout", "retention", "four_eyes",
)


class PlanError(ValueError):
    pass


def settings_of(environment) -> dict:
    return {field: getattr(environment, field) for field in ENVIRONMENT_FIELDS}


def freeze(environment, *, strategy: str, revision: str, fleet_size: int) -> dict:
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
        "steps": [{"key": key, "kind": kind} for key, kind in STRATEGIES[strategy]],
    }
