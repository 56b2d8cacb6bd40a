"""Release logs: redact, number, store in batches, then broadcast.

Lines are stored first (numbered per release, so a browser that missed a
broadcast asks for `after=<seq>` and gets exactly what it lacks) and sent to
the release's group second, in batches, because one channel-layer message
per line tops out near a thousand lines a second.
"""

from __future__ import annotations

import re
import threading
import time

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from . import broadcast
from .models import LogLine, Release

BATCH_LINES = 500
BATCH_SECONDS = 0.25
REDACTED = "[redacted]"

_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*).+")  # the whole value: "Token abc", "Basic ..."
_BEARER = re.compile(r"(?i)\b(token|bearer)(\s+)[A-Za-z0-9._~+/-]{16,}=*")
_PAIR = re.compile(r"(?i)\b(aws_secret_access_key|secret[_-]?key|password|passwd|pwd|token|api[_-]?key)(\s*[:=]\s*)(\S+)")
# the shape of an AWS secret key; both cases required so a git sha (hex) survives
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END [A-Z ]*PRIVATE KEY-----")


class Redactor:
    """Removes secrets from lines; remembers when it is inside a private key."""

    def __init__(self, secrets: list[str] = ()):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        self.in_key: dict[tuple, bool] = {}

    def __call__(self, text: str, source: tuple = ()) -> str:
        if self.in_key.get(source):
            if _KEY_END.search(text):
                self.in_key[source] = False
            return REDACTED
        if _KEY_BEGIN.search(text):
            self.in_key[source] = not _KEY_END.search(text)
            return REDACTED
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        text = _AWS_KEY_ID.sub(REDACTED, text)
        text = _HEADER.sub(lambda m: m.group(1) + REDACTED, text)
        text = _BEARER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        text = _PAIR.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        return _AWS_SECRET.sub(REDACTED, text)


class LogWriter:
    """Collects a release's lines from any thread; flush() stores and sends them."""

    def __init__(self, release_id: int, *, secrets: list[str] = ()):
        self.release_id = release_id
        self.redact = Redactor(secrets)
        self.pending: list[tuple] = []
        self.lock = threading.Lock()
        self.last_flush = time.monotonic()

    def write(self, step: str, text: str, *, host: str = "", stream: str = "info") -> None:
        with self.lock:
            self.pending.append((step, host, stream, self.redact(text, (step, host, stream)), timezone.now()))
            due = len(self.pending) >= BATCH_LINES or time.monotonic() - self.last_flush > BATCH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
            self.last_flush = time.monotonic()
        if not batch:
            return
        with transaction.atomic():
            # numbers are handed out under the release row's lock, so two
            # writers (a step and a rollback, say) never share a number
            Release.objects.filter(pk=self.release_id).update(log_seq=F("log_seq") + len(batch))
            last = Release.objects.values_list("log_seq", flat=True).get(pk=self.release_id)
            first = last - len(batch) + 1
            rows = [
                LogLine(release_id=self.release_id, seq=first + i, step=step, host=host, stream=stream, text=text, at=at)
                for i, (step, host, stream, text, at) in enumerate(batch)
            ]
            LogLine.objects.bulk_create(rows)
        broadcast.log_lines(self.release_id, [line_dict(row) for row in rows])


def line_dict(line: LogLine) -> dict:
    return {"seq": line.seq, "step": line.step, "host": line.host, "stream": line.stream, "text": line.text, "at": line.at.isoformat()}
