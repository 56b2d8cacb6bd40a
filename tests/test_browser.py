"""A whole release from the browser: two people, two gates, live updates.

Real everything: the sandbox, a Celery worker, daphne, Debian's Chromium.
Screenshots of the main pages go to $SCREENSHOTS when it is set (`make
screenshots` points it at docs/screenshots/ for the README), else to a
temporary folder: a test run never changes tracked files.
"""

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import pytest

from releases import services
from releases.models import Release
from tests.helpers import wait_for
from tests.release_helpers import offline_environment, person, revisions_behind, sign_in_page, start, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]
SHOTS = Path(os.environ.get("SCREENSHOTS") or tempfile.mkdtemp(prefix="greenlight-screenshots-"))
LONG = 150_000  # ms: a whole bake on the sandbox takes under a minute


# Every system notification a page shows, in window.shownNotifications (the
# browser's own Notification does the rest: its permission, asking for it)
NOTIFICATION_SPY = """(() => {
  const Real = window.Notification, shown = [];
  window.shownNotifications = shown;
  if (!Real) return;
  window.Notification = class {
    constructor(title, options) { shown.push({title: title, body: (options || {}).body, tag: (options || {}).tag}); }
    close() {}
    static get permission() { return Real.permission; }
    static requestPermission(callback) { return Real.requestPermission(callback); }
  };
})();"""


def watched(page, base: str):
    """What the Content-Security-Policy refused (it must refuse nothing of ours), the websockets opened
    under it, what came over them, and every refresh of the dashboard's fragment."""
    page.csp_violations, page.websockets, page.ws_messages, page.dashboard_refreshes = [], [], [], []
    page.on("console", lambda message: "Content Security Policy" in message.text and page.csp_violations.append(
        f"{page.url}: {message.text} (at {message.location})"))
    page.on("websocket", lambda socket: (page.websockets.append(socket.url),
                                         socket.on("framereceived", lambda payload: page.ws_messages.append(json.loads(payload)))))
    page.on("request", lambda request: request.url == f"{base}/" and request.headers.get("hx-request") and page.dashboard_refreshes.append(request))
    return page


def sign_in(browser, base: str, username: str, *, notifications: bool = False):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    if notifications:
        context.grant_permissions(["notifications"], origin=base)
    context.add_init_script(NOTIFICATION_SPY)
    page = watched(context.new_page(), base)
    sign_in_page(page, base, username)
    return page


def wait_in(page, expression: str, timeout: float):
    # page.wait_for_function evaluates its string with eval() inside the page,
    # which the Content-Security-Policy refuses; page.evaluate is not subject to it
    return wait_for(lambda: page.evaluate(expression), timeout, 0.2, expression)


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    # caret="initial": Playwright's default hides the caret by setting a style on every input, which the
    # Content-Security-Policy reports now and then as an inline style (its sha256 is of "caret-color: transparent !important;")
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True, caret="initial")


