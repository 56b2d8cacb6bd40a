"""Release logs: redact, number, store in batches, then broadcast.

Lines are stored first (numbered per release, so a browser that missed a
broadcast asks for `after=<seq>` and gets exactly what it lacks) and sent to
the release's group second, in batches, because one channel-layer message
per line tops out near a thousand lines a second. A line that no other line
follows is stored within about 50 ms anyway, by a background thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import namedtuple
from datetime import datetime
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F

from deployer.redact import REDACTED, Redactor  # noqa: F401 (REDACTED: for callers)

from . import broadcast
from .models import LogLine, Release

log = logging.getLogger(__name__)

# A write stores the batch when it has BATCH_LINES lines or BATCH_SECONDS
# passed since the last one, so a flood goes out in big messages; the
# background flusher stores a trickle's lines once the first of them waited
# TRICKLE_SECONDS, and anything pending QUIET_SECONDS after the last flush, so
# no line waits long (`make bench`: at 1,000 lines/s a line reached the browser
# in about 35 ms at the median when the flusher waited 25 ms for every batch;
# about 200 ms when it waited 0.25 s).
BATCH_LINES = 2000
BATCH_SECONDS = 0.25
QUIET_SECONDS = 0.025  # after this long with no flush, the background flusher stores what is pending
TRICKLE_LINES = 100  # fewer pending than this are a trickle: stored once the first waited TRICKLE_SECONDS
TRICKLE_SECONDS = 0.01  # (more are a flood, left to grow to a batch of QUIET_SECONDS: fewer, bigger messages)
FLUSHER_TICK_SECONDS = 0.005  # how often it looks: a line waits at most QUIET_SECONDS plus this
FLUSHER_IDLE_SECONDS = 2.0  # a flusher with nothing to store this long ends; the next line starts another
BACKGROUND_LOCK_TIMEOUT = "1s"  # how long the flusher waits for the release row (see _flush_quietly)
class LogWriter:
    """Collects a release's lines from any thread; flush() stores and sends them.

    Lines are stored in batches when a new line arrives (BATCH_LINES, or
    BATCH_SECONDS since the last flush). So that no line is held back long, a
    background flusher (a thread, started with the first pending line, ending
    after FLUSHER_IDLE_SECONDS with nothing to do) stores a few pending lines
    once the first waited TRICKLE_SECONDS (the last line before a quiet spell,
    a steady trickle's lines every ten milliseconds or so), and more once
    QUIET_SECONDS pass with no flush. close(), or leaving a `with` block,
    stops that thread and flushes.
    """

    def __init__(self, release_id: int, *, secrets: list[str] = ()):
        self.release_id = release_id
        self.redact = Redactor(secrets)
        self.pending: list[tuple] = []  # (source, text, at), source being (step, host, stream); not redacted yet
        self.lock = threading.Lock()  # guards pending, last_flush and the flusher
        # one flush at a time: a batch taken later must not be numbered first, and
        # lines are redacted in the order they came (a private key's state is per source)
        self.flushing = threading.Lock()
        self.redacted: list[tuple] = []  # under `flushing`: lines redacted once, which a failed store put back
        self.last_flush = time.monotonic()
        self.first_pending = 0.0  # when the oldest pending line was written (time.monotonic())
        self.flusher: _Flusher | None = None
        self.tz = dt_timezone.utc if settings.USE_TZ else None

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def write(self, step: str, text: str, *, host: str = "", stream: str = "info") -> None:
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")  # no text column of PostgreSQL's holds NUL
        with self.lock:
            if not self.pending:
                self.first_pending = time.monotonic()
            self.pending.append(((step, host, stream), text, datetime.now(self.tz)))  # timezone.now(), less its look-up
            due = len(self.pending) >= BATCH_LINES or time.monotonic() - self.last_flush > BATCH_SECONDS
            if not due and self.flusher is None:
                self.flusher = _Flusher(self)
        if due:
            self.flush()

    def flush(self) -> None:
        """Store and send every pending line before returning."""
        with self.flushing:
            self._store_or_put_back(self._take())

    def close(self) -> None:
        """Stop the background flusher and flush; a later write starts a new flusher."""
        with self.lock:
            flusher, self.flusher = self.flusher, None
        if flusher:
            flusher.stop()
        self.flush()

    def _take(self) -> list[tuple]:
        """The lines to store next, redacted, as (step, host, stream, text, at); the caller holds `flushing`.

        Redacted here, a batch at a time (Redactor.lines), not line by line as
        they are written: the same result for far less work per line."""
        with self.lock:
            pending, self.pending = self.pending, []
            self.last_flush = time.monotonic()
        batch, self.redacted = self.redacted, []
        if pending:
            sources = [source for source, _, _ in pending]
            texts = self.redact.lines([text for _, text, _ in pending], sources)
            batch += [(*source, text, at) for source, text, (_, _, at) in zip(sources, texts, pending)]
        return batch

    def _store(self, batch: list[tuple], *, wait_for_row: str = "") -> None:
        if not batch:
            return
        with transaction.atomic():
            if wait_for_row and connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(f"SET LOCAL lock_timeout = '{wait_for_row}'")
            first = _allocate(self.release_id, len(batch))
            rows = [StoredLine(self.release_id, first + i, *line) for i, line in enumerate(batch)]
            _insert(rows)
        broadcast.log_lines(self.release_id, [line_dict(row) for row in rows])

    def _flush_quietly(self) -> bool:
        """The flusher's flush: True if it stored lines, False if there were none.

        It gives up rather than wait long for the release row: a caller that
        holds that row in a transaction and then flushes would wait on this
        thread while this thread waits on it. Lines it could not store go back
        in front, in order, for the next flush(), close() or flusher.
        """
        with self.lock:
            now = time.monotonic()
            trickle = len(self.pending) < TRICKLE_LINES and now - self.first_pending >= TRICKLE_SECONDS
            if not self.pending or not (trickle or now - self.last_flush >= QUIET_SECONDS):
                return False  # nothing waits, or a flood's batch is still growing (or writes flush it themselves)
        with self.flushing:
            batch = self._take()  # empty if a write's flush took the lines meanwhile
            if not batch:
                return False
            self._store_or_put_back(batch, wait_for_row=BACKGROUND_LOCK_TIMEOUT)
        return True

    def _store_or_put_back(self, batch: list[tuple], **options) -> None:
        """Lines that could not be stored (the database went away) go back in
        front, in order, for the next flush(), close() or flusher."""
        try:
            self._store(batch, **options)
        except Exception:
            self.redacted = batch  # in front of what is pending, redacted already (never twice); under `flushing`
            raise

    def _retire(self, flusher: _Flusher, *, even_with_lines_pending: bool = False) -> bool:
        """Forget `flusher`, so the next write starts another; False if lines wait for it."""
        with self.lock:  # under the lock write() checks, so no line is left without a flusher
            if self.pending and not even_with_lines_pending:
                return False
            if self.flusher is flusher:
                self.flusher = None
            return True


class _Flusher:
    """The thread that stores a writer's lines when no new line comes to do it.

    A daemon, so a writer nobody closed never keeps a worker from exiting.
    """

    def __init__(self, writer: LogWriter):
        self.writer = writer
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"log-flusher-{writer.release_id}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def run(self) -> None:
        idle_since = time.monotonic()
        try:
            while not self.stopping.wait(FLUSHER_TICK_SECONDS):
                try:
                    stored = self.writer._flush_quietly()
                except Exception:
                    log.warning("could not store the log lines of release %s yet", self.writer.release_id, exc_info=True)
                    self.writer._retire(self, even_with_lines_pending=True)  # the next write starts a fresh one
                    return
                if stored:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > FLUSHER_IDLE_SECONDS and self.writer._retire(self):
                    return
        finally:
            connection.close()  # this thread's own; Django closes only the request's


COLUMNS = ("release", "seq", "step", "host", "stream", "text", "at")
# a line as it is stored (COPY writes it as a tuple), which `line_dict` reads like a LogLine
StoredLine = namedtuple("StoredLine", COLUMNS)


def _allocate(release_id: int, count: int) -> int:
    """The first of `count` new sequence numbers for the release's lines.

    They are handed out under the release row's lock (held to the end of the
    transaction), so two writers (a step and a rollback, say) never share a
    number; on PostgreSQL in one round trip.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f'UPDATE {Release._meta.db_table} SET log_seq = log_seq + %s WHERE id = %s RETURNING log_seq',
                           [count, release_id])
            return cursor.fetchone()[0] - count + 1
    Release.objects.filter(pk=release_id).update(log_seq=F("log_seq") + count)
    return Release.objects.values_list("log_seq", flat=True).get(pk=release_id) - count + 1


def _insert(rows: list[StoredLine]) -> None:
    """Store the rows: PostgreSQL's COPY, which costs a fraction of an INSERT
    of model instances per line."""
    if connection.vendor != "postgresql":
        LogLine.objects.bulk_create(LogLine(**{("release_id" if c == "release" else c): v for c, v in zip(COLUMNS, row)})
                                    for row in rows)
        return
    columns = ", ".join(LogLine._meta.get_field(name).column for name in COLUMNS)
    with connection.cursor() as cursor, cursor.cursor.copy(f"COPY {LogLine._meta.db_table} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def line_dict(line: LogLine | StoredLine) -> dict:
    """A line as the API, the websocket and the page's script read it."""
    return {"seq": line.seq, "step": line.step, "host": line.host, "stream": line.stream, "text": line.text, "at": line.at.isoformat()}
