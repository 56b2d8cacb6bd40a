"""The release page's log viewer in the browser: a time on each line, long lines that expand in
place, and a view that can be shared: the filters in the query string, the line in #L<seq>."""

from datetime import datetime, timedelta
from datetime import timezone as tz
from urllib.parse import parse_qs, urlsplit

import pytest

from releases.models import LogLine, Release, Step
from tests.release_helpers import offline_environment, person
from tests.test_browser import wait_in, watched

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]

LINES = 5000
START = datetime(2026, 3, 1, 12, 0, 0, tzinfo=tz.utc)
LONG = 4350  # a stderr line of app-2 in deploy, far too wide for the view


def text(n: int) -> str:
    return f"long {'x' * 600} END" if n == LONG else f"line {n}"


@pytest.fixture
def release():
    """A finished release (no worker touches it) with a known log: provision then deploy, two hosts
    taking turns, every tenth line on stderr, line n written START + n seconds."""
    environment = offline_environment("logview")
    release = Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan={"environment": {"four_eyes": True}},
                                     requested_by=person("vic", "viewer"), status="cancelled", log_seq=LINES)
    for position, key in enumerate(("provision", "deploy")):
        Step.objects.create(release=release, position=position, key=key, kind="action", status="succeeded", attempts=1)
    LogLine.objects.bulk_create(
        (LogLine(release=release, seq=n, step="provision" if n <= 1000 else "deploy", host="app-1" if n % 2 else "app-2",
                 stream="stderr" if n % 10 == 0 else "stdout", text=text(n), at=START + timedelta(seconds=n))
         for n in range(1, LINES + 1)),
        batch_size=5000,
    )
    return release


@pytest.fixture
def page(web_server, browser):
    # a zone half an hour off UTC's, and a locale with a 24-hour clock: the times shown are known
    context = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Asia/Kolkata", locale="en-GB")
    page = watched(context.new_page(), web_server)
    page.goto(f"{web_server}/accounts/login/")
    page.fill("#id_username", "vic")
    page.fill("#id_password", "a-long-passphrase")
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{web_server}/")
    yield page
    context.close()


def rendered(page) -> list[int]:
    return [int(s) for s in page.eval_on_selector_all(".log-line", "rows => rows.map(r => r.dataset.seq)")]


def inside(page, row: str) -> bool:
    """The row is within the log view's visible part."""
    box, view = page.locator(row).bounding_box(), page.locator("#log").bounding_box()
    return box is not None and view["y"] <= box["y"] and box["y"] + 18 <= view["y"] + view["height"]


def query(page) -> dict:
    return parse_qs(urlsplit(page.url).query)


def test_a_shared_link_opens_with_its_filters_and_its_line_in_view(release, web_server, page):
    page.goto(f"{web_server}/releases/{release.pk}/?step=deploy&host=app-2&stream=stderr#L4340")
    wait_in(page, "greenlightLog.lastSeq === 5000", 60)
    page.wait_for_selector(".log-line.target[data-seq='4340']", timeout=30_000)

    # the filters are the link's: deploy's stderr lines of app-2 only (every tenth line from 1010)
    assert [page.input_value(f"#log-{name}") for name in ("step", "host", "stream")] == ["deploy", "app-2", "stderr"]
    assert page.evaluate("greenlightLog.filtered.length") == 400
    seqs = rendered(page)
    assert seqs and all(s % 10 == 0 and s > 1000 for s in seqs)
    assert len(seqs) < 200  # still a window of the rows, not all of them
    # the line is highlighted, alone, and in view; following is off, so it stays there
    assert page.locator(".log-line.target").count() == 1
    assert inside(page, ".log-line[data-seq='4340']")
    assert not page.is_checked("#log-follow")

    # its time: to the second in the viewer's zone (UTC+5:30), UTC on hover
    at = page.locator(".log-line[data-seq='4340'] .at")
    assert at.inner_text() == "18:42:20"  # 12:00:00 + 4340 s = 13:12:20 UTC
    assert at.get_attribute("title") == "2026-03-01 13:12:20 UTC"
    assert page.csp_violations == []