def test_a_release_clicked_through_and_approved_in_the_browser(release_sandbox, web_server, browser):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    before = revisions_behind(environment.public_url).pop()
    target = "v2" if before == "v1" else "v1"
    person("dana", "deployer", "approver")
    person("ravi", "approver")
    dana = sign_in(browser, web_server, "dana")
    ravi = sign_in(browser, web_server, "ravi")

    # the wizard, with a step back that keeps what was typed
    dana.click("text=New release")
    dana.select_option("#id_environment", "prepan")
    dana.click("button:has-text('Next')")
    dana.fill("#id_revision", "no-such-branch")
    dana.click("button:has-text('Next')")
    assert "has no branch or tag" in dana.inner_text(".error")
    dana.fill("#id_revision", target)
    dana.click("button:has-text('Next')")
    dana.fill("#id_clone_count", "2")
    dana.click("button:has-text('Back')")
    assert dana.input_value("#id_revision") == target
    dana.click("button:has-text('Next')")
    dana.click("button:has-text('Next')")
    assert "swap_elb" in dana.inner_text(".plan")
    shoot(dana, "wizard-review")
    dana.click("button:has-text('Start release')")
    dana.wait_for_url("**/releases/*/")
    release_id = int(dana.url.rstrip("/").split("/")[-1])

    # ravi watches; the first gate appears without a reload
    ravi.goto(f"{web_server}/releases/{release_id}/")
    ravi.wait_for_selector(".gate-card[data-gate=verify_directly] button.approve", timeout=LONG)
    direct = ravi.get_attribute("a.direct-url", "href")
    canary = ravi.context.new_page()
    canary.goto(direct)
    assert f"revision {target}" in canary.inner_text("body")
    canary.close()
    wait_in(ravi, "document.title.startsWith('(waiting)')", 30)  # retitled once the swapped panel settles
    shoot(ravi, "release-verify-gate")

    # four eyes: the requester sees the card but cannot approve
    dana.wait_for_selector(".gate-card[data-gate=verify_directly]", timeout=LONG)
    assert dana.is_disabled(".gate-card button.approve")

    ravi.fill("#comment-verify_directly", "v2 looks right")
    ravi.click(".gate-card[data-gate=verify_directly] button.approve")
    ravi.wait_for_selector("text=Approved verify_directly.")

    # a dropped websocket comes back and the log has no gap
    ravi.evaluate("greenlightLog.socket.close()")
    ravi.wait_for_selector(".gate-card[data-gate=swap_elb] button.approve", timeout=LONG)
    assert "old" in ravi.inner_text(".gate-card[data-gate=swap_elb] table")
    shoot(ravi, "release-swap-gate")
    ravi.click(".gate-card[data-gate=swap_elb] button.approve")

    for page in (dana, ravi):
        page.wait_for_selector(".release-status .status-succeeded", timeout=LONG)
    release = Release.objects.get(pk=release_id)
    assert release.status == "succeeded"
    wait_in(ravi, f"greenlightLog.lastSeq >= {release.log_seq}", 30)
    seqs = ravi.evaluate("greenlightLog.lines.map(l => l.seq)")
    assert seqs == list(range(1, release.log_seq + 1))
    assert revisions_behind(environment.public_url) == {target}
    shoot(dana, "release-succeeded")

    # the audit trail, and its export
    ravi.goto(f"{web_server}/audit/?release={release_id}")
    assert ravi.locator("td:has-text('gate.approve')").count() == 2
    shoot(ravi, "audit")
    with ravi.expect_download() as download:
        ravi.click("text=Export CSV")
    rows = list(csv.DictReader(io.StringIO(open(download.value.path()).read())))
    assert [r["actor"] for r in rows if r["action"] == "gate.approve"] == ["ravi", "ravi"]

    dana.goto(f"{web_server}/")
    shoot(dana, "dashboard")
    dana.goto(f"{web_server}/environments/prepan/")
    dana.wait_for_selector("text=in service")
    shoot(dana, "environment")
    assert dana.csp_violations == ravi.csp_violations == []
    assert ravi.websockets and all(url.startswith(web_server.replace("http", "ws")) for url in ravi.websockets)


def test_a_log_of_100000_lines_loads_and_renders_only_a_window(release_sandbox, web_server, browser):
    from django.utils import timezone

    from releases.models import LogLine

    environment = services.environment_import_sandbox(info=release_sandbox.info)
    viewer = person("vic", "viewer")
    release = Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan={"environment": {"four_eyes": True}},
                                     requested_by=viewer, status="cancelled", log_seq=100_000)
    now = timezone.now()
    LogLine.objects.bulk_create(
        (LogLine(release=release, seq=n, step="deploy", host="app-3", stream="stdout", text=f"line {n}", at=now) for n in range(1, 100_001)),
        batch_size=5000,
    )
    page = sign_in(browser, web_server, "vic")

    page.goto(f"{web_server}/releases/{release.pk}/")
    wait_in(page, "greenlightLog.lastSeq === 100000", 60)

    assert page.locator(".log-line").count() < 200
    page.wait_for_selector(".log-line[data-seq='100000']")  # following: the end is in view
    page.fill("#log-filter", "line 4242")  # and 42420..42429
    page.wait_for_selector(".log-line[data-seq='4242']")
    assert page.locator(".log-line").count() == 11


