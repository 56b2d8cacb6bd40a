"""Leases, fencing and cancel: a worker that lost its step stops touching the
world, a dead worker's step comes back within LEASE_SECONDS + SWEEP_SECONDS
and says so, and a cancel ends `cancelled` with the old fleet back wherever
it lands (issue 9)."""

import pytest

from releases.models import LogLine, Release, Step
from tests.helpers import child_environ, processes_with
from tests.release_helpers import LoadLoop, api, revisions_behind, wait_gate, wait_status
from tests.test_api import environment  # noqa: F401  (fixture)
from tests.test_releases import approve, assert_nothing_left, cloud, dana, prepan, ravi, serving, start, wait_for_step  # noqa: F401

sandbox = pytest.mark.sandbox


@sandbox
@pytest.mark.django_db(transaction=True)
def test_cancelling_while_register_new_waits_for_in_service_ends_cancelled_with_the_old_fleet_back(
        prepan, dana, ravi, release_sandbox):  # noqa: F811
    before = serving(prepan)
    old = set(cloud(prepan).registered())
    release_id = start(dana, "v2" if before == "v1" else "v1", clone_count=1)
    wait_gate(release_id, "verify_directly")
    approve(ravi, release_id, "verify_directly")
    release = wait_gate(release_id, "swap_elb")
    # the canary stops answering its health check, so register_new waits for InService
    canary = release.instances.get(slot="canary")
    release_sandbox.run({"PrivateIpAddress": canary.address}, "kill $(cat var/run/web.pid)")

    with LoadLoop(prepan.public_url) as load:
        approve(ravi, release_id, "swap_elb")
        from tests.helpers import wait_for

        wait_for(lambda: Release.objects.get(pk=release_id).steps.filter(key="register_new", status="running")
                 .exclude(waiting_for="").first(), 60, 0.05, "register_new to wait for InService")
        response = api(dana).post(f"/api/releases/{release_id}/cancel")
        assert response.status_code == 200, response.json()
        release = wait_status(release_id, Release.Status.CANCELLED, Release.Status.FAILED, timeout=90)

    assert release.status == "cancelled", (release.error, [(s.key, s.status, s.error) for s in release.steps.all()])
    assert release.steps.get(key="register_new").error == "cancelled"
    assert [s.key for s in release.steps.filter(kind="rollback")] == ["restore_old", "retire_new", "stop_new", "remove_image", "revoke_access"]
    assert all(s.status == "succeeded" for s in release.steps.filter(kind="rollback"))
    assert set(cloud(prepan).registered()) == old
    assert revisions_behind(prepan.public_url) == {before}
    assert_nothing_left(prepan, release)
    assert load.failures == [], load.failures[:5]
    second = api(dana).post(f"/api/releases/{release_id}/cancel")
    assert second.status_code == 409 and "cancelled" in second.json()["error"]
    assert LogLine.objects.filter(release=release, step="register_new", text="cancelled").exists()


# -- fencing: a worker that lost its lease stops touching the world ----------------------------------

OWNER, USURPER = "paused-worker:1:1", "other-worker:2:2"


@pytest.fixture
def sandbox_environment(release_sandbox):
    from releases import services

    return services.environment_import_sandbox(info=release_sandbox.info)


def leased_release(env_row, user, *, key: str, recipe: dict | None = None) -> tuple[Release, Step]:
    """A running release of one step, already leased by OWNER: what `engine.take` leaves
    (made so, not taken, so that a worker running beside the tests never picks it up)."""
    from django.utils import timezone

    from releases import plan

    frozen = plan.freeze(env_row, strategy="bake", revision="v2", fleet_size=1)
    frozen["steps"] = [{"key": key, "kind": "action"}]
    if recipe is not None:
        frozen["recipe"] = recipe
    release = Release.objects.create(environment=env_row, revision="v2", fleet_size=1, plan=frozen, requested_by=user,
                                     status="running")
    step = release.steps.create(position=0, key=key, kind="action", status="running", attempts=1, lease_owner=OWNER,
                                lease_expires_at=timezone.now() + timezone.timedelta(seconds=60), started_at=timezone.now())
    return release, step


