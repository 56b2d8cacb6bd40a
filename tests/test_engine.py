"""The engine's guards and timers, without AWS: leases decide who works, a
wait holds no worker, the sweep recovers. The steps' own work is replaced by
small functions here; tests/test_releases*.py run the real ones on the sandbox."""

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from releases import engine, plan, services, steps, tasks, transitions
from releases.models import Release, StatusChange, Step
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db(transaction=True)  # the engine manages its own connections


@pytest.fixture
def release(environment):  # noqa: F811
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):  # no worker is to run it
        return services.release_create(environment=environment, revision="v2", actor=person("dana", "deployer"))


@pytest.fixture
def one_step(environment):  # noqa: F811
    """A release whose whole plan is `launch`, so the engine goes no further."""
    frozen = plan.freeze(environment, strategy="bake", revision="v2", fleet_size=1)
    frozen["steps"] = [{"key": "launch", "kind": "action"}]
    # cancelled from the start, so a worker running beside the tests leaves it alone until we say
    made = Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan=frozen,
                                  requested_by=person("dana", "deployer"), status="cancelled")
    made.steps.create(position=0, key="launch", kind="action")
    return made


def run(release_id):
    Release.objects.filter(pk=release_id, status="cancelled").update(status="queued")
    return engine.advance(release_id)


class Script:
    """A step that waits `waits` times, then succeeds."""

    def __init__(self, waits: int, timeout: float = 60, poll: float | None = None):
        self.waits, self.timeout, self.poll, self.calls = waits, timeout, poll, 0

    def __call__(self, ctx):
        self.calls += 1
        if self.calls <= self.waits:
            raise steps.Wait("thing", f"the thing (look {self.calls})", timeout=self.timeout, poll=self.poll)
        return {"done": True}


def due(step_id):
    Step.objects.filter(pk=step_id).update(wake_at=timezone.now() - timedelta(seconds=1))


def test_a_waiting_step_gives_its_worker_back_and_runs_again_when_due(one_step, settings):
    settings.WAIT_POLL_MIN, settings.WAIT_POLL_MAX = 2.0, 30.0
    script = Script(waits=2, poll=100)
    with mock.patch.dict(steps.ACTIONS, {"launch": script}):
        delay = run(one_step.pk)

        step = Step.objects.get(release=one_step, key="launch")
        assert 1.5 <= delay <= 2.5  # the first look comes soon
        assert step.status == "running" and step.lease_owner == "" and step.waiting_for == "the thing (look 1)"
        assert step.deadline == step.wake_at - timedelta(seconds=delay) + timedelta(seconds=60)
        first_deadline = step.deadline

        assert engine.advance(one_step.pk) is None  # an early nudge changes nothing
        assert script.calls == 1

        due(step.pk)
        second = engine.advance(one_step.pk)
        assert second > delay * 0.8 / 1.2  # backing off, with jitter
        step.refresh_from_db()
        assert step.deadline == first_deadline and step.wait["polls"] == 1

        due(step.pk)
        assert engine.advance(one_step.pk) is None
    step.refresh_from_db()
    assert script.calls == 3 and step.status == "succeeded" and step.attempts == 1 and step.waiting_for == ""
    assert Release.objects.get(pk=one_step.pk).status == "succeeded"


def test_a_wait_past_its_deadline_fails_the_step_saying_what_it_waited_for(one_step):
    with mock.patch.dict(steps.ACTIONS, {"launch": Script(waits=5, timeout=30)}):
        run(one_step.pk)
        step = Step.objects.get(release=one_step, key="launch")
        since = timezone.now() - timedelta(seconds=31)
        Step.objects.filter(pk=step.pk).update(wait={**step.wait, "since": since.isoformat()})
        due(step.pk)
        engine.advance(one_step.pk)

    step.refresh_from_db()
    assert step.status == "failed"
    assert step.error == "gave up after 30s waiting for the thing (look 2)"
    assert Release.objects.get(pk=one_step.pk).status == "failed"


def test_cancelling_a_waiting_step_rolls_back_at_once_and_ends_cancelled(one_step):
    undone = []
    with mock.patch.dict(steps.ACTIONS, {"launch": Script(waits=99), "stop_new": lambda ctx: undone.append(ctx.key)}):
        run(one_step.pk)
        Release.objects.filter(pk=one_step.pk).update(cancel_requested=True)
        engine.advance(one_step.pk)

    release = Release.objects.get(pk=one_step.pk)
    assert release.status == "cancelled"
    assert release.steps.get(key="launch").error == "cancelled"
    assert [s.key for s in release.steps.filter(kind="rollback")] == ["stop_new"] == undone
    moves = [(h.step.key if h.step else "release", h.action, h.to_status) for h in StatusChange.objects.filter(release=release)]
    assert ("launch", "cancel", "failed") in moves and ("release", "cancel", "rolling_back") in moves
    assert moves[-1] == ("release", "cancelled", "cancelled")


def test_a_rollback_undoes_what_started_in_reverse_and_puts_the_old_fleet_back_first():
    assert plan.rollback_steps(["launch"]) == ["stop_new"]
    assert plan.rollback_steps(["launch", "provision", "deploy", "open_access"]) == ["revoke_access", "stop_new"]
    everything = [e.key for e in plan.BAKE if e.kind == "action"]
    assert plan.rollback_steps(everything) == ["restore_old", "retire_new", "stop_new", "remove_image", "revoke_access"]
    # the new fleet is registered but the old one was never touched: still, old first
    assert plan.rollback_steps(everything[: everything.index("register_new") + 1])[:2] == ["restore_old", "retire_new"]