def test_rejecting_asks_first_and_then_rolls_back(release_sandbox, web_server, browser):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    before = revisions_behind(environment.public_url).pop()
    dana = person("dana", "deployer")
    person("ravi", "approver")
    release = services.release_create(environment=environment, revision="v2" if before == "v1" else "v1", actor=dana)
    ravi = sign_in(browser, web_server, "ravi")
    ravi.goto(f"{web_server}/releases/{release.pk}/")
    ravi.wait_for_selector(".gate-card[data-gate=verify_directly] button.reject", timeout=LONG)

    # the page's own dialog (never the browser's confirm), saying what happens to which instances
    ravi.on("dialog", lambda dialog: pytest.fail(f"a browser dialog: {dialog.message}"))
    ravi.click("button.reject")
    ravi.locator("#confirm-dialog").wait_for(state="visible")
    assert "The release rolls back" in ravi.inner_text("#confirm-dialog") and "stop" in ravi.inner_text("#confirm-dialog")
    ravi.click("#confirm-dialog button:has-text('Go back')")
    ravi.locator("#confirm-dialog").wait_for(state="hidden")
    assert Release.objects.get(pk=release.pk).status == "awaiting_approval"

    ravi.click("button.reject")
    ravi.click("#confirm-ok")
    ravi.wait_for_selector(".release-status .status-rolled_back", timeout=LONG)
    assert revisions_behind(environment.public_url) == {before}


def test_a_change_that_comes_while_the_panel_reloads_still_shows(web_server, browser):
    """Two messages close together: the second one's refresh waits for the
    first's, and must land in the page (htmx queued it with the panel it was
    given then, which the first refresh's swap took out of the page)."""
    from releases import broadcast

    environment = offline_environment("prepan")
    viewer = person("vic", "viewer")
    # finished, so no worker picks it up: only the test changes it
    release = Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan={"environment": {"four_eyes": True}},
                                     requested_by=viewer, status="failed")
    page = sign_in(browser, web_server, "vic")
    held = []
    hold = {"on": False}
    page.route(f"**/releases/{release.pk}/panel/", lambda route: held.append(route) if hold["on"] and not held else route.continue_())
    page.goto(f"{web_server}/releases/{release.pk}/")
    wait_in(page, "document.getElementById('log-state').textContent === 'live'", 30)
    page.wait_for_load_state("networkidle")  # the refresh the socket's opening asked for is in
    page.evaluate("window.seen = []; greenlightLog.socket.addEventListener('message', function (e) { seen.push(JSON.parse(e.data)); })")

    # the first refresh is held at the server's answer of the moment ("failed")
    hold["on"] = True
    broadcast.release_changed(release.pk)
    wait_for(lambda: page.evaluate("1") and held, 30, 0.2, "the first refresh")
    answer = held[0].fetch()
    # meanwhile the release changes, and the page hears of it (its handler ran: the listener above comes after it)
    Release.objects.filter(pk=release.pk).update(status="rolled_back")
    broadcast.release_changed(release.pk)
    wait_in(page, "seen.some(function (m) { return m.status === 'rolled_back'; })", 30)

    held[0].fulfill(response=answer)
    page.wait_for_selector(".release-status .status-rolled_back", timeout=30_000)
    assert page.get_attribute("#panel", "data-status") == "rolled_back"
    assert page.locator("#panel").count() == 1


def live(page) -> None:
    """The dashboard is connected, and its first refresh (on connecting) is in."""
    wait_in(page, "greenlightDashboard.socket.readyState === WebSocket.OPEN && greenlightDashboard.refresh.idle()"
                  " && greenlightDashboard.refresh.counter.requests >= 1", 30)