def run_in_thread(release, step):
    import threading

    from django.db import connection

    from releases import engine

    outcome = {}

    def work():
        try:
            outcome["result"] = engine.run_step(release, step, OWNER)
        except BaseException as exc:  # the assertion below shows it
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, outcome


def take_over(step) -> int:
    """Another worker holds the step now (the sweep handed it back while this one was paused)."""
    from django.utils import timezone

    from releases.models import StatusChange, Step

    Step.objects.filter(pk=step.pk).update(lease_owner=USURPER, lease_expires_at=timezone.now() + timezone.timedelta(seconds=120))
    return StatusChange.objects.filter(step=step).count()


def assert_untouched_since_takeover(release, step, moves: int) -> None:
    from releases.models import StatusChange, Step

    row = Step.objects.get(pk=step.pk)
    assert (row.status, row.lease_owner, row.error, row.attempts, row.waiting_for) == ("running", USURPER, "", 1, "")
    assert StatusChange.objects.filter(step=step).count() == moves
    assert Release.objects.get(pk=release.pk).status == "running"
    said = list(LogLine.objects.filter(release=release).values_list("text", flat=True))
    assert not [line for line in said if "failed" in line or "cancelled" in line or "succeeded" in line], said


def end(release) -> None:
    from releases.models import Step

    Step.objects.filter(release=release).update(status="failed", lease_owner="")
    Release.objects.filter(pk=release.pk).update(status="cancelled")


@sandbox
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("where", ["remote", "local"])
def test_a_worker_that_loses_its_lease_mid_command_stops_the_command_and_runs_nothing_more(
        sandbox_environment, release_sandbox, where, tmp_path, settings):
    from releases.models import Instance
    from tests.helpers import wait_for
    from tests.release_helpers import person

    settings.LEASE_SECONDS = 3
    seconds = 317 if where == "remote" else 318  # a sleep to find among the machine's processes
    marker = "after-the-lease" if where == "remote" else str(tmp_path / "after-the-lease")
    recipe = {"params": {"marker": marker}, "tasks": {"slow": {"run": where, "commands": [
        f"echo started; sleep {seconds}; echo finished", "touch {marker}"]}}, "phases": {"deploy": ["slow"]}}
    release, step = leased_release(sandbox_environment, person("dana", "deployer"), key="deploy", recipe=recipe)
    host = release_sandbox.launch(name="fenced")
    Instance.objects.create(release=release, instance_id=host["InstanceId"], name="fenced", role="canary", slot="canary",
                            address=host["PrivateIpAddress"])
    try:
        thread, outcome = run_in_thread(release, step)
        wait_for(lambda: LogLine.objects.filter(release=release, text="started").exists(), 60, 0.1, "the command to start")
        assert processes_with(f"sleep\x00{seconds}".encode())

        moves = take_over(step)

        thread.join(15)  # the command would sleep for minutes
        assert not thread.is_alive(), "the command went on after the lease was lost"
        assert outcome == {"result": None}, outcome
        # its whole process group is ended: a local one's by the worker, a remote one's by a kill
        # sent over SSH (sshd would not end it when the channel closes), and nothing more is started
        wait_for(lambda: not processes_with(f"sleep\x00{seconds}".encode()), 10, 0.2, "the command to end")
        said = list(LogLine.objects.filter(release=release).values_list("text", flat=True))
        assert "finished" not in said and not [line for line in said if "touch" in line], said
        if where == "remote":
            assert release_sandbox.run(host, "test -e after-the-lease && echo ran || echo never")[1] == [("stdout", "never")]
        else:
            assert not (tmp_path / "after-the-lease").exists()
        assert_untouched_since_takeover(release, step, moves)
    finally:
        end(release)
        release_sandbox.client("ec2").terminate_instances(InstanceIds=[host["InstanceId"]])


