"""Read-side queries for pages and the API: plain dicts, a fixed number of queries."""

from __future__ import annotations

import bisect
import csv
import io
import json
import uuid
from datetime import datetime

from django.contrib.auth import get_user_model
from django.core.paginator import Page, Paginator
from django.db import connection
from django.db.models import Prefetch, Q, QuerySet
from django.utils import timezone

from deployer import aws, ssh
from deployer.errors import AdapterError

from . import audit, cleanup, engine, permissions, plan, transitions
from .models import AUDIT_ENGINE_CALL, Approval, AuditEvent, Environment, Instance, LogLine, Release, StatusChange, Step

LOG_PAGE = 5000


def environment_dict(environment: Environment) -> dict:
    return {
        "name": environment.name,
        "region": environment.region,
        "load_balancer": environment.load_balancer_name or environment.target_group_arn,
        "public_url": environment.public_url,
        "desired_count": environment.desired_count,
        "base_ami": environment.base_ami,
        "last_baked_ami": environment.last_baked_ami,
        "recipe": environment.recipe.name,
        "four_eyes": environment.four_eyes,
        "gate_timeout": environment.gate_timeout,
        # who may deploy and decide here (empty: every deployer, every approver)
        "deploy_groups": _group_names(environment.deploy_groups),
        "verify_groups": _group_names(environment.verify_groups),
        "swap_groups": _group_names(environment.swap_groups),
        "approvals_required": environment.approvals_required,
    }


def _group_names(related) -> list[str]:
    return sorted(g.name for g in related.all())


ENVIRONMENT_GROUPS = ("deploy_groups", "verify_groups", "swap_groups")


def environments() -> list[dict]:
    return [environment_dict(e) for e in Environment.objects.select_related("recipe").prefetch_related(*ENVIRONMENT_GROUPS)
            .order_by("name")]


def release_for_detail(release_id: int) -> Release:
    return Release.objects.select_related("environment", "requested_by").prefetch_related(
        "environment__verify_groups", "environment__swap_groups",
        Prefetch("steps", queryset=Step.objects.select_related("assignee").prefetch_related(
            Prefetch("approvals", queryset=Approval.objects.select_related("user").order_by("at")))),
        Prefetch("instances", queryset=Instance.objects.order_by("created_at")),
        Prefetch("history", queryset=StatusChange.objects.select_related("step").order_by("at", "id")),
    ).get(pk=release_id)


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def release_dict(release: Release) -> dict:
    steps = list(release.steps.all())
    # what the release page reads for each step (its label, a failure in plain words): the same reading
    read = {row["step"].pk: row for row in timeline(release, steps, list(release.history.all()))}
    return {
        "id": release.pk,
        "uuid": str(release.uuid),
        "environment": release.environment.name,
        "revision": release.revision,
        "strategy": release.strategy,
        "fleet_size": release.fleet_size,
        "status": release.status,
        "error": release.error,
        "cancel_requested": release.cancel_requested,
        "actions": sorted(person_actions(release, steps)),
        "requested_by": release.requested_by.get_username(),
        "created_at": _time(release.created_at),
        "finished_at": _time(release.finished_at),
        "log_seq": release.log_seq,
        "image": release.state.get("image", ""),
        # was the revision found in the repository when the release was made (None: nobody asked)
        "revision_checked": (release.plan.get("revision_check") or {}).get("checked"),
        "changes": release.plan.get("changes"),
        "steps": [
            {
                "key": s.key, "kind": s.kind, "status": s.status, "attempts": s.attempts, "error": s.error,
                "started_at": _time(s.started_at), "finished_at": _time(s.finished_at),
                "waiting_for": waiting_for(s),
                "deadline": _time(s.deadline) if s.status in (Step.Status.RUNNING, Step.Status.AWAITING_APPROVAL) else None,
                "label": read[s.pk]["status"],
                "explanation": explanation_dict(read[s.pk]["explanation"]),
            }
            for s in steps
        ],
        "history": [
            {"at": _time(h.at), "step": h.step.key if h.step else None, "action": h.action, "from": h.from_status,
             "to": h.to_status, "reason": h.reason, "by": h.actor_name}
            for h in release.history.all()
        ],
        "gates": [
            {
                "key": s.key, "status": s.status, "deadline": _time(s.deadline), "card": s.result,
                "groups": sorted(g.name for g in permissions.gate_groups(release.environment, s.key)),
                "approvals_required": permissions.approvals_required(release),
                "assignee": s.assignee.get_username() if s.assignee_id else None,
                "decisions": [
                    {"by": a.user.get_username() if a.user else "greenlight", "decision": a.decision, "comment": a.comment, "at": _time(a.at)}
                    for a in s.approvals.all()
                ],
            }
            for s in steps if s.kind == Step.Kind.GATE
        ],
        "instances": [
            {"id": i.instance_id, "name": i.name, "role": i.role, "slot": i.slot, "address": i.address, "state": i.state}
            for i in release.instances.all()
        ],
    }


