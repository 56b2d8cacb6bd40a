"""Every change a person makes: create, approve, reject, cancel, retry, roll back.

Each service checks the current state first and raises one ServiceError
(with the HTTP status an API would answer) when the change is not allowed;
work for the engine is queued only after the transaction commits.
"""

from __future__ import annotations

import functools
import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, OperationalError, transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from deployer import git
from deployer.errors import AdapterError


from . import audit, logs, notifications, permissions, plan, tasks, transitions
from .models import Approval, Environment, Installation, NotificationChannel, Recipe, RecipeChange, Release, Step

R, S = Release.Status, Step.Status


class ServiceError(Exception):
    status = 400

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = details
        self.refusal: dict | None = None  # a refused attempt, for the audit (see _records_refusals)


class BadInput(ServiceError):
    status = 400


class NotAllowed(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


# -- refused attempts are audited ----------------------------------------------------------


def refusal_record(*, action: str, actor, reason: str, message: str, source_ip: str | None = None, release=None,
                   environment=None, target: str = "", **details) -> None:
    """A refused attempt (wrong role or group, self-approval, a second approval), in the audit.
    Called after the refused service's transaction rolled back, so the record stays."""
    if actor is None or not actor.is_authenticated:
        return  # a stranger is refused before anything: there is nobody to name
    audit.record(action, actor=actor, source_ip=source_ip, release=release, environment=environment, target=target,
                 reason=reason, refused=message, **details)


def refused_without_role(*, release_id: int | None = None, key: str = "", attempted: str, message: str, actor,
                         source_ip: str | None = None) -> NotAllowed:
    """The page's or the API's role check refused `actor` before any service ran: recorded, and the
    error to answer. The release is looked up only to file the record under it (the answer is the same 403)."""
    if key not in plan.GATES:  # as typed into a URL: kept, escaped, but never a NUL or a lone surrogate
        key = key.encode("unicode_escape").decode("ascii")[:64]
    release = Release.objects.select_related("environment").filter(pk=release_id).first() if release_id else None
    target = f"release {release_id}{' ' + key if key else ''}" if release_id else "a new release"
    refusal_record(action="gate.refused" if key else "release.refused", actor=actor, source_ip=source_ip,
                   release=release, target=target[:300], reason="role", message=message, attempted=attempted,
                   **({"gate": key} if key else {}))
    return NotAllowed(message)


def _refused(error_class: type[ServiceError], message: str, *, action: str, reason: str, release=None, environment=None,
             target: str = "", **details) -> ServiceError:
    error = error_class(message)
    error.refusal = {"action": action, "reason": reason, "release": release, "environment": environment,
                     "target": target, **details}
    return error


def _records_refusals(service):
    """Outside the service's transaction: a refusal raised inside it rolls everything back, and is
    recorded afterwards, so its audit row survives the rollback."""
    @functools.wraps(service)
    def wrapped(*args, **kwargs):
        try:
            return service(*args, **kwargs)
        except ServiceError as error:
            if error.refusal is not None:
                refusal, error.refusal = error.refusal, None  # once, however many services it passes through
                refusal_record(**refusal, message=str(error), actor=kwargs.get("actor"), source_ip=kwargs.get("source_ip"))
            raise

    return wrapped


def _may_deploy(environment: Environment, actor, doing: str, *, attempted: str, release: Release | None = None) -> None:
    """A deployer, in one of the environment's deploy groups if it names any (its groups as they are now)."""
    refusal = permissions.deploy_refusal(actor, environment, doing)
    if refusal is not None:
        reason, message = refusal
        raise _refused(NotAllowed, message, action="release.refused", reason=reason, release=release,
                       environment=environment, target=f"release {release.pk}" if release else environment.name,
                       attempted=attempted)


# A gate's comment, on the page and in the API (the column itself is unbounded text).
COMMENT_LIMIT = 2000

LOST_RACE = "someone else changed this at the same moment and the database kept theirs; look again, then retry if it still applies"
# PostgreSQL: serialization failure, deadlock, lock not available
_RACE_SQLSTATES = {"40001", "40P01", "55P03"}


def lost_race(exc: BaseException) -> bool:
    """A database error that means another request won a race (and this one
    changed nothing): a 409, never a 500. SQLite says "database is locked"
    when its busy timeout runs out; PostgreSQL names it by SQLSTATE."""
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.__cause__, "sqlstate", None)
    return sqlstate in _RACE_SQLSTATES or "database is locked" in str(exc) or "database table is locked" in str(exc)


# git's own rules for a ref name, plus no leading "-" (it would read as an option)
# and no lone surrogate (a JSON body may carry "\ud800", which is no character in UTF-8)
_BAD_REVISION = re.compile(r"(^-)|(\.\.)|(@\{)|([\s~^:?*\[\\\x00-\x1f\x7f\ud800-\udfff])|(\.lock$)|(/$)|(^/)|(\.$)")


def validate_revision(revision: str) -> str:
    revision = (revision or "").strip()
    if not revision:
        raise BadInput("revision is required: a branch, tag or commit", field="revision")
    if len(revision) > 200 or _BAD_REVISION.search(revision):
        raise BadInput(f"{revision[:60]!r} is not a valid branch, tag or commit name", field="revision")
    return revision


