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