def log_lines(release_id: int, *, after: int = 0, limit: int = LOG_PAGE) -> dict:
    # tuples, not model instances: a page of 5,000 lines costs a third less to read (line_dict's shape)
    rows = LogLine.objects.filter(release_id=release_id, seq__gt=after).order_by("seq").values_list(
        "seq", "step", "host", "stream", "text", "at")[: min(limit, LOG_PAGE)]
    lines = [{"seq": seq, "step": step, "host": host, "stream": stream, "text": text, "at": at.isoformat()}
             for seq, step, host, stream, text, at in rows]
    return {"lines": lines, "next": lines[-1]["seq"] if lines else after}


def audit_events(*, environment: str = "", actor: str = "", action: str = "", release: int | None = None,
                 since: datetime | None = None, until: datetime | None = None, search: str = "") -> QuerySet:
    """`action` is a prefix ("release." for every release action); `search` a partial match, any case,
    on who, what, the target and the details."""
    events = AuditEvent.objects.select_related("environment")
    if environment:
        events = events.filter(environment__name=environment)
    if actor:
        events = events.filter(actor_name=actor)
    if action:
        events = events.filter(action__startswith=action)
    if release:
        events = events.filter(release_id=release)
    if since:
        events = events.filter(at__gte=since)
    if until:
        events = events.filter(at__lt=until)
    if search:
        events = events.filter(Q(actor_name__icontains=search) | Q(action__icontains=search) | Q(target__icontains=search)
                               | Q(details__icontains=search))
    return events


ENGINE_CALL = AUDIT_ENGINE_CALL


def audit_people(events: QuerySet) -> QuerySet:
    """Every event but the engine's AWS calls during a release (models.AUDIT_ENGINE_CALL)."""
    return events.exclude(ENGINE_CALL)


def audit_page(events: QuerySet, number, *, per_page: int) -> tuple[Page, list[AuditEvent]]:
    """A page of `events` and its rows. The page is found on ids alone (an index-only
    walk, however deep the page), then its 50 rows are read: a page near 100,000
    events does not read every row before it."""
    page = Paginator(events.values_list("pk", flat=True), per_page).get_page(number)
    found = AuditEvent.objects.select_related("environment").in_bulk(list(page))
    return page, [found[pk] for pk in page]


def audit_calls_of(parents: list[AuditEvent]) -> dict[int, list[AuditEvent]]:
    """The engine's calls each of `parents` caused: those of its release after it
    and before the release's next action, whether or not that one is on the page
    or matches the filters. Two queries, however many parents."""
    first: dict[int, int] = {}
    for p in parents:
        if p.release_id is not None:
            first[p.release_id] = min(p.seq, first.get(p.release_id, p.seq))
    calls: dict[int, list[AuditEvent]] = {p.pk: [] for p in parents}
    if not first:
        return calls
    after_first = Q()
    for release_id, seq in first.items():
        after_first |= Q(release_id=release_id, seq__gte=seq)
    causes: dict[int, list[tuple[int, int]]] = {}
    for pk, release_id, seq in AuditEvent.objects.filter(after_first).exclude(ENGINE_CALL).order_by("seq").values_list("pk", "release_id", "seq"):
        causes.setdefault(release_id, []).append((seq, pk))
    for call in AuditEvent.objects.filter(after_first, ENGINE_CALL).select_related("environment").order_by("seq"):
        chain_of = causes[call.release_id]
        cause = chain_of[bisect.bisect_left(chain_of, (call.seq, 0)) - 1][1]
        if cause in calls:
            calls[cause].append(call)
    return calls


def audit_choices() -> dict[str, list[str]]:
    """What the audit's dropdowns offer: every environment, and every actor and action the audit holds."""
    return {"environment": list(Environment.objects.order_by("name").values_list("name", flat=True)),
            "actor": _distinct("actor_name"), "action": _distinct("action")}


def _distinct(column: str) -> list[str]:
    # A loose index scan: one index probe per distinct value instead of reading
    # every row (PostgreSQL has no skip scan before 18); fine on 100,000 events.
    if connection.vendor != "postgresql":
        return list(AuditEvent.objects.order_by(column).values_list(column, flat=True).distinct())
    table = AuditEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"""
            WITH RECURSIVE walk(value) AS (
                (SELECT {column} FROM {table} ORDER BY {column} LIMIT 1)
                UNION ALL
                SELECT (SELECT {column} FROM {table} WHERE {column} > walk.value ORDER BY {column} LIMIT 1)
                FROM walk WHERE walk.value IS NOT NULL
            ) SELECT value FROM walk WHERE value IS NOT NULL""")
        return [row[0] for row in cursor.fetchall()]