@sandbox
@pytest.mark.django_db(transaction=True)
def test_a_worker_that_loses_its_lease_makes_no_aws_call_and_saves_nothing(sandbox_environment, settings):
    import threading
    from unittest import mock

    from datetime import timedelta

    from django.utils import timezone

    from releases import engine, steps
    from releases.models import AuditEvent, Step
    from tests.helpers import wait_for
    from tests.release_helpers import person

    settings.LEASE_SECONDS = 1.5  # the heartbeat renews every half second
    env = sandbox_environment
    release, step = leased_release(env, person("dana", "deployer"), key="open_access")
    # a lease of LEASE_SECONDS, as engine.take gives (leased_release's 60 s would outlast
    # every renewal below, and the test passed only when the step took more than one beat to begin)
    Step.objects.filter(pk=step.pk).update(lease_expires_at=timezone.now() + timedelta(seconds=settings.LEASE_SECONDS))
    resumed, reached = threading.Event(), threading.Event()
    calls = []

    def paused_then_acts(ctx):
        reached.set()
        resumed.wait(30)  # SIGSTOP, in effect: the lease runs out meanwhile
        calls.append("open_port")
        ctx.cloud.open_port(env.verify_security_group_id, env.app_port, "10.9.8.7/32", "a fenced worker")
        calls.append("save")
        ctx.save(fenced=True)
        calls.append("returned")
        return {}

    try:
        with mock.patch.dict(steps.ACTIONS, {"open_access": paused_then_acts}):
            thread, outcome = run_in_thread(release, step)
            assert reached.wait(30)
            first = Step.objects.get(pk=step.pk).lease_expires_at
            # renewed to now + LEASE_SECONDS: changed (a renewal is not always later than the lease it replaces)
            wait_for(lambda: Step.objects.get(pk=step.pk).lease_expires_at != first, 15, 0.1, "the heartbeat to renew the lease")
            moves = take_over(step)
            resumed.set()
            thread.join(30)
        assert not thread.is_alive() and outcome == {"result": None}, outcome
        assert calls == ["open_port"]  # stopped by the fence before the call went out
        assert not engine.cloud_for(release.plan["environment"]).port_open(env.verify_security_group_id, env.app_port, "10.9.8.7/32")
        assert not AuditEvent.objects.filter(release=release, action__startswith="aws:").exists()
        assert "fenced" not in Release.objects.get(pk=release.pk).state
        assert_untouched_since_takeover(release, step, moves)
    finally:
        end(release)


@pytest.mark.django_db(transaction=True)
def test_a_state_write_after_the_lease_is_lost_is_refused_in_the_same_statement(environment):  # noqa: F811
    from releases import engine, steps
    from tests.release_helpers import person

    release, step = leased_release(environment, person("dana", "deployer"), key="launch")
    try:
        lease = steps.Lease(step.pk, OWNER)
        ctx = steps.Context(release=release, step=step, cloud=engine.release_cloud(release, lease.check), log=None, lease=lease)
        ctx.save(first=True)
        take_over(step)
        with pytest.raises(steps.LeaseLost):
            ctx.save(second=True)
        assert Release.objects.get(pk=release.pk).state == {"first": True}
        assert lease.lost.is_set() and ctx.stopping()
    finally:
        end(release)


# -- a dead worker's step: taken back, and saying so ------------------------------------------------


@pytest.fixture
def quiet_release(environment):  # noqa: F811
    """A release whose `launch` a dead worker held; ended already, so no worker runs it on."""
    from unittest import mock

    from releases import services, tasks
    from tests.release_helpers import person

    with mock.patch.object(tasks.advance_release, "delay", autospec=True):
        release = services.release_create(environment=environment, revision="v2", actor=person("dana", "deployer", "approver"))
    Release.objects.filter(pk=release.pk).update(status="cancelled")
    return release