def revision_check(*, environment: Environment, revision: str) -> str:
    """A valid name the repository has (when the repository can be asked)."""
    return revision_lookup(environment=environment, revision=revision)["revision"]


NOT_CHECKED = "revision not checked"


def revision_lookup(*, environment: Environment, revision: str) -> dict:
    """{"revision", "checked", "note", "commit"}: 400 (the wizard's and the API's one message)
    when the repository answers without it; checked False, with why, when it cannot
    be reached from here: then the release may start and says "revision not checked".
    `commit`: the commit the repository says it names, when checked.

    Git runs in the web process, as this check always has: listing refs and
    reading a log need read access only, and a worker round trip (preflight's
    Redis reply) would make every step of the wizard wait on a busy worker.
    Where the web process cannot reach the repository (the workers' network or
    keys), everything here degrades to "not checked", never to a refusal; the
    deploy step, on a worker, has the last word."""
    revision = validate_revision(revision)
    try:
        found = git.resolve(environment.repository, revision, allow_file=settings.ALLOW_FILE_REPOSITORIES)
    except AdapterError as exc:
        return {"revision": revision, "checked": False, "commit": "",
                "note": f"{NOT_CHECKED}: the repository could not be reached from Greenlight's web server ({exc})"}
    if found is None:
        raise BadInput(f"{git.shown(environment.repository)} has no branch or tag {revision!r}", field="revision")
    return {"revision": revision, "checked": True, "note": "", "commit": found}


def running_release(environment: Environment) -> Release | None:
    """What serves now: the last release that succeeded (a rolled-back one is rolled_back, not succeeded)."""
    return (Release.objects.filter(environment=environment, status=R.SUCCEEDED)
            .order_by("-finished_at", "-pk").first())


def _mirror(environment: Environment, *, needs: str = ""):
    """The web process's own bare clone of the repository, fetched unless it was
    fetched within REPOSITORY_FRESH_SECONDS and has `needs` (a revision)."""
    return git.mirror(environment.repository, settings.VAR_DIR / "repositories", allow_file=settings.ALLOW_FILE_REPOSITORIES,
                      fresh_for=settings.REPOSITORY_FRESH_SECONDS, needs=needs)


RECENT_COMMITS = 20  # the picker's "Recent commits"


def repository_picker(*, environment: Environment) -> dict:
    """The revision picker's choices: {"branches", "tags", "commits", "pending", "error", "asked"}.

    Branches and tags come from `git ls-remote` at once. The recent commits need
    a clone, which a big repository takes a minute to make: never here (see
    recent_commits); `pending` says a worker is reading them. On an error the
    lists are empty and `error` says why."""
    picked = {"branches": [], "tags": [], "commits": [], "pending": False, "error": "", "asked": ""}
    try:
        picked.update(git.revisions(environment.repository, allow_file=settings.ALLOW_FILE_REPOSITORIES))
    except AdapterError as exc:
        picked["error"] = str(exc)
        return picked
    picked.update(recent_commits(environment=environment))
    return picked


def recent_commits(*, environment: Environment, asked: str = "") -> dict:
    """{"commits", "pending", "error", "asked"}: the newest RECENT_COMMITS of the
    default branch, without cloning or fetching in this process. From this
    process's own clone when it was fetched within REPOSITORY_FRESH_SECONDS (the
    review made it, say); else from what a worker read within that window, or
    in answer to `asked`; else a worker is asked to read them
    (tasks.commits_from_worker): `pending` until it has, and the picker's
    fragment asks again, naming the ask (`asked`) it waits for."""
    fresh = git.fresh_mirror(environment.repository, settings.VAR_DIR / "repositories", settings.REPOSITORY_FRESH_SECONDS)
    if fresh is not None:
        try:
            return {"commits": git.log(fresh, "HEAD", limit=RECENT_COMMITS), "pending": False, "error": "", "asked": ""}
        except AdapterError:
            pass  # (an empty repository, say) the worker's answer says why
    return tasks.commits_from_worker(environment, limit=RECENT_COMMITS, fresh_for=settings.REPOSITORY_FRESH_SECONDS,
                                     asked=asked)


CHANGES_LIMIT = 50


def revision_changes(*, environment: Environment, revision: str, commit: str = "") -> dict:
    """What a release of `revision` changes, for the review and both gate cards
    (kept in the release's plan, so they need no git): {"from", "from_release",
    "to", "commits", "more", "error"}; commits newest first, at most CHANGES_LIMIT.

    Read from the web process's own clone, fetched first unless it was fetched
    within REPOSITORY_FRESH_SECONDS and has `commit` (what the repository said
    `revision` is a moment ago: release_start passes it, so a branch that moved
    is fetched) or else `revision` itself (a tag pushed a moment ago is fetched)."""
    running = running_release(environment)
    changes = {"from": running.revision if running else "", "from_release": running.pk if running else None,
               "to": revision, "commits": [], "more": False, "error": ""}
    try:
        mirror = _mirror(environment, needs=commit or revision)
        commits = git.log(mirror, revision, since=changes["from"], limit=CHANGES_LIMIT + 1)
    except AdapterError as exc:
        changes["error"] = str(exc)
        return changes
    changes["commits"], changes["more"] = commits[:CHANGES_LIMIT], len(commits) > CHANGES_LIMIT
    return changes


