"""Phones and screen readers: axe-core on every page state (0 serious or critical
violations), no page wider than a 390 px phone, the navigation behind a Menu
button there, and a polite live region that says what a live update changed.

The releases are rows made here (no sandbox): their steps' states are set
directly, as tests/test_release_page.py does, and the worker never takes one
(a running step holds a live lease; the others wait for a person or have ended)."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from deployer.sandbox import repository
from releases import broadcast, services
from releases.models import Approval, Instance, LogLine, Release, StatusChange, Step
from tests.a11y import assert_accessible, readable, violations, wider_than
from tests.helpers import wait_for
from tests.release_helpers import offline_environment, person, sign_in_page
from tests.test_browser import shoot, wait_in, watched

pytestmark = [pytest.mark.django_db(transaction=True)]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
GIT_V9 = "deploy:update failed on app-canary (exit 128): fatal: --detach does not take a path argument 'v9'"



def release_of(environment, revision, actor, status, *, done=(), step_status=None, monkeypatch):
    """A release row in `status`: the steps in `done` succeeded, the next one in `step_status`."""
    monkeypatch.setattr(services, "_queue", lambda release_id: None)  # no worker takes these
    release = services.release_create(environment=environment, revision=revision, actor=actor)
    now = timezone.now()
    Step.objects.filter(release=release, key__in=done).update(status="succeeded", attempts=1, started_at=now - timedelta(minutes=3),
                                                              finished_at=now - timedelta(minutes=1))
    if step_status is not None:
        key, status_of_step, extra = step_status
        Step.objects.filter(release=release, key=key).update(status=status_of_step, attempts=1, started_at=now, **extra)
    finished = now if status in ("succeeded", "cancelled", "rolled_back") else None
    Release.objects.filter(pk=release.pk).update(status=status, finished_at=finished)
    return Release.objects.get(pk=release.pk)


def log(release, *lines):
    now = timezone.now()
    LogLine.objects.bulk_create(LogLine(release=release, seq=n, step=step, host=host, stream=stream, text=text, at=now)
                                for n, (step, host, stream, text) in enumerate(lines, 1))


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Environments, people and a release in each state the release page has."""
    url = repository.ensure(tmp_path / "app.git")  # tags v1 and v2
    prepan, staging, qa, demo = (offline_environment(name, url) for name in ("prepan", "staging", "qa", "demo"))
    dana = person("dana", "deployer", "approver")
    person("vera", "viewer")
    User.objects.create_superuser("root", password="a-long-passphrase")
    before = ("launch", "provision", "deploy", "open_access", "smoke_direct")
    states = {}
    states["succeeded"] = release_of(prepan, "v1", dana, "succeeded", monkeypatch=monkeypatch,
                                     done=[s for s in ("launch", "provision", "deploy", "open_access", "smoke_direct", "verify_directly",
                                                       "bake", "launch_clones", "swap_elb", "close_access")])
    Step.objects.filter(release=states["succeeded"]).update(status="succeeded", attempts=1)
    gate = states["succeeded"].steps.get(key="verify_directly")
    Approval.objects.create(step=gate, user=User.objects.get(username="root"), decision="approve", comment="looks right")
    states["rolled back"] = release_of(prepan, "v2", dana, "rolled_back", done=before, monkeypatch=monkeypatch)
    Step.objects.create(release=states["rolled back"], position=1000, key="stop_new", kind="rollback", status="succeeded", attempts=1)
    Instance.objects.create(release=states["rolled back"], role="clone", slot="clone-1", name="app-clone-1", instance_id="i-0new1",
                            state="stopped")
    # how it ended, for the dashboard's outcome line and the release page's sentence (selectors.outcomes)
    StatusChange.objects.create(release=states["rolled back"], action="reject", from_status="awaiting_approval",
                                to_status="rolling_back", reason="verify_directly rejected by root: the page is blank",
                                actor_name="root")
    StatusChange.objects.create(release=states["rolled back"], action="rolled_back", from_status="rolling_back",
                                to_status="rolled_back", reason="the old fleet serves", actor_name="greenlight")
    states["running"] = release_of(prepan, "v2", dana, "running", done=("launch",), monkeypatch=monkeypatch,
                                   step_status=("provision", "running", {"lease_owner": "elsewhere:1:1",
                                                                        "lease_expires_at": timezone.now() + timedelta(hours=1)}))
    states["at a gate"] = release_of(staging, "v2", dana, "awaiting_approval", done=before, monkeypatch=monkeypatch,
                                     step_status=("verify_directly", "awaiting_approval",
                                                  {"result": {"url": "http://127.0.0.1:1/", "checks": ["GET / 200"]}}))
    states["failed"] = release_of(qa, "v9", dana, "failed", done=("launch", "provision"), monkeypatch=monkeypatch,
                                  step_status=("deploy", "failed", {"error": GIT_V9}))
    Release.objects.filter(pk=states["failed"].pk).update(error=f"deploy: {GIT_V9}")
    Instance.objects.create(release=states["failed"], role="canary", slot="canary", name="app-canary", instance_id="i-0canary",
                            state="running")
    StatusChange.objects.create(release=states["failed"], action="fail", from_status="running", to_status="failed",
                                reason="deploy failed", actor_name="greenlight")
    for release in states.values():
        log(release, ("launch", "", "info", "launching app-canary"), ("provision", "app-canary", "stdout", "apt-get install -y nginx"),
            ("deploy", "app-canary", "stderr", "warning: a long line " + "x" * 300), ("deploy", "app-canary", "stdout", "done"))
    return {"environments": (prepan, staging, qa, demo), "releases": {k: Release.objects.get(pk=v.pk) for k, v in states.items()}}


