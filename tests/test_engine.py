"""The engine's guards, without AWS: leases decide who works, the sweep recovers."""

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone

from releases import engine, services, tasks
from releases.models import Release, Step
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db(transaction=True)  # the engine manages its own connections


@pytest.fixture
def release(environment):  # noqa: F811
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):  # no worker is to run it
        return services.release_create(environment=environment, revision="v2", actor=person("dana", "deployer"))


def test_a_rollback_another_worker_holds_is_left_alone(release):
    Release.objects.filter(pk=release.pk).update(status="rolling_back", rollback_owner="other:1:1",
                                                 rollback_lease_until=timezone.now() + timedelta(seconds=30))

    with mock.patch.object(engine.steps, "roll_back", autospec=True) as roll_back:
        engine.rollback(release.pk)

    roll_back.assert_not_called()
    assert Release.objects.get(pk=release.pk).rollback_owner == "other:1:1"


def test_the_sweep_restarts_a_rollback_whose_worker_died(release):
    Release.objects.filter(pk=release.pk).update(status="rolling_back", rollback_owner="dead:1:1",
                                                 rollback_lease_until=timezone.now() - timedelta(seconds=1))

    with mock.patch.object(tasks.rollback_release, "delay", autospec=True) as delay:
        engine.sweep()

    # ours, or the sweep of a worker running beside the tests, got there first
    taken_over = Release.objects.get(pk=release.pk).rollback_owner != "dead:1:1"
    assert delay.call_args_list == [mock.call(release.pk)] or taken_over


def test_the_sweep_hands_a_step_whose_worker_died_back_to_the_queue(release):
    Release.objects.filter(pk=release.pk).update(status="running")
    Step.objects.filter(release=release, key="launch").update(status="running", lease_owner="dead:1:1",
                                                              lease_expires_at=timezone.now() - timedelta(seconds=1))

    with mock.patch.object(tasks.advance_release, "delay", autospec=True):
        engine.sweep()

    assert Step.objects.get(release=release, key="launch").lease_owner != "dead:1:1"


def test_a_step_leased_by_a_live_worker_is_not_taken(release):
    Release.objects.filter(pk=release.pk).update(status="running")
    Step.objects.filter(release=release, key="launch").update(status="running", lease_owner="alive:1:1",
                                                              lease_expires_at=timezone.now() + timedelta(seconds=30))

    with mock.patch.object(engine, "run_step", autospec=True) as run_step:
        engine.advance(release.pk)

    run_step.assert_not_called()
    assert engine.sweep()["requeued"] == 0
