"""Every change a person makes: create, approve, reject, cancel, retry, roll back.

Each service checks the current state first and raises one ServiceError
(with the HTTP status an API would answer) when the change is not allowed;
work for the engine is queued only after the transaction commits.
"""

from __future__ import annotations

import re

from django.db import IntegrityError, transaction
from django.utils import timezone

from deployer import git
from deployer.errors import AdapterError


from . import audit, permissions, plan, tasks, transitions
from .models import Approval, Environment, Recipe, Release, Step

R, S = Release.Status, Step.Status


class ServiceError(Exception):
    status = 400

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details


class BadInput(ServiceError):
    status = 400


class NotAllowed(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


# git's own rules for a ref name, plus no leading "-" (it would read as an option)
_BAD_REVISION = re.compile(r"(^-)|(\.\.)|(@\{)|([\s~^:?*\[\\\x00-\x1f\x7f])|(\.lock$)|(/$)|(^/)|(\.$)")


def validate_revision(revision: str) -> str:
    revision = (revision or "").strip()
    if not revision:
        raise BadInput("revision is required: a branch, tag or commit", field="revision")
    if len(revision) > 200 or _BAD_REVISION.search(revision):
        raise BadInput(f"{revision[:60]!r} is not a valid branch, tag or commit name", field="revision")
    return revision


def revision_check(*, environment: Environment, revision: str) -> str:
    """A valid name the repository has (when the repository can be asked)."""
    revision = validate_revision(revision)
    try:
        if git.resolve(environment.repository, revision) is None:
            raise BadInput(f"{environment.repository} has no branch or tag {revision!r}", field="revision")
    except AdapterError:
        pass  # out of reach from the web server; the deploy step will say so
    return revision


def _close_open_gates(release: Release, reason: str) -> None:
    for gate in release.steps.filter(status=S.AWAITING_APPROVAL):
        transitions.step(gate.pk, from_=(S.AWAITING_APPROVAL,), to=S.FAILED, error=reason, finished_at=timezone.now())


def _queue(task, release_id: int) -> None:
    transaction.on_commit(lambda: task.delay(release_id))


@transaction.atomic
def release_create(*, environment: Environment, revision: str, strategy: str = "bake", fleet_size: int | None = None,
                   actor, source_ip: str | None = None) -> Release:
    if not permissions.can_deploy(actor):
        raise NotAllowed("starting a release needs the deployer role")
    revision = validate_revision(revision)
    fleet_size = environment.desired_count if fleet_size is None else fleet_size
    if not isinstance(fleet_size, int) or isinstance(fleet_size, bool) or not 1 <= fleet_size <= 50:
        raise BadInput("clone_count (the fleet size) must be a whole number from 1 to 50", field="clone_count")
    try:
        frozen = plan.freeze(environment, strategy=strategy, revision=revision, fleet_size=fleet_size)
    except plan.PlanError as exc:
        raise BadInput(str(exc), field="strategy") from None
    try:
        with transaction.atomic():
            release = Release.objects.create(
                environment=environment, revision=revision, strategy=strategy, fleet_size=fleet_size,
                plan=frozen, requested_by=actor,
            )
    except IntegrityError:
        active = Release.objects.filter(environment=environment, status__in=Release.ACTIVE).first()
        raise Conflict(f"{environment.name} already has an active release", release=active.pk if active else None) from None
    Step.objects.bulk_create(
        Step(release=release, position=n, key=step["key"], kind=step["kind"]) for n, step in enumerate(frozen["steps"])
    )
    audit.record("release.create", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk}",
                 revision=revision, strategy=strategy, fleet_size=fleet_size)
    _queue(tasks.advance_release, release.pk)
    return release


def _gate(release: Release, key: str) -> Step:
    if key not in plan.GATES:
        raise NotFound(f"{key!r} is not a gate; the gates are {', '.join(sorted(plan.GATES))}")
    step = release.steps.filter(key=key).first()
    if step is None:
        raise NotFound(f"release {release.pk} has no gate {key!r}")
    return step


def _open_gate(release: Release, key: str) -> Step:
    step = _gate(release, key)
    if step.status != S.AWAITING_APPROVAL:
        raise Conflict(f"the gate {key} is not open (it is {step.status})", status=step.status)
    return step


