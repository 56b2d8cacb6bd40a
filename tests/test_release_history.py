"""A release keeps its history once it ends (issue 12): a release that succeeded, served for
hours and was then rolled back still says so; "Took" is the release's own time, the rollback's
apart; and each row says how it ended ("rolled back: verify_directly rejected by omar",
"cancelled by lena"). The moves are made through releases.transitions, as the engine and the
services make them, then dated to play hours."""

import html
import re
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from releases import audit, selectors, services, transitions
from releases.models import Release, StatusChange
from releases.templatetags.greenlight import when
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db


@pytest.fixture
def people():
    return {name: person(name, *roles) for name, roles in
            {"dana": ("deployer",), "lena": ("deployer",), "omar": ("approver",), "vic": ("viewer",)}.items()}


class Story:
    """A release of prepan created five hours ago, moved as the engine and the services move it:
    `release(minute, action, ...)` and `step(minute, key, action, ...)` date each move `minute`
    minutes after the release's creation."""

    def __init__(self, environment, requester):  # noqa: F811
        self.release = services.release_create(environment=environment, revision="v2", actor=requester)
        self.t0 = timezone.now() - timedelta(hours=5)
        Release.objects.filter(pk=self.release.pk).update(created_at=self.t0)
        self.steps = {s.key: s for s in self.release.steps.all()}

    def at(self, minute: float):
        return self.t0 + timedelta(minutes=minute)

    def release_move(self, minute: float, action: str, *, actor=None, reason: str = "", **fields) -> "Story":
        assert transitions.release(self.release.pk, action, actor=actor, reason=reason, **fields)
        self._date(StatusChange.objects.filter(release=self.release, step=None).latest("id"), minute)
        if Release.objects.get(pk=self.release.pk).status in transitions.ENDINGS:
            Release.objects.filter(pk=self.release.pk).update(finished_at=self.at(minute))
        return self

    def step_move(self, minute: float, key: str, action: str, *, actor=None, reason: str = "") -> "Story":
        assert transitions.step(self.steps[key].pk, action, actor=actor, reason=reason, release_id=self.release.pk)
        self._date(StatusChange.objects.filter(release=self.release, step=self.steps[key]).latest("id"), minute)
        return self

    def _date(self, change: StatusChange, minute: float) -> None:
        StatusChange.objects.filter(pk=change.pk).update(at=self.at(minute))


def served_then_rolled_back(environment, p):  # noqa: F811
    """Succeeded after 7 minutes, served 2 h 3 min, rolled back by lena in 2 minutes."""
    story = Story(environment, p["dana"]).release_move(0, "start").release_move(7, "finish", error="")
    story.release_move(130, "rollback", actor=p["lena"], reason="rolled back by lena")
    return story.release_move(132, "rolled_back", reason="the old fleet serves")


def rejected_at_the_gate(environment, p):  # noqa: F811
    story = Story(environment, p["dana"]).release_move(0, "start")
    story.step_move(4, "verify_directly", "open").release_move(4, "open_gate", reason="verify_directly is open")
    reason = "rejected by omar: the page is blank"
    story.step_move(6, "verify_directly", "reject", actor=p["omar"], reason=reason)
    story.release_move(6, "reject", actor=p["omar"], reason=f"verify_directly {reason}",
                       error=f"verify_directly: {reason}")
    return story.release_move(8, "rolled_back", reason="the old fleet serves")


def failed_then_rolled_back(environment, p):  # noqa: F811
    story = Story(environment, p["dana"]).release_move(0, "start")
    story.step_move(1, "provision", "start").step_move(3, "provision", "fail", reason="exit 1")
    story.release_move(3, "fail", reason="provision failed", error="provision: exit 1")
    story.release_move(40, "rollback", actor=p["lena"], reason="rolled back by lena")
    return story.release_move(42, "rolled_back", reason="the old fleet serves")


def cancelled_at_the_gate(environment, p):  # noqa: F811
    story = Story(environment, p["dana"]).release_move(0, "start")
    story.release_move(4, "open_gate", reason="verify_directly is open")
    story.release_move(5, "cancel", actor=p["lena"], reason="cancelled by lena")
    return story.release_move(6, "cancelled", reason="the old fleet serves")


def cancelled_while_a_step_ran(environment, p):  # noqa: F811
    """Asked by lena while provision ran: the engine moves the release when the step stops."""
    story = Story(environment, p["dana"]).release_move(0, "start")
    audit.record("release.cancel", actor=p["lena"], release=story.release, target=f"release {story.release.pk}")
    story.release_move(3, "cancel", reason="cancelled")
    return story.release_move(4, "cancelled", reason="the old fleet serves")


