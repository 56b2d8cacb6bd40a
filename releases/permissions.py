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


def can_deploy(user) -> bool:
    return has_role(user, roles.DEPLOYER)


def can_approve(user) -> bool:
    return has_role(user, roles.APPROVER)