def test_a_gate_that_opens_is_announced_to_who_may_decide_it_on_a_live_dashboard(release_sandbox, web_server, browser):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    before = revisions_behind(environment.public_url).pop()
    dana = person("dana", "deployer", "approver")
    person("ravi", "approver")
    person("vic", "viewer")
    # all three allowed notifications: only ravi may decide dana's gates (four eyes), vic only views
    pages = {who: sign_in(browser, web_server, who, notifications=True) for who in ("ravi", "dana", "vic")}
    for page in pages.values():
        live(page)
        page.evaluate("window.sameDocument = true")  # gone if the page reloads
    assert pages["ravi"].evaluate("Notification.permission") == "granted"
    assert pages["ravi"].is_hidden("#notify-offer")  # granted already: nothing to offer

    # idle, nothing polls (it used to ask every 5 s)
    refreshes = {who: len(page.dashboard_refreshes) for who, page in pages.items()}
    pages["vic"].wait_for_timeout(6000)
    assert {who: len(page.dashboard_refreshes) for who, page in pages.items()} == refreshes

    release_id = start(dana, "v2" if before == "v1" else "v1")
    ravi = pages["ravi"]
    ravi_release = watched(ravi.context.new_page(), web_server)  # ravi has the release page open too
    ravi_release.goto(f"{web_server}/releases/{release_id}/")

    title = f"Release #{release_id} waits for you: verify_directly"
    for page in (ravi, ravi_release):
        page.wait_for_selector(f"#notices .notice:has-text('{title}')", timeout=LONG)
    assert ravi.get_attribute("#notices .notice a", "href") == f"/releases/{release_id}/"
    assert "started by dana" in ravi.inner_text("#notices .notice")
    tag = f"gate-{release_id}-verify_directly-0"  # one tag: the system shows one, however many pages are open
    body = f"prepan {Release.objects.get(pk=release_id).revision}, started by dana"
    for page in (ravi, ravi_release):
        assert page.evaluate("window.shownNotifications") == [{"title": title, "body": body, "tag": tag}]

    # every dashboard shows the gate without a reload; dana's and vic's heard of it and were told nothing
    row = f"#dashboard tr:has(a[href='/releases/{release_id}/'])"
    for who, page in pages.items():
        page.wait_for_selector(f"{row} .status-awaiting_approval", timeout=30_000)
        assert page.evaluate("window.sameDocument") is True, who
        assert {"type": "gate", "release": release_id, "key": "verify_directly", "status": "awaiting_approval"} in page.ws_messages, who
    opened = {"type": "release", "id": release_id, "status": "awaiting_approval"}
    # (a call into the browser lets Playwright deliver the events it has received)
    wait_for(lambda: pages["vic"].evaluate("1") and opened in pages["dana"].ws_messages and opened in pages["vic"].ws_messages,
             30, 0.2, "the release's event")
    for who in ("dana", "vic"):  # a feed sends its notice right after the gate's event, before the release's
        assert [m for m in pages[who].ws_messages if m["type"] == "notify"] == [], who
        assert pages[who].evaluate("window.shownNotifications") == [], who
        assert pages[who].locator("#notices .notice").count() == 0, who
    wait_in(ravi, "document.title.startsWith('(1) Dashboard')", 10)  # the refreshed fragment retitles the tab
    assert f"Release #{release_id}" in ravi.inner_text("#dashboard .waiting")
    shoot(ravi, "dashboard-gate-notice")

    services.gate_reject(release=Release.objects.get(pk=release_id), key="verify_directly", actor=person("omar", "approver"),
                         comment="leave the sandbox as it was")
    wait_status(release_id, "rolled_back", timeout=LONG / 1000)
    for page in pages.values():
        page.wait_for_selector(f"#dashboard table tr:has(a[href='/releases/{release_id}/']) .status-rolled_back", timeout=30_000)
        assert page.evaluate("window.sameDocument") is True
    assert all(page.csp_violations == [] for page in [*pages.values(), ravi_release])


def test_the_notifications_offer_is_made_once_to_approvers_only(web_server, browser):
    person("omar", "approver")
    person("vic", "viewer")
    vic = sign_in(browser, web_server, "vic")
    assert vic.locator("#notify-offer").count() == 0  # a viewer decides nothing
    assert vic.locator("#notices[role=status][aria-live=polite]").count() == 1  # where notices would go

    omar = sign_in(browser, web_server, "omar")
    omar.wait_for_selector("#notify-offer button:has-text('Turn on notifications')")
    omar.click("#notify-later")
    assert omar.is_hidden("#notify-offer")
    assert omar.evaluate("localStorage.getItem('greenlight.notifications')") == "later"
    omar.reload()
    live(omar)
    assert omar.is_hidden("#notify-offer")  # never nags
    assert omar.evaluate("window.shownNotifications") == []

    # and the other answer: asked once, remembered whatever the browser says
    omar.evaluate("localStorage.clear()")
    omar.reload()
    omar.click("#notify-on")
    wait_in(omar, "localStorage.getItem('greenlight.notifications') !== null", 10)
    omar.reload()
    live(omar)
    assert omar.is_hidden("#notify-offer")
    assert omar.csp_violations == vic.csp_violations == []