def _close_open_gates(release: Release, reason: str, actor) -> None:
    for gate in release.steps.filter(status=S.AWAITING_APPROVAL):
        transitions.step(gate.pk, "close", error=reason, reason=reason, actor=actor, finished_at=timezone.now())


def _queue(release_id: int) -> None:
    transaction.on_commit(lambda: tasks.nudge(release_id))


def _refuse(release: Release, action: str, what: str) -> None:
    """409 unless the table of moves lets the release's status do `action`."""
    if not transitions.allows(release.status, action):
        raise Conflict(f"release {release.pk} is {release.status}; {what}", status=release.status)


@_records_refusals
def environment_preflight(*, environment: Environment, actor, revision: str = "", strategy: str = "",
                          source_ip: str | None = None) -> list[dict]:
    """Every check a release of `environment` depends on, run by a worker;
    changes nothing (releases/preflight.py). Needs who may deploy there: it
    changes nothing, but it calls AWS and SSH with the workers' credentials."""
    _may_deploy(environment, actor, "running a preflight", attempted="preflight")
    if strategy and strategy not in plan.STRATEGIES:
        raise BadInput(f"unknown strategy {strategy!r}; choose {' or '.join(plan.STRATEGIES)}", field="strategy")
    if revision:
        revision = validate_revision(revision)
    checks = tasks.preflight_on_worker(environment, revision=revision, strategy=strategy)
    audit.record("environment.preflight", actor=actor, source_ip=source_ip, environment=environment,
                 target=environment.name, revision=revision, strategy=strategy,
                 failed=[c["name"] for c in checks if c["status"] == "failed"])
    return checks


def preflight_failed(checks: list[dict]) -> list[dict]:
    return [c for c in checks if c["status"] == "failed"]


@_records_refusals
def release_start(*, environment: Environment, revision: str, strategy: str = "bake", fleet_size: int | None = None,
                  actor, source_ip: str | None = None, checks: list[dict] | None = None) -> Release:
    """A release, after its preflight passed (where PREFLIGHT_BEFORE_RELEASE is on):
    409 naming the failed checks, with every check, when one failed. `checks`:
    a preflight run a moment ago for this very release; else one runs now."""
    _may_deploy(environment, actor, "starting a release", attempted="start")
    looked_up = revision_lookup(environment=environment, revision=revision)
    revision = looked_up["revision"]
    if settings.PREFLIGHT_BEFORE_RELEASE:
        if checks is None:
            # no preflight for a release that cannot start anyway
            if active := Release.objects.filter(environment=environment, status__in=Release.ACTIVE).first():
                raise Conflict(f"{environment.name} already has an active release", release=active.pk)
            checks = environment_preflight(environment=environment, actor=actor, revision=revision, strategy=strategy,
                                           source_ip=source_ip)
        if failed := preflight_failed(checks):
            raise Conflict("preflight failed, so the release was not started: "
                           + "; ".join(f"{c['name']}: {c['message']}" for c in failed), checks=checks)
    changes = (revision_changes(environment=environment, revision=revision, commit=looked_up["commit"])
               if looked_up["checked"] else None)
    return release_create(environment=environment, revision=revision, strategy=strategy, fleet_size=fleet_size,
                          actor=actor, source_ip=source_ip, revision_checked=looked_up, changes=changes)


@_records_refusals
@transaction.atomic
def release_create(*, environment: Environment, revision: str, strategy: str = "bake", fleet_size: int | None = None,
                   actor, source_ip: str | None = None, revision_checked: dict | None = None,
                   changes: dict | None = None) -> Release:
    """`revision_checked`: revision_lookup's answer (none: the caller did not ask);
    `changes`: revision_changes' answer; both kept in the plan for the release's page."""
    _may_deploy(environment, actor, "starting a release", attempted="start")
    revision = validate_revision(revision)
    fleet_size = environment.desired_count if fleet_size is None else fleet_size
    if not isinstance(fleet_size, int) or isinstance(fleet_size, bool) or not 1 <= fleet_size <= 50:
        raise BadInput("clone_count (the fleet size) must be a whole number from 1 to 50", field="clone_count")
    try:
        frozen = plan.freeze(environment, strategy=strategy, revision=revision, fleet_size=fleet_size,
                             installation=Installation.current_id())
    except plan.PlanError as exc:
        raise BadInput(str(exc), field="strategy") from None
    if revision_checked is not None:
        frozen["revision_check"] = {"checked": revision_checked["checked"], "note": revision_checked["note"]}
    if changes is not None:
        frozen["changes"] = changes
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
    transitions.created(release, actor=actor)
    audit.record("release.create", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk}",
                 revision=revision, strategy=strategy, fleet_size=fleet_size)
    _queue(release.pk)
    return release