@pytest.mark.django_db(transaction=True)
def test_a_step_whose_worker_went_quiet_says_so_and_the_sweep_says_why_it_runs_again(quiet_release):
    from django.utils import timezone

    from releases import engine
    from django.contrib.auth.models import User

    release = quiet_release
    Step.objects.filter(release=release, key="launch").update(
        status="running", attempts=1, lease_owner="dead-host:41:1", lease_expires_at=timezone.now() - timezone.timedelta(seconds=1))
    client = api(User.objects.get(username="dana"))

    launch = client.get(f"/api/releases/{release.pk}/").json()["steps"][0]
    assert launch["status"] == "running"
    assert launch["waiting_for"] == "the sweep to take it back: its worker stopped renewing its lease"

    engine.sweep()  # ours, or that of a worker running beside the tests: the outcome is the same

    launch = client.get(f"/api/releases/{release.pk}/").json()["steps"][0]
    assert launch["status"] == "pending"
    assert launch["waiting_for"] == "a worker to run it again: its worker (dead-host:41:1) stopped renewing its lease"
    line = LogLine.objects.get(release=release, step="launch")  # stored, not left in a buffer
    assert line.text == "launch: its worker (dead-host:41:1) stopped renewing its lease; running it again" and line.stream == "stderr"
    history = client.get(f"/api/releases/{release.pk}/").json()["history"]
    assert {"step": "launch", "action": "requeue", "reason": "its worker (dead-host:41:1) stopped renewing its lease"}.items() <= history[-1].items()


def test_the_lease_and_the_sweep_bound_how_long_a_dead_worker_holds_a_step(settings):
    from releases import engine

    settings.LEASE_SECONDS = 30
    assert engine.lease_term().total_seconds() == 30
    settings.LEASE_SECONDS = 2
    assert engine.lease_term().total_seconds() == 2


def test_a_lease_shorter_than_a_second_is_refused_with_the_setting_named():
    import subprocess
    import sys

    from tests.helpers import ROOT

    done = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, capture_output=True, text=True,
                          env={**child_environ(), "DJANGO_SETTINGS_MODULE": "deployer.settings", "LEASE_SECONDS": "0"})
    assert done.returncode != 0
    assert "LEASE_SECONDS is 0: a step's lease needs at least 1 second" in done.stderr


# -- cancel: wherever it lands, or refused once the swap is done -----------------------------------


def steps_until(release, key: str, status: str) -> None:
    """The release's plan steps done up to `key`, which is `status` (leased by a live worker when running)."""
    from django.utils import timezone

    from releases.models import Step

    keys = [s.key for s in release.steps.order_by("position")]
    before = keys[: keys.index(key)]
    Step.objects.filter(release=release, key__in=before).update(status="succeeded", attempts=1)
    lease = {"lease_owner": "alive:1:1", "lease_expires_at": timezone.now() + timezone.timedelta(seconds=300)} if status == "running" else {}
    Step.objects.filter(release=release, key=key).update(status=status, attempts=1, **lease)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("status", ["running", "failed"])
def test_once_the_old_fleet_is_being_stopped_cancel_is_refused_and_roll_back_is_what_undoes_it(quiet_release, status):
    from unittest import mock

    from releases import tasks
    from django.contrib.auth.models import User

    release = quiet_release
    steps_until(release, "stop_old", status)
    Release.objects.filter(pk=release.pk).update(status=status)
    client = api(User.objects.get(username="dana"))
    try:
        detail = client.get(f"/api/releases/{release.pk}/").json()
        assert "cancel" not in detail["actions"]
        assert ("rollback" in detail["actions"]) == (status == "failed")

        with mock.patch.object(tasks.advance_release, "delay", autospec=True) as queued:
            response = client.post(f"/api/releases/{release.pk}/cancel")

        assert response.status_code == 409
        error = response.json()["error"]
        assert "can no longer be cancelled" in error and "stop_old" in error and "roll it back" in error
        assert not Release.objects.get(pk=release.pk).cancel_requested
        queued.assert_not_called()
    finally:
        Release.objects.filter(pk=release.pk).update(status="cancelled")


@pytest.mark.django_db(transaction=True)
def test_cancel_is_still_offered_while_the_old_fleet_drains(quiet_release):
    from unittest import mock

    from releases import tasks
    from django.contrib.auth.models import User

    release = quiet_release
    steps_until(release, "deregister_old", "running")
    Release.objects.filter(pk=release.pk).update(status="running")
    client = api(User.objects.get(username="dana"))
    try:
        assert "cancel" in client.get(f"/api/releases/{release.pk}/").json()["actions"]
        with mock.patch.object(tasks.advance_release, "delay", autospec=True):
            response = client.post(f"/api/releases/{release.pk}/cancel")
        assert response.status_code == 200 and response.json()["cancel_requested"] is True
    finally:
        Release.objects.filter(pk=release.pk).update(status="cancelled")