CSV_HEADER = ["at", "actor", "source_ip", "action", "target", "environment", "release", "details"]


def audit_csv_rows(events: QuerySet, *, chunk_size: int = 2000):
    """The events as CSV lines, the header first (before any query runs: the first
    byte leaves at once), then read from the database a chunk at a time."""
    line = _CsvLine()
    yield line(CSV_HEADER)
    for event in events.iterator(chunk_size=chunk_size):
        d = audit_dict(event)
        yield line([d["at"], d["actor"], d["source_ip"] or "", d["action"], d["target"], d["environment"] or "",
                    d["release"] or "", json.dumps(d["details"], sort_keys=True)])


class _CsvLine:
    """One row, as the csv module quotes it, as a string."""

    def __init__(self):
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer)

    def __call__(self, row: list) -> str:
        self.buffer.seek(0)
        self.buffer.truncate()
        self.writer.writerow(row)
        return self.buffer.getvalue()


def audit_dict(event: AuditEvent) -> dict:
    return {
        "id": event.pk, "at": _time(event.at), "actor": event.actor_name, "source_ip": event.source_ip,
        "action": event.action, "target": event.target, "environment": event.environment.name if event.environment else None,
        "release": event.release_id, "details": event.details,
        "seq": event.seq, "prev_hash": event.prev_hash, "hash": event.hash,
    }


def audit_chain():
    """Whether the audit chain verifies, as the audit page says it (releases/audit.py)."""
    return audit.chain_status()


def audit_chain_dict() -> dict:
    verdict = audit_chain()
    return {"verified": verdict.ok, "events": verdict.events, "summary": str(verdict),
            "broken_at": verdict.event_id, "problem": verdict.problem or None}


# -- pages -----------------------------------------------------------------------

ACTIVE = ("queued", "running", "awaiting_approval", "failed", "rolling_back")


def waiting_on(user) -> list[Step]:
    """Open gates this person may decide (role, the gate's groups, four eyes) and has not approved yet, oldest first."""
    if not permissions.can_approve(user):
        return []
    gates = Step.objects.filter(status=Step.Status.AWAITING_APPROVAL).exclude(approvals__user=user).select_related(
        "release__environment", "release__requested_by").prefetch_related(
        "release__environment__verify_groups", "release__environment__swap_groups").order_by("started_at")
    return [g for g in gates if permissions.gate_refusal(user, g.release, g.key) is None]


def gate_cards(release: Release, steps: list[Step], user) -> list[dict]:
    """The release page's open gates, each with who may decide it, its approvals so far, who has
    taken it, and what `user` may do there (and why not)."""
    cards = []
    for step in steps:
        if step.kind != Step.Kind.GATE or step.status != Step.Status.AWAITING_APPROVAL:
            continue
        refusal = permissions.gate_refusal(user, release, step.key)
        approvers = [a.user.get_username() for a in step.approvals.all() if a.decision == Approval.Decision.APPROVE and a.user]
        approved = any(a.user_id == user.pk for a in step.approvals.all())
        needed = permissions.approvals_required(release)
        cards.append({
            "step": step, "key": step.key,
            "groups": sorted(g.name for g in permissions.gate_groups(release.environment, step.key)),
            "needed": needed, "given": len(approvers), "approvers": approvers, "remaining": max(needed - len(approvers), 0),
            "assignee": step.assignee.get_username() if step.assignee_id else "",
            "taken_by_me": step.assignee_id is not None and step.assignee_id == user.pk,
            "may_decide": refusal is None, "refusal": refusal[0] if refusal else "", "why_not": refusal[1] if refusal else "",
            "approved_by_me": approved,
        })
    return cards


def environment_access(environment: Environment) -> dict:
    """Who may deploy and decide in `environment`, for its page, with a warning for a gate
    that needs more approvals than there are people who may give them."""
    needed = environment.approvals_required
    gates = []
    for key in sorted(permissions.GATE_GROUPS, key=lambda k: [e.key for e in plan.BAKE].index(k)):
        groups = sorted(g.name for g in permissions.gate_groups(environment, key))
        deciders = permissions.gate_deciders(environment, key).count()
        warning = ""
        if needed > deciders:  # allowed (people join groups later), but no release passes this gate until then
            warning = (f"{key} needs {needed} approvals but only {deciders} "
                       f"{'person may' if deciders == 1 else 'people may'} decide it")
        gates.append({"key": key, "groups": groups, "deciders": deciders, "warning": warning})
    return {"deploy_groups": _group_names(environment.deploy_groups), "gates": gates, "needed": needed}