def _gate(release: Release, key: str) -> Step:
    if key not in plan.GATES:
        raise NotFound(f"{key!r} is not a gate; the gates are {', '.join(sorted(plan.GATES))}")
    step = release.steps.filter(key=key).first()
    if step is None:
        raise NotFound(f"release {release.pk} has no gate {key!r}")
    return step


def _open_gate(release: Release, key: str) -> Step:
    """The gate, open, its row locked until the transaction ends: of two people deciding it at
    the same moment, the second waits and then sees what the first did."""
    step = Step.objects.select_for_update().get(pk=_gate(release, key).pk)
    if step.status != S.AWAITING_APPROVAL:
        raise Conflict(f"the gate {key} is not open (it is {step.status})", status=step.status)
    return step


def _may_decide(release: Release, key: str, actor, *, attempted: str) -> None:
    """An approver, in one of the gate's groups if the environment names any (as they are now), and
    not the person who started the release under four eyes (as its plan says)."""
    _gate(release, key)
    refusal = permissions.gate_refusal(actor, release, key)
    if refusal is not None:
        reason, message = refusal
        raise _refused(NotAllowed, message, action="gate.refused", reason=reason, release=release,
                       target=f"release {release.pk} {key}", gate=key, attempted=attempted)


@_records_refusals
@transaction.atomic
def gate_approve(*, release: Release, key: str, actor, comment: str = "", source_ip: str | None = None) -> Step:
    """One approval. The gate moves on when it has as many distinct approvals as the release
    needs; short of that it stays open, and the approval is shown and audited ("1 of 2")."""
    _may_decide(release, key, actor, attempted="approve")
    step = _open_gate(release, key)
    needed = permissions.approvals_required(release)
    try:
        with transaction.atomic():
            Approval.objects.create(step=step, user=actor, decision=Approval.Decision.APPROVE, comment=comment)
    except IntegrityError:  # one decision per person per gate: the database says so too
        given = step.approvals.filter(decision=Approval.Decision.APPROVE).count()
        raise _refused(Conflict, f"{actor.get_username()} approved {key} already; it needs {needed - given} more "
                                 f"approval{'s' if needed - given != 1 else ''} from someone else",
                       action="gate.refused", reason="again", release=release, target=f"release {release.pk} {key}",
                       gate=key, attempted="approve") from None
    given = step.approvals.filter(decision=Approval.Decision.APPROVE).count()
    if given >= needed:
        if not transitions.step(step.pk, "approve", actor=actor, reason=comment, comment=comment,
                                finished_at=timezone.now(), release_id=release.pk):
            raise Conflict(f"the gate {key} was decided a moment ago")
        transitions.release(release.pk, "approve", actor=actor, reason=f"{key} approved")
        _queue(release.pk)
    else:
        transitions.gate_changed(release.pk, step.pk)
    audit.record("gate.approve", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {key}",
                 comment=comment, approvals=f"{given} of {needed}")
    step.refresh_from_db(fields=["status", "finished_at"])
    return step


@_records_refusals
@transaction.atomic
def gate_reject(*, release: Release, key: str, actor, comment: str = "", source_ip: str | None = None) -> Step:
    """One rejection by someone who may decide the gate rejects it at once, whatever approvals it
    had (theirs included: a person who approved may still stop it), and the release rolls back."""
    _may_decide(release, key, actor, attempted="reject")
    step = _open_gate(release, key)
    reason = f"rejected by {actor.get_username()}" + (f": {comment}" if comment else "")
    if not transitions.step(step.pk, "reject", actor=actor, error=reason, reason=reason, comment=comment,
                            finished_at=timezone.now(), release_id=release.pk):
        raise Conflict(f"the gate {key} was decided a moment ago")
    transitions.release(release.pk, "reject", actor=actor, error=f"{key}: {reason}", reason=f"{key} {reason}")
    _, first_decision = Approval.objects.update_or_create(
        step=step, user=actor, defaults={"decision": Approval.Decision.REJECT, "comment": comment, "at": timezone.now()})
    given = step.approvals.filter(decision=Approval.Decision.APPROVE).count()
    audit.record("gate.reject", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {key}",
                 comment=comment, approvals=f"{given} of {permissions.approvals_required(release)}",
                 **({} if first_decision else {"approved_before": True}))
    _queue(release.pk)
    step.refresh_from_db(fields=["status", "finished_at"])
    return step


@_records_refusals
@transaction.atomic
def gate_assign(*, release: Release, key: str, actor, source_ip: str | None = None) -> Step:
    """"Assign to me": `actor` takes the open gate, shown to the others and notified. Not a lock:
    anyone else who may decide it still may, and may take it over."""
    _may_decide(release, key, actor, attempted="assign")
    step = _open_gate(release, key)
    if step.assignee_id == actor.pk:
        raise Conflict(f"{actor.get_username()} has taken {key} already")
    previous = step.assignee.get_username() if step.assignee_id else None
    if not transitions.assign(step.pk, actor, release_id=release.pk):
        raise Conflict(f"the gate {key} was decided a moment ago")
    step.assignee = actor
    notifications.gate_event(step, "gate.assigned", actor=actor)
    audit.record("gate.assign", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {key}",
                 **({"taken_from": previous} if previous else {}))
    return step


