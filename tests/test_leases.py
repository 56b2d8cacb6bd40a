"""Leases, fencing and cancel: a worker that lost its step stops touching the
world, a dead worker's step comes back within LEASE_SECONDS + SWEEP_SECONDS
and says so, and a cancel ends `cancelled` with the old fleet back wherever
it lands (issue 9)."""

import pytest

from releases.models import LogLine, Release
from tests.release_helpers import LoadLoop, api, wait_gate, wait_status
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
    assert [s.key for s in release.steps.filter(kind="rollback")] == ["restore_old", "retire_new", "stop_new", "revoke_access"]
    assert all(s.status == "succeeded" for s in release.steps.filter(kind="rollback"))
    assert set(cloud(prepan).registered()) == old
    assert revisions_behind_is(prepan, before)
    assert_nothing_left(prepan, release)
    assert load.failures == [], load.failures[:5]
    second = api(dana).post(f"/api/releases/{release_id}/cancel")
    assert second.status_code == 409 and "cancelled" in second.json()["error"]
    assert LogLine.objects.filter(release=release, step="register_new", text="cancelled").exists()


def revisions_behind_is(environment, revision: str) -> bool:
    from tests.release_helpers import revisions_behind

    return revisions_behind(environment.public_url) == {revision}
