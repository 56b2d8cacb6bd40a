"""Who may do what. Roles are groups; superusers hold every role."""

from __future__ import annotations

from . import roles


def has_role(user, *names: str) -> bool:
    if not user.is_authenticated:
        return False
    if user.is_superuser:
        return True
    return user.groups.filter(name__in=names).exists()


def can_view(user) -> bool:
    return has_role(user, *roles.ALL)


def can_configure(user) -> bool:
    """May open an environment's form at all: a maintainer, or a deployer for the harmless fields."""
    return has_role(user, roles.DEPLOYER, roles.MAINTAINER)


def can_deploy(user) -> bool:
    return has_role(user, roles.DEPLOYER)


def can_approve(user) -> bool:
    return has_role(user, roles.APPROVER)


# What a deployer may change on an environment: the fleet's size and how long
# to wait. Every other field changes what runs where (endpoints, credentials,
# repository, recipe, SSH, images, network), or who decides (four eyes), or
# when the way back goes (retention): those need a maintainer.
ENVIRONMENT_DEPLOYER_FIELDS = frozenset({
    "desired_count", "gate_timeout", "instance_timeout", "ssh_timeout", "image_timeout", "smoke_timeout", "command_timeout",
})


def can_maintain(user) -> bool:
    """Recipes and an environment's sensitive fields: code that runs on the
    workers, where it runs, and who decides, are an administrator's decision."""
    return has_role(user, roles.MAINTAINER)


# -- per environment (issue 11): an environment's groups narrow a global role, never widen it
GATE_GROUPS = {"verify_directly": "verify_groups", "swap_elb": "swap_groups"}


def _in_any(user, groups) -> bool:
    groups = list(groups)
    return not groups or user.is_superuser or user.groups.filter(pk__in=[g.pk for g in groups]).exists()


def gate_groups(environment, key: str) -> list:
    """The groups that may decide gate `key` of `environment`; empty: every approver."""
    return list(getattr(environment, GATE_GROUPS[key]).all()) if key in GATE_GROUPS else []


def may_deploy_in(user, environment) -> bool:
    """Start, cancel, retry, roll back here: a deployer, in one of the environment's deploy groups if it names any."""
    return can_deploy(user) and _in_any(user, environment.deploy_groups.all())


def may_decide_gate(user, environment, key: str) -> bool:
    """Decide (or take) gate `key` here: an approver, in one of the gate's groups if the environment names any.
    Four eyes and the number of approvals are the services' to check: they depend on the release."""
    return can_approve(user) and _in_any(user, gate_groups(environment, key))
