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


def _names(groups) -> str:
    return ", ".join(sorted(g.name for g in groups))


def deploy_refusal(user, environment, doing: str) -> tuple[str, str] | None:
    """Why `user` may not do `doing` ("starting a release") in `environment`, as (reason, sentence); None when they may."""
    if not can_deploy(user):
        return "role", f"{doing} needs the deployer role"
    groups = list(environment.deploy_groups.all())
    if not _in_any(user, groups):
        return "group", f"{doing} in {environment.name} needs one of the groups {_names(groups)}"
    return None


def deployable(user, environments):
    """The environments of the queryset `environments` where `user` may start a release."""
    from django.db.models import Q

    if not can_deploy(user):
        return environments.none()
    if user.is_superuser:
        return environments
    return environments.filter(Q(deploy_groups=None) | Q(deploy_groups__in=user.groups.all())).distinct()


def gate_refusal(user, release, key: str) -> tuple[str, str] | None:
    """Why `user` may not decide (or take) gate `key` of `release`, as (reason, sentence); None when they may.
    The groups are the environment's as they are now (taking someone out of a group takes effect at once);
    four eyes is the release's, frozen in its plan."""
    if not can_approve(user):
        return "role", "deciding a gate needs the approver role"
    groups = gate_groups(release.environment, key)
    if not _in_any(user, groups):
        return "group", f"deciding {key} in {release.environment.name} needs one of the groups {_names(groups)}"
    if release.plan.get("environment", {}).get("four_eyes") and release.requested_by_id == user.pk:
        return "four_eyes", f"four eyes: {user.get_username()} started this release, so someone else decides its gates"
    return None


def gate_deciders(environment, key: str):
    """The active people who may decide gate `key` of `environment` (four eyes aside): for a warning
    when a gate needs more approvals than that."""
    from django.contrib.auth import get_user_model
    from django.db.models import Q

    from . import roles

    people = get_user_model().objects.filter(is_active=True)
    approvers = Q(is_superuser=True) | Q(groups__name=roles.APPROVER)
    groups = gate_groups(environment, key)
    if groups:
        people = people.filter(Q(is_superuser=True) | Q(groups__in=groups))
    return people.filter(approvers).distinct()


def approvals_required(release) -> int:
    """Distinct approvals each gate of `release` needs: frozen in its plan, like four eyes (1 for a plan from before)."""
    return release.plan.get("environment", {}).get("approvals_required") or 1