def open_page(browser, base, viewport, username=None):
    context = browser.new_context(viewport=viewport)
    page = watched(context.new_page(), base)
    if username:
        sign_in_page(page, base, username)
    return page


def settle(page):
    """Wait for what the page loads after itself: its websocket's first answer, the log's lines."""
    page.wait_for_load_state("networkidle")
    if page.query_selector("#dashboard-state"):
        wait_in(page, "document.getElementById('dashboard-state').textContent === 'live'", 20)
    if page.query_selector("#log-state"):
        wait_in(page, "document.getElementById('log-state').textContent === 'live'", 20)
        wait_in(page, "document.querySelectorAll('.log-line').length > 0", 20)


def visit_every_state(page, base, world, check):
    """Every page state a signed-in superuser sees, `check(page, name)` on each."""
    releases = world["releases"]

    def go(path, name):
        response = page.goto(f"{base}{path}")
        assert response.status in (200, 403, 404), f"{path}: {response.status}"
        settle(page)
        check(page, name)

    go("/", "dashboard with releases")
    assert "rolled back: rejected by root" in page.inner_text("main")  # axe reads how releases ended too
    go("/environments/", "environments")
    go("/environments/prepan/", "environment page")
    go("/environments/prepan/edit/", "environment form")
    page.get_by_label("App port").fill("70000")
    page.get_by_role("button", name="Save").click()
    page.wait_for_load_state("networkidle")
    assert page.locator(".error-summary").is_visible()
    check(page, "environment form with errors")
    go("/environments/new/", "new environment form")
    go("/recipes/tiny/edit/", "recipe page")
    go("/releases/new/", "wizard: environment (some busy)")
    page.get_by_label("Environment").select_option("demo")
    page.get_by_role("button", name="Next").click()
    page.wait_for_url("**step=revision")
    settle(page)
    check(page, "wizard: revision picker")
    page.get_by_role("region", name="Choose a revision").get_by_role("button", name="v2", exact=True).click()
    page.wait_for_url("**step=options")
    check(page, "wizard: options")
    page.get_by_role("button", name="Next").click()
    page.wait_for_url("**step=review")
    settle(page)
    check(page, "wizard: review")
    for state, release in releases.items():
        go(f"/releases/{release.pk}/", f"release page, {state}")
    go("/audit/", "audit, people")
    go("/audit/?view=everything", "audit, everything")
    go("/accounts/profile/", "profile")
    go("/api/docs/", "API docs")
    page.wait_for_selector(".swagger-ui .info", timeout=20_000)
    check(page, "API docs, loaded")
    go("/releases/999999/", "404")


def test_axe_finds_nothing_serious_on_any_page_state(web_server, browser, world):
    failures = []

    def check(page, name):
        found = violations(page)
        if found:
            failures.append(readable(found, f"{name} ({page.url})"))

    page = open_page(browser, web_server, DESKTOP)
    page.goto(f"{web_server}/accounts/login/")
    check(page, "sign-in page")
    page.fill("#id_username", "root")
    page.fill("#id_password", "wrong")
    page.click("button:has-text('Sign in')")
    check(page, "sign-in page with an error")
    page.context.close()

    # a viewer's dashboard (no buttons) and the 403 of a page only a maintainer opens; the empty dashboard has its own test
    viewer = open_page(browser, web_server, DESKTOP, "vera")
    check(viewer, "dashboard as a viewer")
    viewer.goto(f"{web_server}/environments/new/")
    assert "maintainer role" in viewer.content()
    check(viewer, "403")
    viewer.context.close()

    page = open_page(browser, web_server, DESKTOP, "root")
    visit_every_state(page, web_server, world, check)
    assert not page.csp_violations, page.csp_violations
    page.context.close()
    assert not failures, "\n\n".join(failures)