def active_releases(*, limit: int = 50) -> list[Release]:
    """Unfinished releases, newest first, with their steps (for `current_step`);
    the finished ones are `recent_releases`."""
    releases = Release.objects.select_related("environment", "requested_by").prefetch_related("steps")
    return list(releases.filter(status__in=ACTIVE).order_by("-created_at")[:limit])


def current_step(release: Release) -> Step | None:
    return next((s for s in release.steps.all() if s.status not in ("succeeded", "skipped")), None)


def recent_releases(*, limit: int = 20) -> list[tuple[Release, list[str], dict]]:
    """Finished releases, newest first, each with who approved its gates (a
    rejecter is not an approver) and how it went (`outcomes`: its own time, its
    rollback's and what it served apart, and how it ended): four queries at most
    however long the history (its steps are not needed, and loading them for every
    row was most of the dashboard's time with 10,000 releases)."""
    releases = list(Release.objects.select_related("environment", "requested_by").exclude(status__in=ACTIVE)
                    .order_by("-created_at")[:limit])
    names: dict[int, set[str]] = {r.pk: set() for r in releases}
    approved = Approval.objects.filter(step__release__in=releases, user__isnull=False, decision=Approval.Decision.APPROVE)
    for release_id, username in approved.values_list("step__release_id", f"user__{get_user_model().USERNAME_FIELD}"):
        names[release_id].add(username)
    found = outcomes(releases)
    return [(r, sorted(names[r.pk]), found[r.pk]) for r in releases]


# -- how a release went: what its history says, for the dashboard's rows and the release page ----------

# The step-level moves that say what stopped a release: which step failed, which gate was rejected or timed out.
STOPPED_BY = ("fail", "reject", "expire")
OUTCOME_FIELDS = ("release", "step", "action", "from_status", "to_status", "reason", "actor_name", "at", "step__key")


def outcomes(releases: list[Release]) -> dict[int, dict]:
    """`outcome_of` for each release, by id: its release-level status changes (and the
    step-level ones that stopped it) in one query, however many releases; one more, of
    the audit, only when a cancel the engine carried out hides who asked for it."""
    if not releases:
        return {}
    changes: dict[int, list[StatusChange]] = {r.pk: [] for r in releases}
    rows = (StatusChange.objects.filter(release__in=[r.pk for r in releases])
            .filter(Q(step__isnull=True) | Q(action__in=STOPPED_BY))
            .select_related("step").only(*OUTCOME_FIELDS).order_by("at", "id"))
    for change in rows:
        changes[change.release_id].append(change)
    asked = cancel_requesters([pk for pk, rows in changes.items() if _engine_cancel(rows)])
    return {r.pk: outcome_of(r, changes[r.pk], cancelled_by=asked.get(r.pk, "")) for r in releases}


def _engine_cancel(changes) -> bool:
    # a cancel asked while a step worked is carried out by the engine when the step stops: the
    # move is the engine's, and who asked is in the audit (services.release_cancel records it)
    return any(c.step_id is None and c.action == "cancel" and c.actor_name in (audit.ENGINE, "") for c in changes)


def cancel_requesters(release_ids: list[int]) -> dict[int, str]:
    """Who first asked to cancel each release, from the audit."""
    if not release_ids:
        return {}
    asked = (AuditEvent.objects.filter(release_id__in=release_ids, action="release.cancel")
             .order_by("-seq").values_list("release_id", "actor_name"))
    return dict(asked)  # the first asker wins: read last


def release_outcome(release: Release, history: list[StatusChange]) -> dict:
    """`outcome_of` for the release page, from the history it has read already."""
    asked = cancel_requesters([release.pk]) if _engine_cancel(history) else {}
    return outcome_of(release, history, cancelled_by=asked.get(release.pk, ""))


