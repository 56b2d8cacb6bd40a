from datetime import timezone as dt_timezone

from django import template
from django.utils.html import format_html

from releases import selectors

register = template.Library()

# a symbol and a word for every status: colour is never the only signal
STATUS = {
    "queued": ("◷", "queued"),
    "pending": ("○", "pending"),
    "running": ("▶", "running"),
    "awaiting_approval": ("‖", "waiting for approval"),
    "succeeded": ("✔", "succeeded"),
    "failed": ("✖", "failed"),
    "skipped": ("↷", "skipped"),
    "rejected": ("✖", "rejected"),  # a gate someone rejected (its step is failed)
    "cancelled": ("⊘", "cancelled"),
    "rolling_back": ("↺", "rolling back"),
    "rolled_back": ("↩", "rolled back"),
}


@register.simple_tag
def status(value: str):
    symbol, word = STATUS.get(value, ("?", value))
    return format_html('<span class="status status-{}"><span aria-hidden="true">{}</span> {}</span>', value, symbol, word)


@register.filter
def duration(start, end=None):
    """'1:02', '3h 04m': how long from start to end (or to now)."""
    return selectors.elapsed(start, end) if start else ""


@register.simple_tag
def when(value):
    """A time to the second, in UTC and saying so; the browser shows it in its own
    zone and keeps the UTC one for hovering (static/js/greenlight.js)."""
    if not value:
        return ""
    utc = value.astimezone(dt_timezone.utc)
    text = utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    return format_html('<time datetime="{}" data-local title="{}">{}</time>', utc.isoformat(), text, text)


@register.filter
def waiting_for(step) -> str:
    """What the step waits for, as the API says it (selectors.waiting_for)."""
    return selectors.waiting_for(step)