def timed_out_at_the_gate(environment, p):  # noqa: F811
    story = Story(environment, p["dana"]).release_move(0, "start")
    story.step_move(4, "verify_directly", "open").release_move(4, "open_gate", reason="verify_directly is open")
    story.step_move(64, "verify_directly", "expire", reason="nobody decided it in time")
    story.release_move(64, "expire", reason="verify_directly timed out", error="verify_directly: timed out")
    return story.release_move(65, "rolled_back", reason="the old fleet serves")


def retried_then_succeeded(environment, p):  # noqa: F811
    story = Story(environment, p["dana"]).release_move(0, "start")
    story.step_move(1, "provision", "start").step_move(3, "provision", "fail", reason="exit 1")
    story.release_move(3, "fail", reason="provision failed", error="provision: exit 1")
    story.release_move(10, "retry", actor=p["lena"], reason="retry provision", error="")
    return story.release_move(15, "finish", error="")


STORIES = {  # the dashboard's Outcome line, and its Took
    served_then_rolled_back: ("rolled back by lena after serving 2h 03m", "7:00 + rollback 2:00"),
    rejected_at_the_gate: ("rolled back: verify_directly rejected by omar", "6:00 + rollback 2:00"),
    failed_then_rolled_back: ("rolled back by lena after provision failed", "3:00 + rollback 2:00"),
    cancelled_at_the_gate: ("cancelled by lena", "5:00 + rollback 1:00"),
    cancelled_while_a_step_ran: ("cancelled by lena", "3:00 + rollback 1:00"),
    timed_out_at_the_gate: ("rolled back: verify_directly timed out", "1h 04m + rollback 1:00"),
    retried_then_succeeded: ("", "15:00"),
}


def dashboard_row(client, release) -> str:
    body = html.unescape(client.get("/", HTTP_HX_REQUEST="true").content.decode())  # the live refresh's fragment
    recent = body[body.index('id="recent"'):]
    row = recent[recent.index(f'<a href="/releases/{release.pk}/">#{release.pk}</a>'):]
    return row[:row.index("</tr>")]


def release_page(client, release) -> str:
    response = client.get(f"/releases/{release.pk}/")
    assert response.status_code == 200
    return html.unescape(response.content.decode())


@pytest.mark.parametrize("make", STORIES, ids=lambda make: make.__name__)
def test_the_dashboard_says_how_each_release_ended_and_what_it_took(client, environment, people, make):  # noqa: F811
    release = make(environment, people).release
    client.force_login(people["vic"])

    row = dashboard_row(client, release)

    how, took = STORIES[make]
    status = Release.objects.get(pk=release.pk).status
    outcome = row[row.index('<td class="outcome">'):]
    outcome = outcome[:outcome.index("</td>")]
    assert f"status-{status}" in outcome
    if how:
        assert f'<small class="how">{how}</small>' in outcome
    else:
        assert 'class="how"' not in outcome
    took_cell = row[row.index('<td class="took">'):]
    assert re.sub("<[^>]+>", "", took_cell[:took_cell.index("</td>")]) == took


def test_a_release_that_served_and_was_rolled_back_says_so_on_its_page(client, environment, people):  # noqa: F811
    story = served_then_rolled_back(environment, people)
    client.force_login(people["vic"])

    body = release_page(client, story.release)

    assert (f"Succeeded at {when(story.at(7))} after 7:00, served 2h 03m, "
            f"rolled back by lena at {when(story.at(130))}; the rollback took 2:00.") in body
    assert "status-rolled_back" in body[body.index('class="release-status"'):][:200]  # its status is unchanged


def test_while_it_rolls_back_the_page_says_the_rollback_started(client, environment, people):  # noqa: F811
    story = Story(environment, people["dana"]).release_move(0, "start").release_move(7, "finish", error="")
    story.release_move(130, "rollback", actor=people["lena"], reason="rolled back by lena")
    client.force_login(people["vic"])

    body = release_page(client, story.release)

    assert (f"Succeeded at {when(story.at(7))} after 7:00, served 2h 03m, "
            f"rollback started by lena at {when(story.at(130))}.") in body
    assert "the rollback took" not in body