def outcome_of(release: Release, changes, *, cancelled_by: str = "") -> dict:
    """What a release's history says of it, from its status changes in order (release-level ones,
    and any step-level fail, reject or expire): a status alone cannot say that a rolled-back
    release had succeeded and served for hours first, nor who rolled it back and why.

    - `release`: its own time, from its creation to its first success, or to the failure it was
      rolled back or cancelled after (a failure retried is not its end), or to its rollback's start;
    - `succeeded_at`, and `served`: from its success to its rollback's start;
    - `rollback`: from the first move to rolling_back to the end (now, while it rolls back);
      `rollback_action` (rollback, reject, expire, cancel), `rollback_by` (a person, or "" for the
      engine), `rollback_why` (the rejection with its comment, the timeout, or the failure before);
    - `ended_at`, and `how`: how it ended in a few words ("rolled back by lena after serving 2h 03m").
    Rows made by hand (tests, old data) may lack moves: each falls back to the release's own fields."""
    succeeded_at = failed = rollback = ended_at = stopped = None
    for change in changes:
        if change.step_id is not None:
            if rollback is None and change.action in STOPPED_BY:
                stopped = change.step  # the step that failed, the gate rejected or timed out
            continue
        if rollback is None:
            if change.to_status == Release.Status.SUCCEEDED and succeeded_at is None:
                succeeded_at = change.at
            elif change.to_status == Release.Status.FAILED:
                failed = change
            elif change.action == "retry":
                failed = stopped = None  # it went on: that failure was not its end
            if change.to_status == Release.Status.ROLLING_BACK:
                rollback = change
        if change.to_status in (Release.Status.ROLLED_BACK, Release.Status.CANCELLED):
            ended_at = change.at
    if release.status in transitions.ENDINGS:
        ended_at = release.finished_at or ended_at
    if succeeded_at is None and release.status == Release.Status.SUCCEEDED:
        succeeded_at = release.finished_at
    if rollback is not None:
        own_end = succeeded_at or (failed.at if failed else rollback.at)
    else:
        own_end = succeeded_at or (failed.at if failed else ended_at)
    served = (succeeded_at, rollback.at) if succeeded_at and rollback else None
    by, why, action = "", "", ""
    if rollback is not None:
        action = rollback.action
        by = rollback.actor_name if rollback.actor_name not in (audit.ENGINE, "") else ""
        if action == "cancel" and not by:
            by = cancelled_by
        if action in ("reject", "expire"):
            why = rollback.reason
        elif failed is not None:
            why = failed.reason or (f"{stopped.key} failed" if stopped else "")
    outcome = {
        "release": (release.created_at, own_end), "succeeded_at": succeeded_at, "served": served,
        "rollback": (rollback.at, ended_at) if rollback else None, "rollback_started": rollback.at if rollback else None,
        "rollback_action": action, "rollback_by": by, "rollback_why": why, "ended_at": ended_at,
        "failed": failed is not None,
        # what the rollback did, for a sentence: under way while it rolls back (or its rollback failed)
        "verb": "rollback started" if release.status not in transitions.ENDINGS else _ended_as(release, action),
    }
    outcome["how"] = _how(release, outcome, stopped.key if stopped else "")
    return outcome


def _ended_as(release: Release, action: str) -> str:
    return "cancelled" if action == "cancel" or release.status == Release.Status.CANCELLED else "rolled back"


def _how(release: Release, outcome: dict, stopped: str) -> str:
    """How a release that did not simply succeed ended, in a few words."""
    action, by = outcome["rollback_action"], outcome["rollback_by"]
    if not action:
        return ""
    verb = outcome["verb"]
    if action == "reject":
        return f"{verb}: {stopped + ' ' if stopped else ''}rejected{f' by {by}' if by else ''}"
    if action == "expire":
        return f"{verb}: {stopped or 'a gate'} timed out"
    how = f"{verb} by {by}" if by else verb
    if outcome["served"]:
        return f"{how} after serving {elapsed(*outcome['served'])}"
    if outcome["failed"]:
        return f"{how} after {f'{stopped} failed' if stopped else outcome['rollback_why'] or 'a failure'}"
    return how


def elapsed(start: datetime, end: datetime | None = None) -> str:
    """'1:02', '3h 04m': how long from start to end (or to now)."""
    seconds = int(((end or timezone.now()) - start).total_seconds())
    if seconds < 3600:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def environment_rows() -> list[dict]:
    """The dashboard's row per environment: what it runs (its last succeeded release) and since
    when, its last release and that release's state. Three queries however many releases."""
    from django.db.models import OuterRef, Subquery

    # a subquery per column, not DISTINCT ON: the same on SQLite (the demo's default) and PostgreSQL
    of_environment = Release.objects.filter(environment=OuterRef("pk"))
    environments = list(Environment.objects.order_by("name").annotate(
        serving_id=Subquery(of_environment.filter(status=Release.Status.SUCCEEDED)
                            .order_by("-finished_at", "-id").values("pk")[:1]),
        last_id=Subquery(of_environment.order_by("-created_at", "-id").values("pk")[:1])))
    wanted = {e.serving_id for e in environments} | {e.last_id for e in environments}
    releases = Release.objects.select_related("requested_by").in_bulk([pk for pk in wanted if pk is not None])
    return [{"environment": e, "serving": releases.get(e.serving_id), "last": releases.get(e.last_id)}
            for e in environments]