def _may_decide(release: Release, key: str, actor) -> None:
    _gate(release, key)
    if not permissions.can_approve(actor):
        raise NotAllowed("deciding a gate needs the approver role")
    if release.plan["environment"]["four_eyes"] and release.requested_by_id == actor.pk:
        raise NotAllowed(f"four eyes: {actor.get_username()} started this release, so someone else decides its gates")


@transaction.atomic
def gate_approve(*, release: Release, key: str, actor, comment: str = "", source_ip: str | None = None) -> Step:
    _may_decide(release, key, actor)
    step = _open_gate(release, key)
    if not transitions.step(step.pk, from_=(S.AWAITING_APPROVAL,), to=S.SUCCEEDED, finished_at=timezone.now()):
        raise Conflict(f"the gate {key} was decided a moment ago")
    transitions.release(release.pk, from_=(R.AWAITING_APPROVAL,), to=R.RUNNING)
    Approval.objects.create(step=step, user=actor, decision=Approval.Decision.APPROVE, comment=comment)
    audit.record("gate.approve", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {key}", comment=comment)
    _queue(tasks.advance_release, release.pk)
    return step


@transaction.atomic
def gate_reject(*, release: Release, key: str, actor, comment: str = "", source_ip: str | None = None) -> Step:
    _may_decide(release, key, actor)
    step = _open_gate(release, key)
    reason = f"rejected by {actor.get_username()}" + (f": {comment}" if comment else "")
    if not transitions.step(step.pk, from_=(S.AWAITING_APPROVAL,), to=S.FAILED, error=reason, finished_at=timezone.now()):
        raise Conflict(f"the gate {key} was decided a moment ago")
    transitions.release(release.pk, from_=(R.AWAITING_APPROVAL,), to=R.ROLLING_BACK, error=f"{key}: {reason}")
    Approval.objects.create(step=step, user=actor, decision=Approval.Decision.REJECT, comment=comment)
    audit.record("gate.reject", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {key}", comment=comment)
    _queue(tasks.rollback_release, release.pk)
    return step


@transaction.atomic
def gate_expire(*, release: Release, key: str) -> Step:
    step = _open_gate(release, key)
    if not transitions.step(step.pk, from_=(S.AWAITING_APPROVAL,), to=S.FAILED, error="nobody decided before the gate's deadline", finished_at=timezone.now()):
        raise Conflict(f"the gate {key} was decided a moment ago")
    transitions.release(release.pk, from_=(R.AWAITING_APPROVAL,), to=R.ROLLING_BACK, error=f"{key}: timed out")
    audit.record("gate.expire", release=release, target=f"release {release.pk} {key}")
    _queue(tasks.rollback_release, release.pk)
    return step


@transaction.atomic
def release_cancel(*, release: Release, actor, source_ip: str | None = None) -> Release:
    if not permissions.can_deploy(actor):
        raise NotAllowed("cancelling a release needs the deployer role")
    if release.status not in (R.QUEUED, R.RUNNING, R.AWAITING_APPROVAL, R.FAILED):
        raise Conflict(f"release {release.pk} is {release.status}; only an unfinished release can be cancelled", status=release.status)
    if release.cancel_requested:
        raise Conflict(f"release {release.pk} is already being cancelled")
    Release.objects.filter(pk=release.pk).update(cancel_requested=True)
    audit.record("release.cancel", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk}")
    if release.status in (R.AWAITING_APPROVAL, R.FAILED):
        _close_open_gates(release, "cancelled")
        transitions.release(release.pk, from_=(R.AWAITING_APPROVAL, R.FAILED), to=R.ROLLING_BACK)
        _queue(tasks.rollback_release, release.pk)
    else:
        _queue(tasks.advance_release, release.pk)  # the engine stops at its next check and cleans up
    release.refresh_from_db()
    return release


@transaction.atomic
def release_retry(*, release: Release, actor, source_ip: str | None = None) -> Release:
    if not permissions.can_deploy(actor):
        raise NotAllowed("retrying a release needs the deployer role")
    failed = release.steps.filter(status=S.FAILED).first()
    if release.status != R.FAILED or failed is None or failed.kind == Step.Kind.GATE or release.state.get("rolled_back"):
        raise Conflict(f"release {release.pk} is {release.status}; only a release with a failed step can be retried", status=release.status)
    if not transitions.release(release.pk, from_=(R.FAILED,), to=R.RUNNING, error=""):
        raise Conflict(f"release {release.pk} changed a moment ago")
    transitions.step(failed.pk, from_=(S.FAILED,), to=S.PENDING, error="", lease_owner="")
    audit.record("release.retry", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {failed.key}")
    _queue(tasks.advance_release, release.pk)
    release.refresh_from_db()
    return release


@transaction.atomic
def release_rollback(*, release: Release, actor, source_ip: str | None = None) -> Release:
    if not permissions.can_deploy(actor):
        raise NotAllowed("rolling back needs the deployer role")
    if release.status == R.SUCCEEDED:
        newer = Release.objects.filter(environment=release.environment, created_at__gt=release.created_at).exclude(
            status__in=(R.CANCELLED, R.ROLLED_BACK)).exists()
        if newer:
            raise Conflict(f"a newer release of {release.environment.name} exists; roll that one back instead")
        if release.state.get("old_terminated"):
            raise Conflict(f"the old instances of release {release.pk} are terminated; there is nothing to go back to")
    elif release.status not in (R.FAILED, R.AWAITING_APPROVAL):
        raise Conflict(f"release {release.pk} is {release.status}; it cannot be rolled back now", status=release.status)
    try:
        with transaction.atomic():
            changed = transitions.release(release.pk, from_=(R.SUCCEEDED, R.FAILED, R.AWAITING_APPROVAL), to=R.ROLLING_BACK)
    except IntegrityError:
        raise Conflict(f"{release.environment.name} has another active release") from None
    if not changed:
        raise Conflict(f"release {release.pk} changed a moment ago")
    _close_open_gates(release, "rolled back")
    audit.record("release.rollback", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk}")
    _queue(tasks.rollback_release, release.pk)
    release.refresh_from_db()
    return release


@transaction.atomic
def environment_import_sandbox(*, info: dict, actor=None, source_ip: str | None = None) -> Environment:
    """The sandbox's seeded environment, stored through the models."""
    recipe, _ = Recipe.objects.update_or_create(name=f"{info['environment']}-demo", defaults={"definition": info["recipe"]})
    fields = {
        "region": info["region"],
        "aws_endpoint_url": info["aws_endpoint_url"],
        "aws_credentials": "sandbox",
        "load_balancer_name": info["load_balancer_name"],
        "target_group_arn": "",
        "public_url": info["load_balancer_url"],
        "verify_security_group_id": info["verify_security_group_id"],
        "verify_cidr": "127.0.0.1/32",
        "security_group_ids": [info["app_security_group_id"]],
        "app_port": info["app_port"],
        "health_path": info["health_path"],
        "expected_text": "{revision}",
        "ssh_user": info["ssh_user"],
        "ssh_port": info["ssh_port"],
        "ssh_key_file": info["ssh_key_file"],
        "address": Environment.Address.PRIVATE,
        "instance_type": info["instance_type"],
        "subnet_id": info["subnet_id"],
        "key_name": info["key_name"],
        "base_ami": info["base_ami"],
        "name_prefix": info["name_prefix"],
        "desired_count": info["desired_count"],
        "repository": info["repository"],
        "recipe": recipe,
    }
    environment, created = Environment.objects.update_or_create(name=info["environment"], defaults=fields)
    environment.full_clean()
    audit.record("environment.import" if created else "environment.update", actor=actor, source_ip=source_ip,
                 environment=environment, target=environment.name, source="sandbox")
    return environment


def configuration_audit(obj, *, created: bool, changed: list[str], actor, source_ip: str | None = None) -> None:
    """An environment or recipe was created or changed (here or in the admin)."""
    audit.record(f"{obj._meta.model_name}.{'create' if created else 'update'}", actor=actor, source_ip=source_ip,
                 environment=obj if isinstance(obj, Environment) else None, target=str(obj), changed=sorted(changed))


@transaction.atomic
def configuration_save(*, form, actor, source_ip: str | None = None):
    """Save an environment or a recipe from its (validated) form."""
    kind = form._meta.model._meta.verbose_name
    if not permissions.can_deploy(actor):
        raise NotAllowed(f"changing {kind}s needs the deployer role")
    created = form.instance.pk is None
    saved = form.save()
    configuration_audit(saved, created=created, changed=form.changed_data, actor=actor, source_ip=source_ip)
    return saved