@pytest.mark.parametrize("make, said", [
    (rejected_at_the_gate,
     "Rolled back at {6}: verify_directly rejected by omar: the page is blank; the rollback took 2:00."),
    (failed_then_rolled_back, "Rolled back by lena at {40}: provision failed; the rollback took 2:00."),
    (cancelled_at_the_gate, "Cancelled by lena at {5}; the rollback took 1:00."),
    (cancelled_while_a_step_ran, "Cancelled by lena at {3}; the rollback took 1:00."),
    (timed_out_at_the_gate, "Rolled back at {64}: verify_directly timed out; the rollback took 1:00."),
    (retried_then_succeeded, "Succeeded at {15} after 15:00."),
], ids=lambda v: getattr(v, "__name__", ""))
def test_the_release_page_says_how_it_ended_who_and_why(client, environment, people, make, said):  # noqa: F811
    story = make(environment, people)
    client.force_login(people["vic"])

    body = release_page(client, story.release)

    minute = int(said[said.index("{") + 1:said.index("}")])
    assert said.replace(f"{{{minute}}}", str(when(story.at(minute)))) in body


def test_a_running_release_has_no_ending_yet(client, environment, people):  # noqa: F811
    story = Story(environment, people["dana"]).release_move(0, "start")
    client.force_login(people["vic"])

    body = release_page(client, story.release)

    assert 'class="outcome"' not in body and "Succeeded at" not in body


def test_the_outcome_of_a_release_served_then_rolled_back(environment, people):  # noqa: F811
    story = served_then_rolled_back(environment, people)
    release = Release.objects.get(pk=story.release.pk)

    outcome = selectors.outcomes([release])[release.pk]

    assert outcome["release"] == (story.t0, story.at(7))
    assert outcome["succeeded_at"] == story.at(7) and outcome["served"] == (story.at(7), story.at(130))
    assert outcome["rollback"] == (story.at(130), story.at(132)) and outcome["ended_at"] == story.at(132)
    assert (outcome["rollback_action"], outcome["rollback_by"], outcome["rollback_why"]) == ("rollback", "lena", "")


def test_a_retried_failure_is_not_the_end_of_the_release_s_time(environment, people):  # noqa: F811
    story = Story(environment, people["dana"]).release_move(0, "start")
    story.step_move(1, "provision", "start").step_move(3, "provision", "fail", reason="exit 1")
    story.release_move(3, "fail", reason="provision failed")
    story.release_move(10, "retry", actor=people["lena"], reason="retry provision", error="")
    story.step_move(11, "deploy", "start").step_move(12, "deploy", "fail", reason="exit 2")
    story.release_move(12, "fail", reason="deploy failed")
    story.release_move(30, "cancel", actor=people["lena"], reason="cancelled by lena").release_move(31, "cancelled")
    release = Release.objects.get(pk=story.release.pk)

    outcome = selectors.outcomes([release])[release.pk]

    assert outcome["release"] == (story.t0, story.at(12))  # its last failure, not its first
    assert outcome["how"] == "cancelled by lena after deploy failed"
    assert outcome["rollback_why"] == "deploy failed"


def count(client) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get("/", HTTP_HX_REQUEST="true").status_code == 200
    return len(captured)


def test_the_dashboard_reads_the_rows_histories_in_the_same_queries_however_many(
        client, environment, people, django_assert_max_num_queries):  # noqa: F811
    def all_stories():
        for make in STORIES:
            make(environment, people)
    all_stories()
    client.force_login(people["vic"])
    client.get("/", HTTP_HX_REQUEST="true")  # a first visit fills what a visit caches (the session, say)
    few = count(client)

    all_stories()  # twice as many, all on the dashboard (it shows 20)
    assert Release.objects.exclude(status__in=Release.ACTIVE).count() == 2 * len(STORIES)

    with django_assert_max_num_queries(few):
        body = html.unescape(client.get("/", HTTP_HX_REQUEST="true").content.decode())
    assert body.count("rolled back by lena after serving 2h 03m") == 2
    assert body.count("cancelled by lena</small>") == 4  # two asked at a gate, two while a step ran (from the audit)


def test_one_query_reads_an_outcome_and_other_step_moves_change_nothing(environment, people):  # noqa: F811
    story = served_then_rolled_back(environment, people)
    release = Release.objects.get(pk=story.release.pk)
    before = selectors.outcomes([release])[release.pk]
    for key in ("launch", "provision", "deploy"):
        story.step_move(1, key, "start").step_move(2, key, "succeed")

    with CaptureQueriesContext(connection) as captured:
        after = selectors.outcomes([release])[release.pk]

    assert len(captured) == 1
    assert after == before and after["how"] == "rolled back by lena after serving 2h 03m"