@_records_refusals
@transaction.atomic
def gate_unassign(*, release: Release, key: str, actor, source_ip: str | None = None) -> Step:
    """Nobody has the gate any more; anyone who may decide it may say so."""
    _may_decide(release, key, actor, attempted="unassign")
    step = _open_gate(release, key)
    if step.assignee_id is None:
        raise Conflict(f"nobody has taken {key}")
    previous = step.assignee.get_username()
    if not transitions.assign(step.pk, None, release_id=release.pk):
        raise Conflict(f"the gate {key} was decided a moment ago")
    step.assignee = None
    audit.record("gate.unassign", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {key}",
                 taken_from=previous)
    return step


@_records_refusals
@transaction.atomic
def release_cancel(*, release: Release, actor, source_ip: str | None = None) -> Release:
    """Cancel ends in a rollback and `cancelled`, wherever it lands: at a gate
    or after a failure at once; while a step works, as soon as it stops
    (between commands, inside one, or while it waits on AWS)."""
    _may_deploy(release.environment, actor, "cancelling a release", attempted="cancel", release=release)
    _refuse(release, "cancel", "only an unfinished release can be cancelled")
    past_swap = Step.objects.filter(release=OuterRef("pk"), key=plan.CANCEL_ENDS_AT, kind=Step.Kind.ACTION).exclude(
        status=S.PENDING, attempts=0)
    if transitions.too_late_to_cancel(release.steps.all()):
        raise Conflict(transitions.too_late_to_cancel_reason(release.pk), status=release.status)
    # a cancel whose rollback failed may be asked again: it rolls back again
    again = release.status == R.FAILED and release.cancel_requested
    # conditional, like a move: of two cancels at once, one asks and the other is told;
    # and never once the engine has started stopping the old fleet
    if not again and (release.cancel_requested or not Release.objects.filter(
            ~Exists(past_swap), pk=release.pk, cancel_requested=False).update(cancel_requested=True)):
        if transitions.too_late_to_cancel(release.steps.all()):
            raise Conflict(transitions.too_late_to_cancel_reason(release.pk), status=release.status)
        raise Conflict(f"release {release.pk} is already being cancelled")
    audit.record("release.cancel", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk}")
    if release.status in (R.AWAITING_APPROVAL, R.FAILED):
        _close_open_gates(release, "cancelled", actor)
        if not transitions.release(release.pk, "cancel", actor=actor, reason=f"cancelled by {actor.get_username()}") and again:
            raise Conflict(f"release {release.pk} changed a moment ago")
    _queue(release.pk)  # at work: the engine stops at its next check and rolls back
    release.refresh_from_db()
    return release


@_records_refusals
@transaction.atomic
def release_retry(*, release: Release, actor, source_ip: str | None = None) -> Release:
    _may_deploy(release.environment, actor, "retrying a release", attempted="retry", release=release)
    failed = release.steps.filter(status=S.FAILED).first()
    rolled_back = release.steps.filter(kind=Step.Kind.ROLLBACK).exists() or release.state.get("rolled_back")
    if not transitions.allows(release.status, "retry") or failed is None or failed.kind != Step.Kind.ACTION or rolled_back:
        raise Conflict(f"release {release.pk} is {release.status}; only a release with a failed step can be retried", status=release.status)
    if not transitions.release(release.pk, "retry", actor=actor, error="", reason=f"retry {failed.key}"):
        raise Conflict(f"release {release.pk} changed a moment ago")
    transitions.step(failed.pk, "retry", actor=actor, reason=f"retried by {actor.get_username()}", error="", lease_owner="",
                     wait={}, waiting_for="", deadline=None, wake_at=None)
    audit.record("release.retry", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk} {failed.key}")
    _queue(release.pk)
    release.refresh_from_db()
    return release


@_records_refusals
@transaction.atomic
def release_rollback(*, release: Release, actor, source_ip: str | None = None) -> Release:
    _may_deploy(release.environment, actor, "rolling back", attempted="rollback", release=release)
    _refuse(release, "rollback", "it cannot be rolled back now")
    if release.status == R.SUCCEEDED:
        newer = Release.objects.filter(environment=release.environment, created_at__gt=release.created_at).exclude(
            status__in=(R.CANCELLED, R.ROLLED_BACK)).exists()
        if newer:
            raise Conflict(f"a newer release of {release.environment.name} exists; roll that one back instead")
        if release.state.get("old_terminated"):
            raise Conflict(f"the old instances of release {release.pk} are terminated; there is nothing to go back to")
    try:
        with transaction.atomic():
            changed = transitions.release(release.pk, "rollback", actor=actor, reason=f"rolled back by {actor.get_username()}")
    except IntegrityError:
        raise Conflict(f"{release.environment.name} has another active release") from None
    if not changed:
        raise Conflict(f"release {release.pk} changed a moment ago")
    _close_open_gates(release, "rolled back", actor)
    audit.record("release.rollback", actor=actor, source_ip=source_ip, release=release, target=f"release {release.pk}")
    _queue(release.pk)
    release.refresh_from_db()
    return release


