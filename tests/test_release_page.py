"""The release page after things go wrong or end, and the dashboard's rows: a failure in plain
words, what each button will do, skipped and cancelled steps, the end's summary."""

import html
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from releases import failures, services
from releases.models import Approval, Instance, Release, StatusChange, Step
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

GIT_V9 = "deploy:update failed on app-canary (exit 128): fatal: --detach does not take a path argument 'v9'"
V9_EXPLAINED = "revision v9 does not exist in the repository: retrying will not help; roll back or cancel"


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


def make(environment, revision, actor):  # noqa: F811
    return services.release_create(environment=environment, revision=revision, actor=actor)


def page(client, user, release) -> str:
    client.force_login(user)
    response = client.get(f"/releases/{release.pk}/")
    assert response.status_code == 200
    return html.unescape(response.content.decode())


def step_row(body: str, key: str) -> str:
    start = body.index(f'<span class="step-key">{key}</span>')
    return body[body.rindex("<li", 0, start):body.index("</li>", start)]


def instances(release, *rows):
    for role, slot, name, instance_id in rows:
        Instance.objects.create(release=release, role=role, slot=slot, name=name, instance_id=instance_id, state="running")


@pytest.mark.parametrize("error, what, retry", [
    (GIT_V9, "revision v9 does not exist in the repository", "will not help"),
    ("error: pathspec 'v9' did not match any file(s) known to git", "revision v9 does not exist in the repository", "will not help"),
    ("An error occurred (RequestLimitExceeded) when calling RunInstances: Request limit exceeded.", "AWS was busy or did not answer in time", "may help"),
    ("An error occurred (Throttling) when calling DescribeInstances: Rate exceeded", "AWS was busy or did not answer in time", "may help"),
    ("An error occurred (UnauthorizedOperation) when calling RunInstances", "AWS refused: the environment's credentials lack a permission", "will not help"),
    ("provision failed on app-canary: timed out after 600s", "it did not finish in time, or the connection dropped", "may help"),
    ("something nobody foresaw", "deploy failed", "may help"),
])
def test_known_failures_are_explained_with_a_verdict_on_retrying(error, what, retry):
    explanation = failures.explain(error, step="deploy", revision="v9")
    assert (explanation.what, explanation.retry) == (what, retry)
    assert failures.explain("", step="deploy") is None


def fail_deploy(release):
    now = timezone.now()
    Step.objects.filter(release=release, key__in=["launch", "provision"]).update(status="succeeded", attempts=1, started_at=now, finished_at=now)
    Step.objects.filter(release=release, key="deploy").update(status="failed", attempts=1, error=GIT_V9, started_at=now, finished_at=now)
    Release.objects.filter(pk=release.pk).update(status="failed", error=f"deploy: {GIT_V9}")
    instances(release, ("canary", "canary", "app-canary", "i-0canary"))


def test_a_v9_release_explains_itself_with_the_raw_output_a_click_away(client, environment, dana):  # noqa: F811
    release = make(environment, "v9", dana)
    fail_deploy(release)

    body = page(client, dana, release)

    deploy = step_row(body, "deploy")
    assert V9_EXPLAINED in deploy.lower()
    assert "<details" in deploy and GIT_V9 in deploy[deploy.index("<details"):]  # the raw message, one click away
    head = body[:body.index('<ol class="timeline"')]
    assert "Revision v9 does not exist in the repository:" in head and GIT_V9 not in head
    # the buttons ask first, in the page's own dialog, saying what happens to which instances
    assert '<dialog id="confirm-dialog"' in body
    retry = body[body.index('/retry/"'):]
    assert "Runs deploy again on app-canary (i-0canary)" in retry[:retry.index(">")]
    assert "retrying will not help" in retry[:retry.index(">")]
    rollback = body[body.index('/rollback/"'):]
    assert "the new instances app-canary (i-0canary) stop, and are terminated 1 day later" in rollback[:rollback.index(">")]
    assert "confirm(" not in open("static/js/greenlight.js").read().replace("window.confirm", "")


def test_a_viewer_reads_the_explanation_but_gets_no_buttons(client, environment, dana):  # noqa: F811
    release = make(environment, "v9", dana)
    fail_deploy(release)

    body = page(client, person("vic", "viewer"), release)

    assert V9_EXPLAINED in body.lower()
    assert "/retry/" not in body and "/rollback/" not in body and "/cancel/" not in body