def log_text(release_id: int):
    """Every line, as text, for a download; streamed in pages."""
    after = 0
    while True:
        lines = list(LogLine.objects.filter(release_id=release_id, seq__gt=after).order_by("seq")[:LOG_PAGE])
        if not lines:
            return
        for line in lines:
            yield f"{line.seq}\t{line.at.isoformat()}\t{line.step}\t{line.host or '-'}\t{line.stream}\t{line.text}\n"
        after = lines[-1].seq


def environment_instances(environment: Environment, *, registered_only: bool = False) -> list[dict]:
    """The environment's instances as AWS reports them, with their load balancer health."""
    cloud = engine.cloud_for(plan.settings_of(environment))
    health = cloud.health()
    by_tag = cloud.instances(tags={aws.TAG_ENVIRONMENT: environment.name}, states=("pending", "running", "stopping", "stopped"))
    registered = [i for i in cloud.instances(ids=list(health)) if i.id not in {b.id for b in by_tag}] if health else []
    instances = [*by_tag, *registered]
    launched_by = _launched_by(instances)
    rows = [
        {"id": i.id, "name": i.name, "state": i.state, "address": i.address(environment.address),
         "health": health.get(i.id, "not registered"), "in_service": health.get(i.id) == "InService",
         "revision": i.tags.get(aws.TAG_REVISION, ""), **launched_by[i.id]}
        for i in instances
    ]
    if registered_only:
        rows = [r for r in rows if r["id"] in health]
    return sorted(rows, key=lambda r: (len(r["name"]), r["name"]))


def environment_ssh_config(environment: Environment, *, known_hosts: str) -> tuple[str, str]:
    """An OpenSSH config of the environment's running instances, one Host per
    Name tag (the seed's `ec2ssh`), and the known_hosts file it points to
    (`known_hosts`: its path as the config names it). Each host's key is the
    one a release pinned, else the one its console output shows; a host with
    neither is listed without a key, and ssh refuses it. The bastion, if the
    environment has one, is a Host of its own with its pinned key, and every
    instance is reached through it (ProxyJump)."""
    cloud = engine.cloud_for(plan.settings_of(environment))
    running = cloud.instances(tags={aws.TAG_ENVIRONMENT: environment.name}, states=("pending", "running"))
    listed = {i.id for i in running}
    if registered := [i for i in cloud.health() if i not in listed]:
        running += [i for i in cloud.instances(ids=registered) if i.state in ("pending", "running")]
    pinned = dict(Instance.objects.filter(instance_id__in=[i.id for i in running]).exclude(host_key="")
                  .order_by("created_at").values_list("instance_id", "host_key"))  # the latest wins
    hosts = []
    for info in sorted(running, key=lambda i: (len(i.name), i.name, i.id)):
        key = pinned.get(info.id)
        if not key:
            keys = cloud.console_host_keys(info.id)
            key = next((k for k in keys if k.startswith("ssh-ed25519")), keys[0] if keys else "")
        hosts.append(ssh.ConfigHost(name=info.name, address=info.address(environment.address), host_key=key,
                                    instance_id=info.id))
    jump = None
    if environment.bastion_host:
        jump = ssh.Target(host=environment.bastion_host, port=environment.bastion_port,
                          user=environment.bastion_user or environment.ssh_user, host_key=environment.bastion_host_key)
    return ssh.openssh_config(
        hosts, user=environment.ssh_user, port=environment.ssh_port, key_file=environment.ssh_key_file,
        known_hosts=known_hosts, jump=jump, jump_key_file=environment.bastion_key_file or environment.ssh_key_file,
        jump_alias=f"{environment.name}-bastion",
        heading=f"Greenlight: the instances of {environment.name}, written {timezone.now():%Y-%m-%d %H:%M} UTC.\n"
                f"Use: ssh -F <this file> {hosts[0].name if hosts and hosts[0].name else 'NAME'}\n"
                "IdentityFile is the key's path on Greenlight's workers; the key itself is not in here.")


def cleanup_schedule(environment: Environment) -> dict:
    """What the clean-up deletes next, for the environment page: the
    instances the sweep terminates, with when (from the database; the
    images, from AWS, are `cleanup_images`, loaded after the page)."""
    return {"instances": cleanup.instance_schedule(environment)}


def cleanup_images(environment: Environment) -> dict:
    """The environment's baked images, kept or deleted at the next clean-up, and why."""
    try:
        images, error = cleanup.image_schedule(environment), ""
    except AdapterError as exc:
        images, error = [], str(exc)
    return {"images": images, "images_error": error}


