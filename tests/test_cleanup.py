"""Clean-up against the sandbox: baked images beyond an environment's last N
go with their snapshots, never one in use; instances a rollback stopped are
terminated after the retention; every deletion is audited, and the
environment page says beforehand what goes and when."""

import time
import uuid
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from deployer import aws
from releases import cleanup, engine, identity, plan, tasks
from releases.models import AuditEvent, Environment, Installation, Release
from releases import services
from tests.helpers import SandboxProcess, wait_for
from tests.release_helpers import api, cloud, person, start, wait_gate, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def cleanup_sandbox(tmp_path_factory):
    """A sandbox of its own: these tests delete images and terminate instances."""
    with SandboxProcess(tmp_path_factory.mktemp("cleanup-sandbox"), draining_timeout=1) as process:
        yield process


@pytest.fixture
def prepan(cleanup_sandbox):
    return services.environment_import_sandbox(info=cleanup_sandbox.info)


def bake(c: aws.Cloud, instance_id: str, number: int, *, installation: str | None = None) -> str:
    """An image as a release's bake_image step makes it: named and tagged by the release's identity."""
    made = identity.Identity("prepan", number, str(uuid.uuid4()), installation or Installation.current_id())
    image_id = c.create_image(instance_id, made.image_name, {**made.tags(), "revision": "v1"})
    wait_for(lambda: c.image_state(image_id) == "available", 30, 0.1, f"image {image_id}")
    time.sleep(1.1)  # EC2 gives creation times to the second: each image its own
    return image_id


def snapshots_of(sandbox: SandboxProcess, image_ids: list[str]) -> dict[str, list[str]]:
    images = sandbox.client("ec2").describe_images(Filters=[{"Name": "image-id", "Values": image_ids}])["Images"]
    return {i["ImageId"]: aws.Cloud.image_snapshots(i) for i in images}


def existing_snapshots(sandbox: SandboxProcess) -> set[str]:
    return {s["SnapshotId"] for s in sandbox.client("ec2").describe_snapshots(OwnerIds=["self"])["Snapshots"]}


def page(environment: Environment) -> str:
    client = Client()
    client.force_login(person(f"vera{uuid.uuid4().hex[:6]}", "viewer"))
    # the page, and what it loads after it from AWS (its instances and images)
    shown = []
    for url in ("", "aws/instances/", "aws/images/"):
        response = client.get(f"/environments/{environment.name}/{url}")
        assert response.status_code == 200
        shown.append(response.content.decode())
    return "\n".join(shown)


def test_images_beyond_the_last_n_go_with_their_snapshots_and_those_in_use_stay(prepan, cleanup_sandbox):
    c = cloud(prepan)
    source = cleanup_sandbox.launch(name="bake-source")["InstanceId"]
    oldest, older, rollback_target, launched_from, newer, newest = images = [bake(c, source, n) for n in range(1, 7)]
    foreign = bake(c, source, 7, installation=str(uuid.uuid4()))  # another installation's, however new
    snapshots = snapshots_of(cleanup_sandbox, images)
    assert all(snapshots[i] for i in images)
    # an instance (stopped) launched from one; a succeeded release that could roll back to another
    user = cleanup_sandbox.launch(image_id=launched_from, name="from-an-old-image")["InstanceId"]
    c.stop([user])
    Environment.objects.filter(pk=prepan.pk).update(images_kept=2, last_baked_ami=newest)
    prepan.refresh_from_db()
    frozen = plan.freeze(prepan, strategy="deploy_from_image", revision="v1", fleet_size=1)
    frozen["environment"]["last_baked_ami"] = frozen["environment"]["image"] = rollback_target
    release = Release.objects.create(environment=prepan, revision="v1", fleet_size=1, plan=frozen, status="succeeded",
                                     requested_by=person("dana", "deployer"), finished_at=timezone.now())

    shown = page(prepan)
    fates = {fate.id: fate for fate in cleanup.image_schedule(prepan)}
    assert set(fates) == set(images)  # not the other installation's
    assert {i for i, fate in fates.items() if fate.delete} == {oldest, older}
    assert fates[newest].reason == fates[newer].reason == "one of the last 2 baked images"
    assert fates[launched_from].reason.startswith("from-an-old-image")
    assert fates[rollback_target].reason == f"release #{release.pk} could still roll back to it"
    for image_id in images:
        assert image_id in shown
    assert shown.count("deleted at the next clean-up") == 2

    assert tasks.clean_up() == {"deleted": {"prepan": [older, oldest]}, "failed": {}}

    left = {i["ImageId"] for i in c.images(tags={aws.TAG_ENVIRONMENT: "prepan"})}
    assert left == {rollback_target, launched_from, newer, newest, foreign}
    remaining = existing_snapshots(cleanup_sandbox)
    assert not {*snapshots[oldest], *snapshots[older]} & remaining
    assert {s for i in (rollback_target, launched_from, newer, newest) for s in snapshots[i]} <= remaining
    deleted = AuditEvent.objects.filter(action="image.delete", environment_id=prepan.pk)
    assert {e.target: e.details["snapshots"] for e in deleted} == {oldest: snapshots[oldest], older: snapshots[older]}
    deregistered = set(AuditEvent.objects.filter(action="aws:DeregisterImage").values_list("target", flat=True))
    assert deregistered == {oldest, older}
    assert set(AuditEvent.objects.filter(action="aws:DeleteSnapshot").values_list("target", flat=True)) == {
        *snapshots[oldest], *snapshots[older]}
    assert "deleted at the next clean-up" not in page(prepan)

    # once the release can no longer roll back, its image is just old
    Release.objects.filter(pk=release.pk).update(state={"old_terminated": True})
    assert cleanup.clean_up()["deleted"] == {"prepan": [rollback_target]}
    assert cleanup.clean_up() == {"deleted": {}, "failed": {}}  # nothing left to do, nothing done