@transaction.atomic
def environment_import_sandbox(*, info: dict, actor=None, source_ip: str | None = None) -> Environment:
    """The sandbox's seeded environment, stored through the models. `info` is
    var/sandbox.json (its first environment) or one of its `environments`."""
    try:
        git.check_repository(info["repository"], allow_file=settings.ALLOW_FILE_REPOSITORIES)
    except AdapterError as exc:
        raise BadInput(f"{exc} (the sandbox's own repository needs ALLOW_FILE_REPOSITORIES=true)", field="repository") from None
    recipe, _ = Recipe.objects.update_or_create(name=f"{info['environment']}-demo", defaults={"definition": info["recipe"]})
    for name, definition in info.get("recipes", {}).items():  # offered, for a maintainer to choose
        Recipe.objects.update_or_create(name=f"{info['environment']}-{name}", defaults={"definition": definition})
    # an environment names exactly one of the two: behind an ALB, its target group
    alb = info.get("load_balancer_kind", "classic") == "alb"
    fields = {
        "region": info["region"],
        "aws_endpoint_url": info["aws_endpoint_url"],
        "aws_credentials": "sandbox",
        "load_balancer_name": "" if alb else info["load_balancer_name"],
        "target_group_arn": info["target_group_arn"] if alb else "",
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
        # a sandbox playing AWS's timings faster: the engine's waits run at its clock
        "time_scale": info.get("time_scale", 1.0),
        # a sandbox run with --bastion: its instances answer SSH only through it
        **_sandbox_bastion(info.get("bastion")),
    }
    environment, created = Environment.objects.update_or_create(name=info["environment"], defaults=fields)
    environment.full_clean()
    channels = _sandbox_channels(environment, info.get("inbox") or {})
    audit.record("environment.import" if created else "environment.update", actor=actor, source_ip=source_ip,
                 environment=environment, target=environment.name, source="sandbox",
                 **({"channels": channels} if channels else {}))
    return environment


def _sandbox_channels(environment: Environment, inbox: dict) -> list[str]:
    """Point the environment's notifications at the sandbox's inbox: its mail
    catcher, Slack and webhook receivers. Where they go is (re)set, since a
    restarted sandbox may answer elsewhere; which events and whether a channel
    is enabled stay as a person left them. Returns the channels' names."""
    names = []
    for channel in (inbox.get("channels") or {}).get(environment.name, []):
        NotificationChannel.objects.update_or_create(
            environment=environment, name=channel["name"],
            defaults={"kind": channel["kind"], "recipients": channel.get("recipients", ""),
                      "url": channel.get("url", ""), "secret": channel.get("secret", "")},
        )
        names.append(channel["name"])
    return names


@_records_refusals
def environment_ssh_config_export(*, environment: Environment, actor, source_ip: str | None = None) -> bytes:
    """The environment's ssh config and known_hosts as a zip, for a person to
    unzip into ~/.ssh/ (the config's UserKnownHostsFile points there). It maps
    the fleet's addresses and the workers' key paths, never a key: recorded.
    For who may deploy there."""
    import io
    import zipfile

    from . import selectors

    _may_deploy(environment, actor, "downloading an ssh config", attempted="ssh_config")

    folder = f"greenlight-{environment.name}"
    config, known_hosts = selectors.environment_ssh_config(environment, known_hosts=f"~/.ssh/{folder}/known_hosts")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{folder}/ssh_config", f"# unzip into ~/.ssh/, then: ssh -F ~/.ssh/{folder}/ssh_config NAME\n" + config)
        archive.writestr(f"{folder}/known_hosts", known_hosts)
    audit.record("environment.ssh_config", actor=actor, source_ip=source_ip, environment=environment,
                 target=environment.name, hosts=config.count("\nHost "))
    return buffer.getvalue()


def _sandbox_bastion(bastion: dict | None) -> dict:
    if not bastion:
        return {"bastion_host": "", "bastion_port": 22, "bastion_user": "", "bastion_key_file": "", "bastion_host_key": ""}
    return {"bastion_host": bastion["host"], "bastion_port": bastion["port"], "bastion_user": bastion["user"],
            "bastion_key_file": bastion["key_file"], "bastion_host_key": bastion["host_key"]}


# -- notification channels (issue 11): where release data is sent is a maintainer's decision


def _channel_values(channel, *, before: dict | None = None) -> dict:
    """A channel's fields for the audit, its URL and secret only as "set", "changed" or "" (they are credentials)."""
    values = configuration_values(channel)
    values.pop("created_at", None)
    for name in ("url", "secret"):
        value = values.pop(name)
        if not value:
            values[name] = ""
        elif before is not None and before.get(f"_{name}") not in (None, value):
            values[name] = "(set; changed)"
        else:
            values[name] = "(set)"
    return values


