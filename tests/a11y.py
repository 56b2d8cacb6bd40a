"""Accessibility checks for the browser tests: axe-core (bundled by the pinned
PyPI package axe-playwright-python) run on a page as it is now, and how wide
a page is at a phone's width."""

from __future__ import annotations

from axe_playwright_python.sync_playwright import Axe

BLOCKING = ("serious", "critical")
_axe = Axe()


def violations(page) -> list[dict]:
    """axe's serious and critical violations on `page` as it is now. Its script
    goes in through page.evaluate, which the Content-Security-Policy does not govern."""
    results = _axe.run(page, options={"resultTypes": ["violations"]})
    return [v for v in results.response["violations"] if v.get("impact") in BLOCKING]


def readable(found: list[dict], where: str) -> str:
    """One violation a paragraph: the rule, what axe says about it, and each element with its fix."""
    lines = [f"{len(found)} serious or critical accessibility violation(s) on {where}:"]
    for violation in found:
        lines.append(f"- {violation['id']} ({violation['impact']}): {violation['help']} [{violation.get('helpUrl', '')}]")
        for node in violation["nodes"][:10]:
            target = " ".join(str(t) for t in node.get("target", []))
            summary = (node.get("failureSummary") or "").replace("\n", " ")
            lines.append(f"    {target}: {node.get('html', '')[:160]}")
            if summary:
                lines.append(f"      {summary[:300]}")
        if len(violation["nodes"]) > 10:
            lines.append(f"    … and {len(violation['nodes']) - 10} more")
    return "\n".join(lines)


def assert_accessible(page, where: str = "") -> None:
    """No serious or critical axe violation on the page as it is now."""
    found = violations(page)
    assert not found, readable(found, where or page.url)


def overflow(page) -> int:
    """How many CSS pixels the page is wider than its viewport (0: none)."""
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def wider_than(page, width: int) -> str | None:
    """None when the page fits `width` px; otherwise its width and the widest elements that stick out."""
    scroll = page.evaluate("document.documentElement.scrollWidth")
    if scroll <= width:
        return None
    culprits = page.evaluate("""(width) => Array.from(document.querySelectorAll('body *'))
        .filter(el => el.getBoundingClientRect().right > width + 0.5 && !el.closest('.table-scroll, .log-view, .sr-only'))
        .slice(0, 8).map(el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                 (el.className && typeof el.className === 'string' ? '.' + el.className.trim().split(/\\s+/).join('.') : '') +
                 ' right=' + Math.round(el.getBoundingClientRect().right))""", width)
    return f"{page.url} is {scroll}px wide at {width}px: {'; '.join(culprits)}"