def _launched_by(instances: list[aws.InstanceInfo]) -> dict[str, dict]:
    """Instance id -> {"release": the id of the release in this database that
    launched it, or None; "release_number": the number its tags show}. An
    instance tagged by another database's release (a lost or replaced one)
    names its number but links nowhere: that number here is another release."""
    by_uuid, legacy = {}, {}
    for i in instances:
        tag = i.tags.get(aws.TAG_RELEASE, "")
        if tag.isdigit():
            legacy[i.id] = int(tag)  # a release from before uuids: tagged with its id
        elif tag:
            try:
                by_uuid[i.id] = uuid.UUID(tag)
            except ValueError:
                pass
    known = dict(Release.objects.filter(uuid__in=set(by_uuid.values())).values_list("uuid", "pk")) if by_uuid else {}
    # a release from before uuids counts only if it recorded the instance itself
    recorded = set(Instance.objects.filter(instance_id__in=list(legacy), release_id__in=set(legacy.values()))
                   .values_list("instance_id", "release_id")) if legacy else set()
    found = {}
    for i in instances:
        number = i.tags.get(aws.TAG_RELEASE_NUMBER, "") or (str(legacy[i.id]) if i.id in legacy else "")
        if i.id in by_uuid:
            pk = known.get(by_uuid[i.id])
        else:
            pk = legacy[i.id] if (i.id, legacy.get(i.id)) in recorded else None
        found[i.id] = {"release": pk, "release_number": number}
    return found


def _account(region: str, aws_endpoint_url: str, aws_credentials: str) -> aws.Account:
    return engine.account_for({"region": region, "aws_endpoint_url": aws_endpoint_url, "aws_credentials": aws_credentials})


def describe_load_balancer(*, region: str, aws_endpoint_url: str, aws_credentials: str, load_balancer_name: str) -> dict:
    return aws.describe_classic_load_balancer(_account(region, aws_endpoint_url, aws_credentials), load_balancer_name)


def describe_target_group(*, region: str, aws_endpoint_url: str, aws_credentials: str, target_group_arn: str) -> dict:
    return aws.describe_target_group(_account(region, aws_endpoint_url, aws_credentials), target_group_arn)


def waiting_for(step: Step) -> str:
    """What a step waits for, for people: AWS, or, for a step whose worker
    went quiet, that it is being taken back (before and after the sweep)."""
    if step.status == Step.Status.RUNNING and step.lease_owner and step.lease_expires_at and step.lease_expires_at < timezone.now():
        return "the sweep to take it back: its worker stopped renewing its lease"
    if step.status in (Step.Status.RUNNING, Step.Status.PENDING):
        return step.waiting_for
    return ""


def person_actions(release: Release, steps: list[Step]) -> set[str]:
    """The buttons the release page shows: what the table of moves allows for
    its status, less what the services would refuse anyway."""
    actions = transitions.person_actions(release.status)
    failed = next((s for s in steps if s.status == Step.Status.FAILED), None)
    rolled_back = any(s.kind == Step.Kind.ROLLBACK for s in steps) or release.state.get("rolled_back")
    if release.cancel_requested and release.status != Release.Status.FAILED:
        actions.discard("cancel")  # asked already (a failed one may be asked again: it rolls back again)
    if transitions.too_late_to_cancel(steps):
        actions.discard("cancel")
    if failed is None or failed.kind != Step.Kind.ACTION or rolled_back:
        actions.discard("retry")
    if release.state.get("old_terminated"):
        actions.discard("rollback")
    return actions


def deliveries(*, environment: Environment | None = None, release: Release | None = None, limit: int = 50) -> list:
    """The latest deliveries of an environment's or a release's notifications, newest first."""
    from .models import Delivery

    rows = Delivery.objects.select_related("notification").order_by("-created_at", "-id")
    if environment is not None:
        rows = rows.filter(notification__environment=environment)
    if release is not None:
        rows = rows.filter(notification__release=release)
    return list(rows[:limit])


# -- the release page: its timeline as people read it, what a button will do, how it ended ------------------


ENDED = (Release.Status.SUCCEEDED, Release.Status.ROLLED_BACK, Release.Status.CANCELLED)
# what `timeline` may call a step: its status, or what a person reads instead
TIMELINE_LABELS = (*Step.Status.values, "cancelled", "rejected")