@transaction.atomic
def channel_save(*, form, actor, source_ip: str | None = None):
    """Add or change an environment's notification channel from its (validated) form."""
    if not permissions.can_maintain(actor):
        raise NotAllowed("changing notification channels needs the maintainer role: they say where release data is sent")
    from .models import NotificationChannel

    created = form.instance.pk is None
    before = {}
    if not created:
        stored = NotificationChannel.objects.select_for_update().get(pk=form.instance.pk)
        before = {**_channel_values(stored), "_url": stored.url, "_secret": stored.secret}
    channel = form.save()
    after = _channel_values(channel, before=before)
    before = {k: v for k, v in before.items() if not k.startswith("_")}
    audit.record(f"channel.{'create' if created else 'update'}", actor=actor, source_ip=source_ip,
                 environment=channel.environment, target=f"{channel.environment.name} {channel.name}",
                 changed=sorted(k for k in after if after[k] != before.get(k)), diff=configuration_diff(before, after))
    return channel


@transaction.atomic
def channel_delete(*, channel, actor, source_ip: str | None = None) -> None:
    if not permissions.can_maintain(actor):
        raise NotAllowed("deleting a notification channel needs the maintainer role")
    audit.record("channel.delete", actor=actor, source_ip=source_ip, environment=channel.environment,
                 target=f"{channel.environment.name} {channel.name}", kind=channel.kind)
    channel.delete()  # its deliveries stay, by the channel's name


@transaction.atomic
def channel_test(*, channel, actor, source_ip: str | None = None):
    """A "test" notification to `channel` alone, queued once this commits; the Delivery, to watch."""
    from . import notifications

    if not (permissions.can_maintain(actor) or permissions.may_deploy_in(actor, channel.environment)):
        raise NotAllowed("sending a test notification needs the deployer or maintainer role")
    delivery = notifications.test_event(channel, actor=actor)
    audit.record("channel.test", actor=actor, source_ip=source_ip, environment=channel.environment,
                 target=f"{channel.environment.name} {channel.name}", delivery=str(delivery.uuid))
    return delivery


def configuration_values(obj, *, pending: dict | None = None) -> dict:
    """An environment's or a recipe's fields as plain values (a related row by its name, many by
    their sorted names), for a diff. `pending`: a form's cleaned data, for the many-to-many
    fields it is about to save (they reach the row only after it is saved)."""
    values = {}
    for field in obj._meta.concrete_fields:
        if field.primary_key or field.name == "updated_at":
            continue
        values[field.name] = str(getattr(obj, field.name)) if field.is_relation else field.value_from_object(obj)
    for field in obj._meta.many_to_many:
        if pending is not None and field.name in pending:
            related = pending[field.name] or []
        else:
            related = getattr(obj, field.name).all() if obj.pk is not None else []
        values[field.name] = sorted(str(item) for item in related)
    return values


def _flat(value, path: str) -> dict:
    """A JSON value as {path: leaf}, so a recipe's diff names the command that changed, not the whole definition."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{path}.{key}").items()}
    return {path: value}


def _scrub(value):
    # credentials are references, not keys, but a value typed by a person may still hold one;
    # a URL's password or token (the repository's) reads *** as everywhere else it is shown
    if isinstance(value, str):
        return logs.Redactor()(git.shown(value))
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    return value


def configuration_diff(before: dict, after: dict) -> dict:
    """{field: [old, new]} for what differs; JSON fields by path (definition.tasks.deploy:update.commands)."""
    old, new = {}, {}
    for name in {*before, *after}:
        a, b = before.get(name), after.get(name)
        if isinstance(a, dict) or isinstance(b, dict):
            old.update(_flat(a if a is not None else {}, name))
            new.update(_flat(b if b is not None else {}, name))
        else:
            old[name], new[name] = a, b
    diff = {}
    for key in sorted({*old, *new}):
        if old.get(key) != new.get(key):
            a, b = _scrub(old.get(key)), _scrub(new.get(key))
            if a == b and isinstance(b, str):  # only a secret in it changed (a token): say so, not what
                b = f"{b} (a secret in it changed)"
            diff[key] = [a, b]
    return diff


def configuration_audit(obj, *, created: bool, before: dict, actor, source_ip: str | None = None, action: str = "", **details) -> None:
    """An environment or recipe was created or changed (here or in the admin), with what changed: old -> new."""
    after = configuration_values(obj)
    audit.record(action or f"{obj._meta.model_name}.{'create' if created else 'update'}", actor=actor, source_ip=source_ip,
                 environment=obj if isinstance(obj, Environment) else None, target=str(obj),
                 changed=sorted(k for k in after if after[k] != before.get(k)), diff=configuration_diff(before, after), **details)


def _refuse_configuration(model, *, created: bool, changed: list[str], actor, target: str) -> None:
    """Defence in depth behind the forms: what runs on the workers, where, and who decides, is a maintainer's."""
    if permissions.can_maintain(actor):
        return
    action = f"{model._meta.model_name}.refused"
    if model is Recipe:
        raise _refused(NotAllowed, "changing recipes needs the maintainer role: a recipe's commands run on the workers",
                       action=action, reason="role", target=target)
    if not permissions.can_deploy(actor):
        raise _refused(NotAllowed, "changing an environment needs the deployer or maintainer role", action=action,
                       reason="role", target=target)
    if created:
        raise _refused(NotAllowed, "adding an environment needs the maintainer role", action=action, reason="role",
                       target=target)
    refused = sorted(set(changed) - permissions.ENVIRONMENT_DEPLOYER_FIELDS)
    if refused:
        error = _refused(NotAllowed, f"only a maintainer may change {', '.join(refused)}", action=action, reason="role",
                         target=target, fields=refused)
        error.details["fields"] = refused
        raise error