def cancel_at_the_first_gate(release):
    now = timezone.now()
    steps = {s.key: s for s in release.steps.all()}
    for key in ("launch", "provision", "deploy", "open_access", "smoke_direct"):
        Step.objects.filter(pk=steps[key].pk).update(status="succeeded", attempts=1, started_at=now, finished_at=now)
    gate = steps["verify_directly"]
    Step.objects.filter(pk=gate.pk).update(status="failed", error="cancelled by dana", started_at=now, finished_at=now)
    StatusChange.objects.create(release=release, step=gate, action="close", from_status="awaiting_approval", to_status="failed",
                                reason="cancelled by dana", actor_name="dana")
    Step.objects.create(release=release, position=1000, key="stop_new", kind="rollback", status="succeeded", attempts=1)
    Release.objects.filter(pk=release.pk).update(status="cancelled", finished_at=now, cancel_requested=True)
    instances(release, ("canary", "canary", "app-canary", "i-0canary"))


def test_a_cancelled_gate_reads_cancelled_and_unrun_steps_skipped_and_the_end_is_summarised(client, environment, dana):  # noqa: F811
    release = make(environment, "v2", dana)
    cancel_at_the_first_gate(release)

    body = page(client, dana, release)

    assert "status-cancelled" in step_row(body, "verify_directly") and "failed" not in step_row(body, "verify_directly")
    assert "skipped" in step_row(body, "swap_elb") and "pending" not in step_row(body, "swap_elb")
    assert "skipped" in step_row(body, "close_access")
    # the rollback is in the timeline, after its own heading
    assert body.index("<strong>Rollback</strong>") < body.index('<span class="step-key">stop_new</span>')
    summary = body[body.index('class="card summary"'):]
    summary = summary[:summary.index("</section>")]
    assert "Serving now: what served before, as before" in summary
    assert "New instances app-canary (i-0canary): stopped; terminated" in summary
    assert f'href="/releases/new/?environment={environment.name}"' in summary and "Release another revision" in summary


def test_after_a_rollback_the_summary_names_what_serves_again(client, environment, dana):  # noqa: F811
    earlier = make(environment, "v1", dana)
    Release.objects.filter(pk=earlier.pk).update(status="succeeded", finished_at=timezone.now())
    release = make(environment, "v2", dana)
    Release.objects.filter(pk=release.pk).update(status="rolled_back", finished_at=timezone.now())
    instances(release, ("old", "", "app-old-1", "i-0old1"), ("clone", "clone-1", "app-clone-1", "i-0new1"))

    body = page(client, dana, release)

    assert f"Serving now: v1 (release #{earlier.pk}) on app-old-1 (i-0old1)" in body
    assert "New instances app-clone-1 (i-0new1): stopped; terminated" in body
    # a viewer reads the summary, and is not offered a release they may not start
    viewer = page(client, person("vic", "viewer"), release)
    assert "Serving now: v1" in viewer and "Release another revision" not in viewer


def test_after_success_the_summary_says_when_the_old_fleet_goes(client, environment, dana):  # noqa: F811
    release = make(environment, "v2", dana)
    finished = timezone.now()
    Release.objects.filter(pk=release.pk).update(status="succeeded", finished_at=finished)
    instances(release, ("old", "", "app-old-1", "i-0old1"), ("clone", "clone-1", "app-clone-1", "i-0new1"))

    body = page(client, dana, release)

    assert "Serving now: v2 on app-clone-1 (i-0new1)" in body
    due = (finished + timedelta(seconds=environment.retention)).isoformat()
    assert f'Old fleet app-old-1 (i-0old1): stopped; terminated <time datetime="{due}"' in body


def reject_the_first_gate(release):
    gate = release.steps.get(key="verify_directly")
    Step.objects.filter(pk=gate.pk).update(status="failed", error="rejected by ravi")
    Approval.objects.create(step=gate, user=person("ravi", "approver"), decision="reject", comment="wrong")
    StatusChange.objects.create(release=release, step=gate, action="reject", from_status="awaiting_approval", to_status="failed",
                                actor_name="ravi")
    Release.objects.filter(pk=release.pk).update(status="rolled_back", finished_at=timezone.now())


def test_a_decision_reads_rejected_not_rejectd(client, environment, dana):  # noqa: F811
    release = make(environment, "v2", dana)
    reject_the_first_gate(release)

    body = page(client, dana, release)

    assert "verify_directly: rejected by ravi" in body and "rejectd" not in body
    assert "status-rejected" in step_row(body, "verify_directly")