def timeline(release: Release, steps: list[Step], history: list[StatusChange]) -> list[dict]:
    """The steps with the status a person reads: a step that never ran in a release that is
    over (or rolling back) is "skipped", a gate closed by a cancel or a rollback "cancelled",
    a rejected one "rejected"; a failed step says what failed and whether retrying helps.
    Rollback steps follow, marked as the rollback's."""
    from . import failures

    closed = {h.step_id for h in history if h.step_id and h.action == "close"}
    rejected = {h.step_id for h in history if h.step_id and h.action == "reject"}
    over = release.status in (*ENDED, Release.Status.ROLLING_BACK)
    rows, rollback_seen = [], False
    for step in steps:
        shown = step.status
        if step.status == Step.Status.PENDING and not step.attempts and over and step.kind != Step.Kind.ROLLBACK:
            shown = "skipped"
        elif step.status == Step.Status.FAILED and step.pk in closed:
            shown = "cancelled"
        elif step.status == Step.Status.FAILED and step.pk in rejected:
            shown = "rejected"
        explanation = None
        if step.status == Step.Status.FAILED and step.kind != Step.Kind.GATE:
            explanation = failures.explain(step.error, step=step.key, revision=release.revision)
        first_rollback = step.kind == Step.Kind.ROLLBACK and not rollback_seen
        rollback_seen = rollback_seen or step.kind == Step.Kind.ROLLBACK
        rows.append({"step": step, "status": shown, "explanation": explanation, "first_rollback": first_rollback})
    return rows


def explanation_dict(explanation) -> dict | None:
    """A failed step's explanation (failures.Explanation) as the API gives it: what failed, the verdict on
    retrying, and what to do next."""
    if explanation is None:
        return None
    return {"what": explanation.what, "retry": explanation.retry, "advice": explanation.advice}


def _names(instances: list[Instance]) -> str:
    return ", ".join(f"{i.name or i.instance_id} ({i.instance_id})" for i in instances) or ""


def _seconds(value: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if value >= size:
            n = round(value / size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{value} seconds"


def confirmations(release: Release, steps: list[Step], instances: list[Instance], explanation=None) -> dict[str, str]:
    """What each of the page's buttons (Retry, Cancel, Roll back, Reject) will do, and to which
    instances, for its confirmation dialog."""
    retention = _seconds(int(release.plan.get("environment", {}).get("retention", 86400)))
    new = [i for i in instances if i.role in (Instance.Role.CANARY, Instance.Role.CLONE)]
    old = [i for i in instances if i.role == Instance.Role.OLD]
    serving_old = f"the old fleet ({_names(old)})" if old else "the instances serving now"
    if new:
        new_fate = f"the new instances {_names(new)} stop, and are terminated {retention} later"
    else:
        new_fate = "no new instance was launched yet"
    swapped = any(s.key == "swap_elb" and s.status == Step.Status.SUCCEEDED for s in steps)
    failed = next((s for s in steps if s.status == Step.Status.FAILED and s.kind == Step.Kind.ACTION), None)
    retry = f"Runs {failed.key} again" if failed else "Runs the failed step again"
    if new:
        retry += f" on {_names(new)}"
    retry += "."
    if explanation is not None and explanation.retry == "will not help":
        retry += f" It failed because {explanation.what}: retrying will not help."
    back = (f"{serving_old} goes back behind the load balancer and serves again; " if swapped
            else f"{serving_old} keeps serving; ")
    return {
        "retry": retry,
        "cancel": (f"Stops release #{release.pk} and cleans up; it ends as cancelled. {back}{new_fate}. "
                   "A baked image of this release is deleted."),
        "rollback": (f"Undoes release #{release.pk}; it ends as rolled back. {back}{new_fate}. "
                     "A baked image of this release is deleted."),
        "reject": f"The release rolls back: {back}{new_fate}.",
    }


def end_summary(release: Release, instances: list[Instance]) -> dict | None:
    """After a release ends: what serves now, which instances stop or are terminated, and when."""
    if release.status not in ENDED:
        return None
    due = cleanup.due_at(release) if release.finished_at else None
    new = [i for i in instances if i.role in (Instance.Role.CANARY, Instance.Role.CLONE)]
    old = [i for i in instances if i.role == Instance.Role.OLD]
    if release.status == Release.Status.SUCCEEDED:
        done = release.state.get("old_terminated")
        return {
            "serving": f"{release.revision} on {_names(new) or 'the new fleet'}",
            "stopped": _names(old) or ", ".join(release.state.get("old", [])),
            "fate": "terminated" if done else "stopped; terminated",
            "at": None if done else due,
        }
    before = (Release.objects.filter(environment_id=release.environment_id, status=Release.Status.SUCCEEDED,
                                     created_at__lt=release.created_at).order_by("-created_at").first())
    done = release.state.get("new_terminated")
    return {
        "serving": (f"{before.revision} (release #{before.pk})" if before else "what served before")
        + (f" on {_names(old)}" if old else ", as before"),
        "stopped": _names(new),
        "fate": "terminated" if done else "stopped; terminated",
        "at": None if done or not new else due,
    }