def recipe_needs_second_person(recipe: Recipe) -> bool:
    """A recipe that an environment with four eyes runs changes only when someone else approves."""
    return recipe.pk is not None and Environment.objects.filter(recipe=recipe, four_eyes=True).exists()


@_records_refusals
@transaction.atomic
def configuration_save(*, form, actor, source_ip: str | None = None):
    """Save an environment or a recipe from its (validated) form.

    A recipe that an environment with four eyes uses is not changed: its new
    definition is stored as a pending RecipeChange, returned instead, for
    someone else to approve."""
    model = form._meta.model
    created = form.instance.pk is None
    before = {} if created else configuration_values(model.objects.select_for_update().get(pk=form.instance.pk))
    # the form applied its data to the instance when it validated; the many-to-many fields are still its own
    after = configuration_values(form.instance, pending=form.cleaned_data)
    _refuse_configuration(model, created=created, changed=[k for k in after if after[k] != before.get(k)], actor=actor,
                          target=before.get("name") or after.get("name") or "")
    if model is Recipe and not created and after["definition"] != before["definition"] and recipe_needs_second_person(form.instance):
        return _recipe_change_propose(recipe=form.instance, before=before, actor=actor, source_ip=source_ip)
    saved = form.save()
    configuration_audit(saved, created=created, before=before, actor=actor, source_ip=source_ip)
    return saved


def _recipe_change_propose(*, recipe: Recipe, before: dict, actor, source_ip: str | None) -> RecipeChange:
    if recipe.changes.filter(status=RecipeChange.Status.PENDING).exists():
        raise Conflict(f"a change to {before['name']} already waits for approval: approve or reject it first")
    definition = recipe.definition
    if recipe.name != before["name"]:  # a new name changes nothing that runs: it applies now
        recipe.definition = before["definition"]
        recipe.save()
        configuration_audit(recipe, created=False, before=before, actor=actor, source_ip=source_ip)
        before = configuration_values(recipe)
    change = RecipeChange.objects.create(recipe=recipe, definition=definition, proposed_by=actor)
    audit.record("recipe.propose", actor=actor, source_ip=source_ip, target=str(recipe), change=change.pk,
                 diff=configuration_diff({"definition": before["definition"]}, {"definition": definition}))
    return change


def _pending(change: RecipeChange) -> None:
    if change.status != RecipeChange.Status.PENDING:
        raise Conflict(f"that change to {change.recipe.name} was {change.status} already", status=change.status)


@transaction.atomic
def recipe_change_approve(*, change: RecipeChange, actor, source_ip: str | None = None) -> Recipe:
    if not permissions.can_maintain(actor):
        raise NotAllowed("approving a recipe change needs the maintainer role")
    _pending(change)
    if change.proposed_by_id == actor.pk:
        raise NotAllowed(f"four eyes: {actor.get_username()} proposed this change, so someone else approves it")
    if not RecipeChange.objects.filter(pk=change.pk, status=RecipeChange.Status.PENDING).update(
            status=RecipeChange.Status.APPROVED, decided_by=actor, decided_at=timezone.now()):
        raise Conflict(f"the change to {change.recipe.name} was decided a moment ago")
    recipe = Recipe.objects.select_for_update().get(pk=change.recipe_id)
    before = configuration_values(recipe)
    recipe.definition = change.definition
    try:
        recipe.save()  # validated again: the recipe format may have moved on since
    except ValidationError as exc:
        raise BadInput(f"the proposed definition is no longer valid: {'; '.join(exc.messages)}") from None
    configuration_audit(recipe, created=False, before=before, actor=actor, source_ip=source_ip, change=change.pk,
                        proposed_by=change.proposed_by.get_username(), approved_by=actor.get_username())
    return recipe


@transaction.atomic
def recipe_change_reject(*, change: RecipeChange, actor, source_ip: str | None = None) -> RecipeChange:
    """Any maintainer may reject, the proposer too (a withdrawal): nothing changes."""
    if not permissions.can_maintain(actor):
        raise NotAllowed("rejecting a recipe change needs the maintainer role")
    _pending(change)
    if not RecipeChange.objects.filter(pk=change.pk, status=RecipeChange.Status.PENDING).update(
            status=RecipeChange.Status.REJECTED, decided_by=actor, decided_at=timezone.now()):
        raise Conflict(f"the change to {change.recipe.name} was decided a moment ago")
    audit.record("recipe.reject_change", actor=actor, source_ip=source_ip, target=str(change.recipe), change=change.pk,
                 proposed_by=change.proposed_by.get_username())
    change.refresh_from_db()
    return change