def test_changing_a_filter_or_clicking_a_line_number_rewrites_the_url_without_history(release, web_server, page):
    page.goto(f"{web_server}/releases/{release.pk}/?stream=stderr")
    wait_in(page, "greenlightLog.lastSeq === 5000", 60)
    assert page.input_value("#log-stream") == "stderr"
    page.wait_for_selector(".log-line[data-seq='5000']")  # following: the end is in view
    assert all(s % 10 == 0 for s in rendered(page))
    history = page.evaluate("history.length")

    page.select_option("#log-step", "provision")
    wait_in(page, "location.search.indexOf('step=provision') !== -1", 10)
    page.select_option("#log-host", "app-2")
    page.fill("#log-filter", "line 99")
    wait_in(page, "location.search.indexOf('q=') !== -1", 10)
    assert query(page) == {"stream": ["stderr"], "step": ["provision"], "host": ["app-2"], "q": ["line 99"]}
    page.wait_for_selector(".log-line[data-seq='990']")
    assert rendered(page) == [990]

    page.select_option("#log-stream", "")  # back to all: its parameter goes
    page.fill("#log-filter", "")
    wait_in(page, "location.search.indexOf('stream=') === -1 && location.search.indexOf('q=') === -1", 10)
    assert query(page) == {"step": ["provision"], "host": ["app-2"]}

    # a line number is the line's link
    page.click(".log-line[data-seq='1000'] .seq")
    wait_in(page, "location.hash === '#L1000'", 10)
    page.wait_for_selector(".log-line.target[data-seq='1000']")
    page.click(".log-line[data-seq='998'] .seq")
    wait_in(page, "location.hash === '#L998'", 10)
    assert page.locator(".log-line.target").count() == 1
    assert query(page) == {"step": ["provision"], "host": ["app-2"]}
    assert page.evaluate("history.length") == history  # replaced, never pushed

    # the URL opened afresh (not a same-document jump to the hash) shows the same view
    shared = page.url
    page.goto("about:blank")
    page.goto(shared)
    page.wait_for_selector(".log-line.target[data-seq='998']", timeout=30_000)
    assert page.input_value("#log-step") == "provision" and page.input_value("#log-host") == "app-2"
    assert inside(page, ".log-line[data-seq='998']")

    # a linked line the filters hide is not forced in: the bar says so, and a filter that shows it goes there
    page.goto(page.url.replace("#L998", "#L999"))  # app-1's
    wait_in(page, "document.getElementById('log-note').textContent === 'line 999 is hidden by the filters'", 30)
    assert page.locator(".log-line[data-seq='999']").count() == 0
    page.select_option("#log-host", "")
    page.wait_for_selector(".log-line.target[data-seq='999']")
    assert inside(page, ".log-line[data-seq='999']")
    assert page.text_content("#log-note") == ""
    assert page.csp_violations == []


def test_a_long_line_is_cut_and_expands_on_click_or_enter(release, web_server, page):
    page.goto(f"{web_server}/releases/{release.pk}/?stream=stderr&host=app-2#L{LONG}")
    page.wait_for_selector(f".log-line.target[data-seq='{LONG}']", timeout=30_000)
    row, text = page.locator(f".log-line[data-seq='{LONG}']"), page.locator(f".log-line[data-seq='{LONG}'] .text")
    following = page.locator(f".log-line[data-seq='{LONG + 10}']")
    # cut by the view's edge, and says it can open; short lines do not
    assert "long" in row.get_attribute("class")
    assert text.get_attribute("aria-expanded") == "false"
    assert page.locator(".log-line[data-seq='4340'] .text").get_attribute("role") is None
    assert row.bounding_box()["height"] == 18

    text.click()
    page.wait_for_selector(f".log-line.expanded[data-seq='{LONG}']")
    assert text.get_attribute("aria-expanded") == "true"
    # the whole line shows, over several rows, and the next line moves down below it (no overlap)
    tall = row.bounding_box()
    assert tall["height"] >= 3 * 18
    wait_in(page, f"(function () {{ var a = document.querySelector(\".log-line[data-seq='{LONG}']\").getBoundingClientRect();"
                  f" var b = document.querySelector(\".log-line[data-seq='{LONG + 10}']\").getBoundingClientRect();"
                  " return b.top >= a.bottom - 1; })()", 10)
    assert following.bounding_box()["y"] >= tall["y"] + tall["height"] - 1

    # the keyboard: focus stays on the line through the re-render, Enter closes it again, and opens it
    text.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector(f".log-line[data-seq='{LONG}']:not(.expanded)")
    assert page.evaluate("document.activeElement.closest('.log-line').dataset.seq") == str(LONG)
    assert row.bounding_box()["height"] == 18
    page.keyboard.press("Enter")
    page.wait_for_selector(f".log-line.expanded[data-seq='{LONG}']")
    assert page.csp_violations == []