@pytest.mark.parametrize("revision, end, labels", [
    ("v9", fail_deploy, {"launch": "succeeded", "deploy": "failed", "smoke_direct": "pending", "verify_directly": "pending"}),
    ("v2", cancel_at_the_first_gate, {"deploy": "succeeded", "verify_directly": "cancelled", "close_access": "skipped",
                                      "swap_elb": "skipped", "stop_new": "succeeded"}),
    ("v2", reject_the_first_gate, {"launch": "skipped", "verify_directly": "rejected", "swap_elb": "skipped"}),
], ids=["failed", "cancelled", "rejected"])
def test_the_api_reads_each_step_as_the_page_does(client, environment, dana, revision, end, labels):  # noqa: F811
    from tests.release_helpers import api

    release = make(environment, revision, dana)
    end(release)

    answer = api(person("vic", "viewer")).get(f"/api/releases/{release.pk}/").json()
    body = page(client, dana, release)

    steps = {s["key"]: s for s in answer["steps"]}
    assert {key: steps[key]["label"] for key in labels} == labels
    for key, step in steps.items():
        row = step_row(body, key)
        assert f'class="step step-{step["label"]}' in row, (key, step["label"], row[:200])  # the page's own word
        stored = Step.objects.get(release=release, key=key)
        assert (step["status"], step["error"]) == (stored.status, stored.error)  # the stored status and raw error stay
        if step["explanation"]:
            explained = step["explanation"]
            assert f"{explained['what'][:1].upper()}{explained['what'][1:]}: {explained['advice']}." in row
        else:
            assert 'class="step-explanation"' not in row
    if end is fail_deploy:
        assert steps["deploy"]["explanation"] == {"what": "revision v9 does not exist in the repository", "retry": "will not help",
                                                  "advice": "retrying will not help; roll back or cancel"}
        assert [k for k, s in steps.items() if s["explanation"]] == ["deploy"]
    else:
        assert not any(s["explanation"] for s in steps.values())  # a gate's end is no failure to explain


def test_the_dashboard_has_a_row_per_environment(client, environment, dana):  # noqa: F811
    other = type(environment).objects.create(**{**{f.name: getattr(environment, f.name) for f in type(environment)._meta.fields
                                                  if f.name != "id"}, "name": "quiet"})
    served = make(environment, "v1", dana)
    since = timezone.now() - timedelta(hours=2)
    Release.objects.filter(pk=served.pk).update(status="succeeded", finished_at=since)
    running = make(environment, "v2", dana)
    Release.objects.filter(pk=running.pk).update(status="awaiting_approval")
    client.force_login(person("vic", "viewer"))

    body = html.unescape(client.get("/", HTTP_HX_REQUEST="true").content.decode())  # the live refresh's fragment

    row = body[body.index(f'data-environment="{environment.name}"'):]
    row = row[:row.index("</tr>")]
    assert f"v1 <a href=\"/releases/{served.pk}/\">(release #{served.pk})</a>" in row
    assert f'datetime="{since.isoformat()}"' in row
    assert f"#{running.pk}</a> v2 by dana" in row and "waiting for approval" in row
    quiet = body[body.index(f'data-environment="{other.name}"'):]
    quiet = quiet[:quiet.index("</tr>")]
    assert "nothing Greenlight released" in quiet and "idle" in quiet


def test_approved_by_names_only_approvers_and_took_splits_the_rollback(client, environment, dana):  # noqa: F811
    release = make(environment, "v2", dana)
    ravi, rita = person("ravi", "approver"), person("rita", "approver")
    Approval.objects.create(step=release.steps.get(key="verify_directly"), user=ravi, decision="approve")
    Approval.objects.create(step=release.steps.get(key="swap_elb"), user=rita, decision="reject")
    created = timezone.now() - timedelta(minutes=10)
    Release.objects.filter(pk=release.pk).update(created_at=created, status="rolled_back", finished_at=created + timedelta(minutes=9))
    change = StatusChange.objects.create(release=release, action="reject", from_status="awaiting_approval", to_status="rolling_back",
                                         actor_name="rita")
    StatusChange.objects.filter(pk=change.pk).update(at=created + timedelta(minutes=7))
    client.force_login(person("vic", "viewer"))

    body = html.unescape(client.get("/").content.decode())

    recent = body[body.index('id="recent"'):]
    row = recent[recent.index(f'<a href="/releases/{release.pk}/">#{release.pk}</a>'):]
    row = row[:row.index("</tr>")]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)  # environment, revision, ..., approved by, finished
    assert cells[-2] == "ravi"  # rita rejected, as the outcome says
    assert '<small class="how">rolled back: rejected by rita</small>' in cells[2]
    assert '<td class="took">7:00 <span class="rollback-took">+ rollback 2:00</span></td>' in row
