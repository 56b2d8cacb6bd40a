"""Reading what a request sends: whole numbers, times and text, each refused
with a 400 that names the parameter (BadInput's `field`) rather than reaching
the database as something it cannot hold."""

from __future__ import annotations

import re
from datetime import datetime
from datetime import timezone as dt_timezone

from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .services import BadInput

# The largest whole number a JSON client reads exactly (2^53 - 1); ids,
# offsets and sequence numbers stay far below it, and PostgreSQL's bigint
# holds it, so no query fails on "out of range".
MAX_WHOLE = 2**53 - 1
_DIGITS = re.compile(r"[0-9]{1,16}")  # ASCII digits only: int() also takes "+1", " 1", "1_0" and other scripts' digits


def whole_number(value, name: str, *, default: int | None = None, minimum: int = 0, maximum: int = MAX_WHOLE) -> int | None:
    """A whole number from a query string (digits) or a JSON value (an int,
    never a bool: True is an int to Python, not to a person)."""
    if value is None or value == "":
        return default
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    if number is None or not minimum <= number <= maximum:
        raise BadInput(f"{name} is a whole number from {minimum} to {maximum}", field=name)
    return number


def storable(value: str) -> bool:
    """Text the database can keep: no NUL (PostgreSQL refuses it) and no lone
    surrogate (a JSON body may carry "\\ud800", which is no character in UTF-8)."""
    return "\x00" not in value and not any("\ud800" <= c <= "\udfff" for c in value)


def printable_name(name: str) -> str:
    """A name that came in a request, safe to put in an answer (a lone surrogate would fail its encoding)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def text(value, name: str, *, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str) or not storable(value):
        raise BadInput(f"{name} must be text (no NUL or lone surrogate characters)", field=name)
    return value


def moment(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 time; one without a zone is in the server's TIME_ZONE."""
    if not value:
        return None
    try:
        parsed = parse_datetime(value)
    except ValueError:  # well-formed but impossible: month 13, day 45
        parsed = None
    try:
        if parsed is not None:
            # in UTC: PostgreSQL refuses a zone offset beyond 15:59, which ISO 8601 allows
            return (timezone.make_aware(parsed) if timezone.is_naive(parsed) else parsed).astimezone(dt_timezone.utc)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first time there is
        pass
    raise BadInput(f"{name} is an ISO 8601 time, like 2026-11-29T10:00:00Z", field=name)
