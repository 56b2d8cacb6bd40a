"""Redaction: what a release's log, a stored error or a worker's log line must never show.

Three kinds of secret are removed:
- shapes: AWS access key ids and secret keys, `password=...` and the like,
  `Authorization:` headers, bearer tokens, the password of a URL's userinfo
  (`postgres://user:pw@host`) and an http(s) URL's lone userinfo (a token:
  `https://TOKEN@host`), and whole private keys (BEGIN ... END);
- known values: the ones a caller passes (an environment's own credentials,
  its SSH private key file's content) and the worker's own (`worker_secrets`:
  the Django secret key, the audit key, database and mail passwords, and every
  environment variable whose name says it holds a secret);
- encodings of the known values: their base64 (standard and URL-safe, at any
  byte offset, wrapped or not) and hex (either case). Output is cut into
  lines anywhere, so a run of base64/hex characters is redacted whole when
  any ENCODED_WINDOW characters of it come from a secret's encoding.

Pure Python on purpose: the release log (releases/logs.py), the web side's
error messages and the logging configuration all use it.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
from bisect import bisect_left
from itertools import accumulate
from urllib.parse import urlsplit

REDACTED = "[redacted]"
MIN_SECRET = 6  # shorter known values would redact ordinary words
MIN_WORKER_SECRET = 8
ENCODED_WINDOW = 20  # chars of a secret's encoding that count as the secret: 120 bits of base64, 80 of hex
PROBE = ENCODED_WINDOW // 2

_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*).+")  # the whole value: "Token abc", "Basic ..."
_BEARER = re.compile(r"(?i)\b(token|bearer)(\s+)[A-Za-z0-9._~+/-]{16,}=*")
# the password of a URL's userinfo: postgres://user:pw@host, redis://:pw@host
# (one masked already, as deployer.git.shown() writes it, stays: ***)
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)(?!\*\*\*@)([^/\s@]+)(@)")
# over http(s), a userinfo with no password is a token: https://TOKEN@host (ssh's lone user is a name: ssh://git@host)
_URL_TOKEN = re.compile(r"(?i)\b(https?://)(?!\*\*\*@)([^/\s:@]+)(@)")
_PAIR = re.compile(r"(?i)\b(aws_secret_access_key|secret[_-]?key|password|passwd|pwd|token|api[_-]?key)(\s*[:=]\s*)(\S+)")
# the shape of an AWS secret key; both cases required so a git sha (hex) survives
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END [A-Z ]*PRIVATE KEY-----")
# a run that may be (part of) an encoding: the base64 alphabets, hex included
_ENCODED_RUN = re.compile(r"[A-Za-z0-9+/_-]{%d,}={0,2}" % ENCODED_WINDOW)
# What a line must hold for a shape above to match it (a superset): a keyword
# of _HEADER, _BEARER or _PAIR in any case, a URL's "://", a private key's
# first line. The shapes made of encoding characters alone (_AWS_KEY_ID,
# _AWS_SECRET) lie inside an _ENCODED_RUN match, looked at by themselves.
_WORDS = ("authorization", "token", "bearer", "password", "passwd", "pwd", "secret", "apikey", "api_key", "api-key")
_MARKS = ("://", "PRIVATE KEY-----")
_TRIGGER = re.compile("(?i:%s)|%s" % ("|".join(_WORDS), "|".join(map(re.escape, _MARKS))))
# The characters besides ASCII's own letters that a case-insensitive pattern
# matches to an ASCII letter (i, k, s); where none is, the words are found in
# str.lower()'s copy by plain search (which keeps every offset: only U+0130
# lowers to two characters), many times faster than _TRIGGER.
_FOLDS_TO_ASCII = re.compile("[\u0130\u0131\u017f\u212a]")
# environment variables whose values are secrets (Django's list for its error pages, and a few more)
SENSITIVE_NAME = re.compile(r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE|CREDENTIAL|PRIVATE", re.I)


def encodings(secret: str) -> list[str]:
    """The parts of `secret`'s base64 and hex encodings that do not depend on
    what surrounds it: base64 at each of the three byte offsets (the
    characters that mix in neighbouring bytes dropped), URL-safe too, and hex
    in both cases."""
    data = secret.encode()
    forms = {data.hex(), data.hex().upper()}
    for offset in range(3):
        text = base64.b64encode(b"\0" * offset + data).decode()
        core = text[-(-8 * offset // 6):(8 * (offset + len(data))) // 6]  # ceil(8o/6) : floor(8(o+n)/6)
        forms |= {core, core.replace("+", "-").replace("/", "_")}
    return [f for f in forms if len(f) >= MIN_SECRET]


class Redactor:
    """Removes secrets from lines; remembers, per source, when it is inside a private key."""

    def __init__(self, secrets: list[str] = (), *, worker: bool = True):
        known = {s for s in secrets if s and len(s) >= MIN_SECRET}
        if worker:
            known |= set(worker_secrets())
        self.secrets, self.windows, self.probes = _known(frozenset(known))
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
            if secret in text:
                text = text.replace(secret, REDACTED)
        if self.windows:
            text = _ENCODED_RUN.sub(self._encoded, text)
        text = _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + m.group(3), text)
        text = _URL_TOKEN.sub(lambda m: m.group(1) + REDACTED + m.group(3), text)
        text = _AWS_KEY_ID.sub(REDACTED, text)
        text = _HEADER.sub(lambda m: m.group(1) + REDACTED, text)
        text = _BEARER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        text = _PAIR.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        return _AWS_SECRET.sub(REDACTED, text)

    def text(self, text: str) -> str:
        """Several lines at once (a traceback, an error message), each on its own."""
        lines = text.split("\n")
        return "\n".join(self.lines(lines, [("text",)] * len(lines)))

    def lines(self, texts: list[str], sources: list[tuple]) -> list[str]:
        """`[self(text, source) for ...]`, in order, at a fraction of the cost
        when few lines hold anything to redact (a release log's case).

        The lines are joined into one block and searched once each for the
        known values, for the keywords and markers of the shapes (_TRIGGER),
        and for runs of encoding characters; only a line one of them found,
        or a line of a source inside a private key, goes through __call__.
        Every other line is one that __call__ would return unchanged (no rule
        can match it), so the result is the same, line for line.
        """
        if not texts:
            return []
        block = "\n".join(texts)  # a match across the "\n" marks both lines: more work, never less
        ends = list(accumulate(map(len, texts)))  # line n is block[ends[n] + n - len(texts[n]):ends[n] + n]
        found: set[int] = set()

        def mark(begin: int, end: int) -> None:  # the lines block[begin:end] touches
            first = bisect_left(range(len(texts)), begin, key=lambda n: ends[n] + n)
            found.update(range(first, bisect_left(range(len(texts)), max(begin, end - 1), key=lambda n: ends[n] + n) + 1))

        for secret in self.secrets:
            at = block.find(secret)
            while at >= 0:
                mark(at, at + len(secret))
                at = block.find(secret, at + 1)
        if not block.isascii() and _FOLDS_TO_ASCII.search(block):
            for match in _TRIGGER.finditer(block):
                mark(match.start(), match.end())
        else:
            low = block.lower()
            for word, where in [*((w, low) for w in _WORDS), *((m, block) for m in _MARKS)]:
                at = where.find(word)
                while at >= 0:
                    mark(at, at + len(word))
                    at = where.find(word, at + 1)
        for match in _ENCODED_RUN.finditer(block):  # no run holds a "\n": each is inside one line
            run = match.group(0)
            if ((len(run) >= 40 and not run.islower() and not run.isupper())  # room for _AWS_SECRET: both cases
                    or "AKIA" in run or "ASIA" in run  # _AWS_KEY_ID
                    or (self.windows and self._encoded(match) == REDACTED)):
                mark(match.start(), match.end())
        if not found and not any(self.in_key.values()):
            return list(texts)
        return [self(text, source) if n in found or self.in_key.get(source) else text
                for n, (text, source) in enumerate(zip(texts, sources))]

    def _encoded(self, match: re.Match) -> str:
        # Any ENCODED_WINDOW characters of an encoding hold a PROBE-long piece
        # that starts at a multiple of PROBE: look there first, then around a hit.
        run, n = match.group(0), ENCODED_WINDOW
        for i in range(0, len(run) - PROBE + 1, PROBE):
            if run[i:i + PROBE] in self.probes and any(
                    run[j:j + n] in self.windows for j in range(max(0, i - n + PROBE), min(i, len(run) - n) + 1)):
                return REDACTED
        return run


@functools.lru_cache(maxsize=32)
def _known(secrets: frozenset[str]) -> tuple[list[str], frozenset[str], frozenset[str]]:
    """Exact strings to replace (longest first), the windows of the long
    encodings, and their PROBE-long pieces."""
    exact, windows = set(secrets), set()
    for secret in secrets:
        # a key file's lines are base64 already: any long enough piece of them counts
        for run in _ENCODED_RUN.findall(secret):
            windows.update(run[i:i + ENCODED_WINDOW] for i in range(len(run) - ENCODED_WINDOW + 1))
        for form in encodings(secret):
            if len(form) < ENCODED_WINDOW:
                exact.add(form)
            else:
                windows.update(form[i:i + ENCODED_WINDOW] for i in range(len(form) - ENCODED_WINDOW + 1))
    probes = frozenset(w[i:i + PROBE] for w in windows for i in range(ENCODED_WINDOW - PROBE + 1))
    return sorted(exact, key=len, reverse=True), frozenset(windows), probes


@functools.lru_cache(maxsize=1)
def worker_secrets() -> tuple[str, ...]:
    """The values of this process's own sensitive settings.

    Read once per process: settings and the environment do not change while it runs.
    """
    from django.conf import settings

    if not settings.configured:
        return ()
    values: list[str] = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ()),
                         getattr(settings, "AUDIT_KEY", ""), getattr(settings, "EMAIL_HOST_PASSWORD", "")]
    values += [db.get("PASSWORD", "") for db in settings.DATABASES.values()]
    for name, value in os.environ.items():
        if SENSITIVE_NAME.search(name):
            values.append(value)
        if "://" in value and "@" in value:
            values.append(_url_password(value))
    return tuple(sorted({v for v in values if isinstance(v, str) and len(v) >= MIN_WORKER_SECRET}))


def _url_password(value: str) -> str:
    try:
        return urlsplit(value).password or ""
    except ValueError:
        return ""


class LogFilter(logging.Filter):
    """Redacts a record's message and traceback before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            redact = Redactor()
            record.msg, record.args = redact.text(record.getMessage()), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact.text(record.exc_text)
        except Exception:  # a log line is never lost to its redaction
            pass
        return True