def test_a_rollback_step_another_worker_holds_is_left_alone(release):
    Release.objects.filter(pk=release.pk).update(status="rolling_back")
    held = release.steps.create(position=1000, key="stop_new", kind="rollback", status="running",
                                lease_owner="other:1:1", lease_expires_at=timezone.now() + timedelta(seconds=30))

    stop_new = mock.Mock()
    with mock.patch.dict(steps.ACTIONS, {"stop_new": stop_new}):
        engine.advance(release.pk)

    stop_new.assert_not_called()
    assert Step.objects.get(pk=held.pk).lease_owner == "other:1:1"


def test_the_sweep_hands_a_step_whose_worker_died_back_and_nudges_due_waits(release):
    Release.objects.filter(pk=release.pk).update(status="running")
    Step.objects.filter(release=release, key="launch").update(status="running", lease_owner="dead:1:1",
                                                              lease_expires_at=timezone.now() - timedelta(seconds=1))

    swept = engine.sweep()

    # ours, or the sweep of a worker running beside the tests, got there first
    assert Step.objects.get(release=release, key="launch").lease_owner != "dead:1:1"
    assert release.pk in swept["nudge"] or swept["requeued"] == 0


def test_a_step_leased_by_a_live_worker_is_not_taken(release):
    Release.objects.filter(pk=release.pk).update(status="running")
    Step.objects.filter(release=release, key="launch").update(status="running", lease_owner="alive:1:1",
                                                              lease_expires_at=timezone.now() + timedelta(seconds=30))

    with mock.patch.object(engine, "run_step", autospec=True) as run_step:
        engine.advance(release.pk)

    run_step.assert_not_called()
    assert engine.sweep()["requeued"] == 0


def test_polls_back_off_to_a_ceiling_scaled_to_the_cloud_and_never_slower_than_the_hint(settings):
    settings.WAIT_POLL_MIN, settings.WAIT_POLL_MAX, settings.WAIT_POLL_FLOOR = 2.0, 30.0, 0.2
    delays = [engine.poll_delay(n, scale=1.0) for n in range(12)]
    assert 1.6 <= delays[0] <= 2.4 and 24 <= delays[-1] <= 36
    assert all(engine.poll_delay(n, scale=1.0, hint=5) <= 6 for n in range(12))
    assert all(0.2 <= engine.poll_delay(n, scale=0.02) <= 0.72 for n in range(12))


def test_the_table_of_moves_refuses_what_it_does_not_list_and_records_what_it_does(release):
    assert not transitions.release(release.pk, "retry")  # queued: nothing failed
    assert transitions.release(release.pk, "start")
    assert transitions.release(release.pk, "fail", reason="launch failed")
    assert transitions.person_actions("failed") == {"cancel", "retry", "rollback"}
    assert transitions.person_actions("succeeded") == {"rollback"}
    assert transitions.person_actions("rolled_back") == set()

    history = [(h.action, h.from_status, h.to_status, h.reason) for h in StatusChange.objects.filter(release=release)]
    assert history == [("create", "", "queued", ""), ("start", "queued", "running", ""),
                       ("fail", "running", "failed", "launch failed")]


def test_a_cancel_that_lands_while_a_step_looks_at_aws_stops_it_then_and_there(one_step):
    undone = []

    def looks_then_waits(ctx):  # the person's click arrives while this worker holds the step
        Release.objects.filter(pk=one_step.pk).update(cancel_requested=True)
        raise steps.Wait("thing", "the thing", timeout=60)

    with mock.patch.dict(steps.ACTIONS, {"launch": looks_then_waits, "stop_new": lambda ctx: undone.append(ctx.key)}):
        assert run(one_step.pk) is None  # no countdown: nothing is left to wait for

    release = Release.objects.get(pk=one_step.pk)
    assert release.status == "cancelled" and undone == ["stop_new"]
    assert release.steps.get(key="launch").error == "cancelled"


def test_a_cancel_asked_once_the_old_fleet_is_being_stopped_changes_nothing(one_step):
    frozen = {**one_step.plan, "steps": [{"key": "stop_old", "kind": "action"}]}
    Release.objects.filter(pk=one_step.pk).update(plan=frozen)
    one_step.steps.all().delete()
    # stop_old started and waits for the old instances to stop; a cancel slips in
    one_step.steps.create(position=0, key="stop_old", kind="action", status="running", attempts=1,
                          wake_at=timezone.now() - timedelta(seconds=1))
    Release.objects.filter(pk=one_step.pk).update(cancel_requested=True)
    stop_old = mock.Mock(return_value={"stopped": []})

    Release.objects.filter(pk=one_step.pk).update(status="running")
    with mock.patch.dict(steps.ACTIONS, {"stop_old": stop_old}):
        engine.advance(one_step.pk)

    stop_old.assert_called_once()
    release = Release.objects.get(pk=one_step.pk)
    assert release.status == "succeeded" and not release.steps.filter(kind="rollback").exists()