def test_a_burst_of_events_costs_the_dashboard_two_requests_and_lands_in_the_page(web_server, browser):
    person("vic", "viewer")
    vic = sign_in(browser, web_server, "vic")
    live(vic)
    before = len(vic.dashboard_refreshes)
    # a swap into the page's own fragment settles there (one into a replaced, detached one would not reach the document)
    vic.evaluate("window.swapped = 0; document.addEventListener('htmx:afterSettle', e => { if (e.target.id === 'dashboard' && e.target.isConnected) window.swapped++ })")

    vic.evaluate("for (let i = 0; i < 20; i++) greenlightDashboard.refresh()")
    wait_in(vic, "greenlightDashboard.refresh.idle() && window.swapped >= 2", 10)

    assert len(vic.dashboard_refreshes) - before == 2  # one in flight, one queued: never one per event
    assert vic.evaluate("window.swapped") == 2  # and the queued one's answer replaced the first one's, in the page
    assert vic.locator("#dashboard").count() == 1 and vic.locator("#dashboard h2#active").count() == 1


def test_a_v9_release_explains_itself_and_its_buttons_ask_in_the_page_s_own_dialog(web_server, browser):
    """No sandbox: a release of a revision the repository does not have, failed at deploy as the
    sandbox fails it (tests/test_releases.py), made in one transaction so the worker finds it failed."""
    from django.db import transaction

    from releases.models import StatusChange
    from tests.test_release_page import GIT_V9, fail_deploy

    dana = person("dana", "deployer", "approver")
    with transaction.atomic():
        environment = offline_environment("prepan")
        release = services.release_create(environment=environment, revision="v9", actor=dana)
        fail_deploy(release)
    page = sign_in(browser, web_server, "dana")
    page.native_dialogs = []
    page.on("dialog", lambda dialog: (page.native_dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{web_server}/releases/{release.pk}/")
    wait_in(page, "document.getElementById('log-state').textContent === 'live'", 30)

    deploy = page.locator("li.step:has(.step-key:text-is('deploy'))")
    assert "Revision v9 does not exist in the repository: retrying will not help; roll back or cancel." in deploy.inner_text()
    assert not page.is_visible("details.raw pre")
    page.click("details.raw summary")  # the raw output, one click away
    assert GIT_V9 in page.inner_text("details.raw pre")

    # Retry asks first, says it will not help, and going back does nothing
    page.click("button:has-text('Retry deploy')")
    dialog = page.locator("#confirm-dialog")
    dialog.wait_for(state="visible")
    assert "Retry deploy?" in dialog.inner_text() and "retrying will not help" in dialog.inner_text()
    shoot(page, "release-failed-confirm")
    page.click("#confirm-dialog button:has-text('Go back')")
    dialog.wait_for(state="hidden")
    assert Release.objects.get(pk=release.pk).status == "failed"

    # Roll back says which instances stop, and goes ahead from the dialog
    page.click("button:has-text('Roll back')")
    dialog.wait_for(state="visible")
    assert "app-canary (i-0canary) stop" in dialog.inner_text()
    with page.expect_navigation() as navigation:
        page.click("#confirm-ok")
    assert "Rolling back." in navigation.value.text()
    assert StatusChange.objects.filter(release=release, step__isnull=True, action="rollback").exists()
    # the flash message goes once the live panel shows the state moved on (the rollback's steps, at least)
    wait_in(page, "document.querySelectorAll('main > .message').length === 0", 60)
    assert page.native_dialogs == [] and page.csp_violations == []
