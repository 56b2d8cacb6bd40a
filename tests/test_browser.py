"""A whole release from the browser: two people, two gates, live updates.

Real everything: the sandbox, a Celery worker, daphne, Debian's Chromium.
Screenshots of the main pages go to $SCREENSHOTS when it is set (`make
screenshots` points it at docs/screenshots/ for the README), else to a
temporary folder: a test run never changes tracked files.
"""

import csv
import io
import os
import tempfile
from pathlib import Path

import pytest

from releases import services
from releases.models import Release
from tests.helpers import wait_for
from tests.release_helpers import person, revisions_behind

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]
SHOTS = Path(os.environ.get("SCREENSHOTS") or tempfile.mkdtemp(prefix="greenlight-screenshots-"))
LONG = 150_000  # ms: a whole bake on the sandbox takes under a minute


def sign_in(browser, base: str, username: str):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    # what the Content-Security-Policy refused (it must refuse nothing of ours), and the websockets opened under it
    page.csp_violations, page.websockets = [], []
    page.on("console", lambda message: "Content Security Policy" in message.text and page.csp_violations.append(message.text))
    page.on("websocket", lambda socket: page.websockets.append(socket.url))
    page.goto(f"{base}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", "a-long-passphrase")
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base}/")
    return page


def wait_in(page, expression: str, timeout: float):
    # page.wait_for_function evaluates its string with eval() inside the page,
    # which the Content-Security-Policy refuses; page.evaluate is not subject to it
    return wait_for(lambda: page.evaluate(expression), timeout, 0.2, expression)


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


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

    ravi.once("dialog", lambda dialog: dialog.dismiss())
    ravi.click("button.reject")
    assert Release.objects.get(pk=release.pk).status == "awaiting_approval"

    ravi.once("dialog", lambda dialog: dialog.accept())
    ravi.click("button.reject")
    ravi.wait_for_selector(".release-status .status-rolled_back", timeout=LONG)
    assert revisions_behind(environment.public_url) == {before}


def test_a_change_that_comes_while_the_panel_reloads_still_shows(web_server, browser):
    """Two messages close together: the second one's refresh waits for the
    first's, and must land in the page (htmx queued it with the panel it was
    given then, which the first refresh's swap took out of the page)."""
    from releases import broadcast
    from releases.models import Environment, Recipe

    recipe = Recipe.objects.create(name="tiny", definition={"tasks": {"deploy:update": {"commands": ["true"]}}, "phases": {"deploy": ["deploy:update"]}})
    environment = Environment.objects.create(
        name="prepan", region="us-west-1", aws_endpoint_url="http://127.0.0.1:1", aws_credentials="sandbox",
        load_balancer_name="prepan", public_url="http://127.0.0.1:2", verify_security_group_id="sg-1",
        ssh_key_file="/nonexistent", subnet_id="subnet-1", key_name="prepan", base_ami="ami-1",
        repository="file:///nonexistent", recipe=recipe,
    )
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