def test_an_empty_dashboard_has_nothing_serious(web_server, browser):
    User.objects.create_superuser("root", password="a-long-passphrase")
    page = open_page(browser, web_server, DESKTOP, "root")
    settle(page)
    assert "No releases yet." in page.inner_text("main")
    assert_accessible(page, "the empty dashboard")
    page.set_viewport_size(PHONE)
    assert wider_than(page, PHONE["width"]) is None, wider_than(page, PHONE["width"])
    page.context.close()


def test_at_390_px_no_page_is_wider_than_the_phone_and_axe_still_passes(web_server, browser, world):
    wide = []

    def check(page, name):
        too_wide = wider_than(page, PHONE["width"])
        if too_wide:
            wide.append(f"{name}: {too_wide}")
        found = violations(page)  # what the phone's layout shows (its menu closed) passes axe too
        if found:
            wide.append(readable(found, f"{name} at 390 px"))

    page = open_page(browser, web_server, PHONE)
    page.goto(f"{web_server}/accounts/login/")
    check(page, "sign-in page")
    page.fill("#id_username", "root")
    page.fill("#id_password", "a-long-passphrase")
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{web_server}/")
    visit_every_state(page, web_server, world, check)
    assert not page.csp_violations, page.csp_violations
    page.context.close()
    assert not wide, "\n".join(wide)


def test_on_a_phone_the_navigation_folds_behind_a_menu_button(web_server, browser, world):
    page = open_page(browser, web_server, PHONE, "root")
    settle(page)
    shoot(page, "phone-dashboard")
    nav = page.get_by_role("navigation", name="main")
    menu = page.get_by_role("button", name="Menu")
    assert menu.is_visible() and menu.get_attribute("aria-expanded") == "false"
    assert nav.is_hidden()

    menu.click()
    assert menu.get_attribute("aria-expanded") == "true"
    for name in ("Dashboard", "Environments", "New release", "Audit", "root"):
        link = nav.get_by_role("link", name=name, exact=True)
        assert link.is_visible(), name
        box = link.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], f"{name} runs off the bar: {box}"
    assert nav.get_by_role("button", name="Sign out").is_visible()
    assert_accessible(page, "the dashboard on a phone, its menu open")
    shoot(page, "phone-menu")

    page.keyboard.press("Escape")
    assert nav.is_hidden() and menu.get_attribute("aria-expanded") == "false"

    # on a wide screen there is no Menu button: the navigation is always there
    page.set_viewport_size(DESKTOP)
    assert menu.is_hidden() and nav.get_by_role("link", name="Audit").is_visible()
    page.context.close()


def announced(page) -> str:
    return page.evaluate("document.getElementById('announcer').textContent")


def test_gate_and_status_changes_are_announced_in_a_polite_live_region(web_server, browser, world):
    release = world["releases"]["running"]
    page = open_page(browser, web_server, DESKTOP, "root")
    dashboard_region = page.locator("#announcer")
    assert dashboard_region.get_attribute("aria-live") == "polite"
    settle(page)

    release_page = page.context.new_page()
    release_page.goto(f"{web_server}/releases/{release.pk}/")
    settle(release_page)
    assert announced(release_page) == ""

    # a gate opens: both pages say so
    now = timezone.now()
    Step.objects.filter(release=release, key__in=("provision", "deploy", "open_access", "smoke_direct")).update(
        status="succeeded", finished_at=now, lease_owner="")
    Step.objects.filter(release=release, key="verify_directly").update(status="awaiting_approval", started_at=now)
    Release.objects.filter(pk=release.pk).update(status="awaiting_approval")
    gate = Step.objects.get(release=release, key="verify_directly")
    broadcast.step_changed(release.pk, gate.pk)
    wait_for(lambda: announced(release_page) == "verify_directly waits for approval", 20, 0.2, "the release page's announcement")
    wait_for(lambda: announced(page) == f"release #{release.pk}: verify_directly waits for approval", 20, 0.2,
             "the dashboard's announcement")

    # the release ends
    Step.objects.filter(release=release).update(status="succeeded")
    Release.objects.filter(pk=release.pk).update(status="succeeded", finished_at=timezone.now())
    broadcast.release_changed(release.pk)
    wait_for(lambda: announced(release_page) == f"release #{release.pk} succeeded", 20, 0.2, "the release page's announcement")
    wait_for(lambda: announced(page) == f"release #{release.pk} succeeded", 20, 0.2, "the dashboard's announcement")
    assert_accessible(release_page, "the release page after it succeeded live")
    page.context.close()
