"""The audit trail: who did what, to what, when, from where -- and proof that
nobody changed it since."""

from __future__ import annotations

from dataclasses import dataclass

from django.core.cache import cache
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from . import chain
from .models import AuditChainHead, AuditEvent

ENGINE = "greenlight"
HEAD = 1  # the id of the one AuditChainHead row


def record(action: str, *, actor=None, source_ip: str | None = None, target: str = "", environment=None, release=None, **details) -> AuditEvent:
    signed_in = actor is not None and actor.is_authenticated
    environment = environment or (release.environment if release is not None else None)
    event = AuditEvent(
        action=action,
        actor=actor if signed_in else None,
        actor_name=actor.get_username() if signed_in else ENGINE,
        # hashed as the database will give it back
        source_ip=AuditEvent._meta.get_field("source_ip").get_prep_value(source_ip) or None,
        target=target,
        environment_id=environment.pk if environment is not None else None,
        release_id=release.pk if release is not None else None,
        details=chain.canonical_details(details),
    )
    with transaction.atomic():
        head = _lock_head()
        # the time is taken in turn too, so it never goes back along the chain
        event.at, event.seq, event.prev_hash = timezone.now(), head.seq + 1, head.hash
        event.hash = chain.mac(event)
        event.save(force_insert=True)
        AuditChainHead.objects.filter(pk=HEAD).update(seq=event.seq, hash=event.hash)
    # the lock is held until the outermost transaction commits: a caller records last
    return event


def _lock_head() -> AuditChainHead:
    # An UPDATE, not SELECT ... FOR UPDATE: it waits for the other appender on
    # PostgreSQL and takes SQLite's one write lock, so the read after it sees the
    # chain as the previous appender committed it. The row is created on first
    # use (a test database's flush truncates it with the events).
    if not AuditChainHead.objects.filter(pk=HEAD).update(seq=F("seq")):
        AuditChainHead.objects.bulk_create([AuditChainHead(pk=HEAD)], ignore_conflicts=True)
        AuditChainHead.objects.filter(pk=HEAD).update(seq=F("seq"))
    return AuditChainHead.objects.get(pk=HEAD)


# -- verifying ------------------------------------------------------------------------------

REORDER_WINDOW = 64  # how far from its place a moved event is looked for when naming the break


@dataclass(frozen=True)
class Verdict:
    ok: bool
    events: int  # events verified (all of them when ok)
    seq: int = 0  # the last verified position and its hash: where the next check may start
    hash: str = chain.GENESIS
    event_id: int | None = None  # the first broken link
    problem: str = ""  # edited, deleted, inserted, reordered
    detail: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"Chain verified: {self.events:,} events"
        where = f"event #{self.event_id}" if self.event_id is not None else f"the end (after position {self.seq})"
        return f"Chain broken at {where}: {self.problem}" + (f" ({self.detail})" if self.detail else "")


def verify(*, after: tuple[int, str] | None = None, counted: int = 0) -> Verdict:
    """Walk the chain in order (from `after`, a position and hash already verified)
    and name the first broken link."""
    secret = chain.key()
    seq, prev = after or (0, chain.GENESIS)
    if after and seq and not AuditEvent.objects.filter(seq=seq, hash=prev).exists():
        return verify()  # what was verified before changed since: start over
    events = counted
    while True:
        rows = AuditEvent.objects.filter(seq__gt=seq).order_by("seq").iterator(chunk_size=2000)
        current = next(rows, None)
        while current is not None:
            following = next(rows, None)
            expected = seq + 1
            if current.seq != expected:
                missing = current.seq - expected
                where = f"at position {expected}" if missing == 1 else f"positions {expected}-{current.seq - 1}"
                return Verdict(False, events, seq, prev, current.pk, "deleted", f"{missing} event{'s' if missing > 1 else ''} before it missing, {where}")
            if chain.mac(current, secret=secret) != current.hash:
                return Verdict(False, events, seq, prev, current.pk, *_why_not(current, following, prev, secret))
            if current.prev_hash != prev:
                return Verdict(False, events, seq, prev, current.pk, "reordered", "it does not follow the event before it")
            seq, prev, events = current.seq, current.hash, events + 1
            current = following
        # An append writes its event and the head in one transaction, so the head,
        # read after the walk, is at least as far as any event the walk saw.
        head = AuditChainHead.objects.filter(pk=HEAD).first()
        head_seq, head_hash = (head.seq, head.hash) if head else (0, chain.GENESIS)
        if head_seq == seq and head_hash == prev:
            return Verdict(True, events, seq, prev)
        if head_seq > seq and AuditEvent.objects.filter(seq__gt=seq).exists():
            continue  # appended while we walked
        if head_seq > seq:
            return Verdict(False, events, seq, prev, None, "deleted",
                           f"the newest {head_seq - seq} event(s) are missing: the chain ends at {seq}, its head says {head_seq}")
        beyond = AuditEvent.objects.filter(seq__gt=head_seq).order_by("seq").first()
        if beyond is not None:
            return Verdict(False, events, seq, prev, beyond.pk, "inserted", "past the chain's recorded head")
        return Verdict(False, events, seq, prev, None, "edited", "the chain's head does not match its last event")


def _why_not(current: AuditEvent, following: AuditEvent | None, prev: str, secret: bytes) -> tuple[str, str]:
    """An event whose hash does not match its content: say what most likely happened."""
    for seq in range(max(1, current.seq - REORDER_WINDOW), current.seq + REORDER_WINDOW + 1):
        if seq != current.seq and chain.mac(current, seq=seq, secret=secret) == current.hash:
            return "reordered", f"it was written at position {seq}, found at {current.seq}"
    if following is not None and following.prev_hash == prev and chain.mac(following, seq=current.seq, secret=secret) == following.hash:
        return "inserted", f"the event after it was written at position {current.seq}"
    if following is None:
        head = AuditChainHead.objects.filter(pk=HEAD).first()
        if head is not None and head.seq < current.seq:
            return "inserted", "past the chain's recorded head"
    return "edited", "its content does not match its hash"


# -- for the audit page ---------------------------------------------------------------------

STATUS_KEY = "audit-chain-verified"
FULL_EVERY = 600  # seconds: the page walks the whole chain this often, and only new events between


def chain_status() -> Verdict:
    """What the audit page shows, cheap on a big table: the last verified position
    is cached per process, and the next view verifies only the events after it;
    the whole chain is walked again every FULL_EVERY seconds (`manage.py
    verify_audit` always walks all of it)."""
    known = cache.get(STATUS_KEY)
    if known and known["ok"]:
        verdict = verify(after=(known["seq"], known["hash"]), counted=known["events"])
    else:
        verdict = verify()
    started = known["started"] if known and known["ok"] and verdict.ok else timezone.now().timestamp()
    left = FULL_EVERY - (timezone.now().timestamp() - started)
    if left > 0:
        cache.set(STATUS_KEY, {"ok": verdict.ok, "seq": verdict.seq, "hash": verdict.hash, "events": verdict.events,
                               "started": started}, left)
    return verdict