def test_snapshots_of_an_image_deregistered_by_a_clean_up_that_died_are_deleted_next_time(prepan, cleanup_sandbox):
    c = cloud(prepan)
    source = cleanup_sandbox.launch(name="bake-source-2")["InstanceId"]
    image_id = bake(c, source, 11)
    [snapshot] = snapshots_of(cleanup_sandbox, [image_id])[image_id]
    # what clean_up_images does before it deletes the snapshots, and no further
    c.tag([snapshot], {aws.TAG_DEREGISTERED_IMAGE: image_id})
    c.deregister_image(image_id)
    assert snapshot in existing_snapshots(cleanup_sandbox)

    cleanup.clean_up()

    assert snapshot not in existing_snapshots(cleanup_sandbox)
    assert AuditEvent.objects.filter(action="aws:DeleteSnapshot", target=snapshot).exists()


def test_instances_a_rollback_stopped_are_terminated_after_the_retention(prepan, cleanup_sandbox, celery_worker):
    retention = 8
    Environment.objects.filter(pk=prepan.pk).update(retention=retention)
    dana, ravi = person("dana", "deployer"), person("ravi", "approver")
    old = set(cloud(prepan).registered())
    release_id = start(dana, "v2")
    wait_gate(release_id, "verify_directly")
    response = api(ravi).post(f"/api/releases/{release_id}/gates/verify_directly/reject", {"comment": "no"}, format="json")
    assert response.status_code == 200, response.json()
    release = wait_status(release_id, Release.Status.ROLLED_BACK)
    canary = release.instances.get(slot="canary")
    [info] = cloud(prepan).instances(ids=[canary.instance_id])
    assert info.state == "stopped"  # stopped by stop_new, kept for a person to look at

    # the page says when it goes, before it goes
    due = release.finished_at + timedelta(seconds=retention)
    assert [(f.id, f.at) for f in cleanup.instance_schedule(prepan)] == [(canary.instance_id, due)]
    shown = page(prepan)
    assert canary.instance_id in shown and f'datetime="{timezone.localtime(due).isoformat()}"' in shown and "terminated at" in shown
    assert f"stopped by the rollback of release #{release_id}" in shown

    # the worker's own sweep (every second in the tests) terminates it once the retention is over
    def terminated():
        [now] = cloud(prepan).instances(ids=[canary.instance_id])
        return now.state in ("shutting-down", "terminated") and now
    wait_for(terminated, retention + 60, 0.5, f"{canary.instance_id} to be terminated")
    assert timezone.now() >= due
    release.refresh_from_db()
    assert release.state.get("new_terminated") is True
    assert AuditEvent.objects.filter(release=release, action="aws:TerminateInstances", target=canary.instance_id).exists()
    # the old fleet serves on, untouched
    assert {i.state for i in cloud(prepan).instances(ids=list(old))} == {"running"}
    assert set(cloud(prepan).registered()) == old
    assert cleanup.instance_schedule(prepan) == []
    assert "No instance is waiting to be terminated." in page(prepan)
    assert engine.sweep()["terminated"] == 0  # done once


def test_the_old_fleet_of_a_succeeded_release_is_shown_then_terminated_after_the_retention(prepan, cleanup_sandbox):
    old = cleanup_sandbox.launch(name="retired-1")["InstanceId"]
    cloud(prepan).stop([old])
    frozen = plan.freeze(prepan, strategy="bake", revision="v2", fleet_size=1)
    frozen["environment"]["retention"] = 60
    ended = timezone.now() - timedelta(seconds=30)
    release = Release.objects.create(environment=prepan, revision="v2", fleet_size=1, plan=frozen, status="succeeded",
                                     requested_by=person("dana", "deployer"), finished_at=ended)
    release.instances.create(instance_id=old, name="retired-1", role="old")

    [fate] = cleanup.instance_schedule(prepan)
    assert (fate.id, fate.at, fate.why) == (old, ended + timedelta(seconds=60), f"replaced by release #{release.pk}")
    assert engine.sweep()["terminated"] == 0  # not yet: 30 of its 60 s
    assert cloud(prepan).instances(ids=[old])[0].state == "stopped"

    Release.objects.filter(pk=release.pk).update(finished_at=timezone.now() - timedelta(seconds=61))
    assert engine.sweep()["terminated"] == 1

    assert cloud(prepan).instances(ids=[old])[0].state in ("shutting-down", "terminated")
    assert Release.objects.get(pk=release.pk).state == {"old_terminated": True}
    assert AuditEvent.objects.filter(release=release, action="aws:TerminateInstances", target=old).exists()
    assert cleanup.instance_schedule(prepan) == []
    response = api(person("ravi", "deployer")).post(f"/api/releases/{release.pk}/rollback")
    assert response.status_code == 409 and "terminated" in response.json()["error"]
