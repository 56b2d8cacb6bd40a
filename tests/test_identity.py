"""A release is known in AWS by its own uuid, never by its id alone (issue 9,
finding 5), and a rollback removes the image it baked (finding 8c)."""

import re
import time
import uuid

import pytest
from django.db import connection

from deployer import aws
from releases import engine, identity, plan, selectors, services, steps
from releases.logs import LogWriter
from releases.models import AuditEvent, Environment, Installation, Instance, Release
from tests.release_helpers import api, cloud, person, start, wait_gate, wait_status
from tests.test_api import environment  # noqa: F401  (fixture)

AMI_NAME = re.compile(r"^[A-Za-z0-9()\[\] ./\-'@_]{3,128}$")


# -- names and tags, no AWS --------------------------------------------------------------


def a_release(pk=7, *, plan_identity=True, env="prepan"):
    frozen = {"environment": {"name": env}}
    if plan_identity:
        frozen["identity"] = {"installation": "inst-1"}
    return Release(pk=pk, uuid=uuid.UUID("0f5d6a4e-6c4b-4f43-9d55-2b1a3e8c1d20"), plan=frozen)


def test_a_new_release_is_tagged_by_its_uuid_with_its_number_and_installation_beside():
    named = identity.of(a_release())

    assert named.tags() == {
        "greenlight:release": "0f5d6a4e-6c4b-4f43-9d55-2b1a3e8c1d20",
        "greenlight:release-number": "7",
        "greenlight:installation": "inst-1",
        "greenlight:environment": "prepan",
    }
    assert named.instance("canary") == {"greenlight:release": "0f5d6a4e-6c4b-4f43-9d55-2b1a3e8c1d20",
                                        "greenlight:slot": "canary"}
    assert named.image_name == "greenlight-prepan-r7-0f5d6a4e6c4b4f439d552b1a3e8c1d20"
    assert named.client_token("clone-3") == "greenlight-0f5d6a4e6c4b4f439d552b1a3e8c1d20-clone-3"


def test_names_stay_within_what_aws_accepts_for_the_longest_environment_name():
    named = identity.of(a_release(pk=2**53 - 1, env="e" * 100))

    assert AMI_NAME.match(named.image_name), named.image_name
    assert named.image_name.endswith(f"-r{2**53 - 1}-0f5d6a4e6c4b4f439d552b1a3e8c1d20")
    assert len(named.client_token("clone-50")) <= 64


def test_a_release_made_before_uuids_keeps_finding_its_resources_by_its_id():
    named = identity.of(a_release(plan_identity=False))

    assert named.legacy
    assert named.tags() == {"greenlight:release": "7", "greenlight:environment": "prepan"}
    assert named.instance("clone-1") == {"greenlight:release": "7", "greenlight:slot": "clone-1"}
    assert named.image_name == "greenlight-prepan-release-7"
    assert named.client_token("canary") == "greenlight-7-canary"


@pytest.mark.django_db
def test_a_new_plan_freezes_the_installation_and_the_release_its_uuid(environment, monkeypatch):  # noqa: F811
    from releases import tasks

    monkeypatch.setattr(tasks.advance_release, "delay", lambda *a: None)
    first = services.release_create(environment=environment, revision="v2", actor=person("dana", "deployer"))
    Release.objects.filter(pk=first.pk).update(status="cancelled")
    second = services.release_create(environment=environment, revision="v2", actor=person("ravi", "deployer"))

    installation = Installation.current_id()
    assert first.plan["identity"] == second.plan["identity"] == {"installation": installation}
    assert first.uuid != second.uuid
    assert identity.of(second).tags()["greenlight:release"] == str(second.uuid)
    assert api(person("vera", "viewer")).get(f"/api/releases/{second.pk}/").json()["uuid"] == str(second.uuid)


@pytest.mark.django_db
def test_the_environment_page_links_an_instance_only_to_the_release_in_this_database_that_launched_it(environment):  # noqa: F811
    dana = person("dana", "deployer")
    ours = Release.objects.create(environment=environment, revision="v2", fleet_size=1, requested_by=dana,
                                  plan={"environment": {"name": environment.name}}, status="cancelled")
    Instance.objects.create(release=ours, instance_id="i-legacy-ours", role="canary")

    def instance(id, **tags):
        return aws.InstanceInfo(id=id, state="stopped", private_ip="", public_dns="", name=id, tags=tags)

    found = selectors._launched_by([
        instance("i-new-ours", **{aws.TAG_RELEASE: str(ours.uuid), aws.TAG_RELEASE_NUMBER: str(ours.pk)}),
        instance("i-new-lost", **{aws.TAG_RELEASE: str(uuid.uuid4()), aws.TAG_RELEASE_NUMBER: str(ours.pk)}),
        instance("i-legacy-ours", **{aws.TAG_RELEASE: str(ours.pk)}),
        instance("i-legacy-lost", **{aws.TAG_RELEASE: str(ours.pk)}),
        instance("i-untagged"),
    ])

    assert found == {
        "i-new-ours": {"release": ours.pk, "release_number": str(ours.pk)},
        "i-new-lost": {"release": None, "release_number": str(ours.pk)},
        "i-legacy-ours": {"release": ours.pk, "release_number": str(ours.pk)},
        "i-legacy-lost": {"release": None, "release_number": str(ours.pk)},
        "i-untagged": {"release": None, "release_number": ""},
    }


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_every_release_a_uuid_and_the_installation_an_id(environment):  # noqa: F811
    from django.core.management import call_command

    dana = person("dana", "deployer")
    call_command("migrate", "releases", "0007", verbosity=0)
    try:
        with connection.cursor() as cursor:
            for n in range(3):
                cursor.execute(
                    "INSERT INTO releases_release (environment_id, revision, strategy, fleet_size, plan, state, status, "
                    "cancel_requested, error, requested_by_id, created_at, log_seq) "
                    "VALUES (%s, 'v1', 'bake', 1, %s, '{}', 'succeeded', false, '', %s, now(), 0)",
                    [environment.pk, '{"environment": {"name": "%s"}}' % environment.name, dana.pk])
    finally:
        call_command("migrate", "releases", verbosity=0)

    releases = list(Release.objects.all())
    assert len(releases) == 3 and len({r.uuid for r in releases}) == 3 and all(r.uuid for r in releases)
    assert all(identity.of(r).legacy for r in releases)  # their plans say nothing: found by their ids as before
    assert Installation.objects.count() == 1
    assert Installation.current_id() == str(Installation.objects.get().uuid)


# -- on the sandbox, through a real worker -------------------------------------------------

sandbox = pytest.mark.sandbox


@pytest.fixture
def prepan(release_sandbox, celery_worker):
    return services.environment_import_sandbox(info=release_sandbox.info)


def decide(user, release_id: int, key: str, decision: str) -> None:
    response = api(user).post(f"/api/releases/{release_id}/gates/{key}/{decision}", {"comment": "ok"}, format="json")
    assert response.status_code == 200, response.json()


def serving(env: Environment) -> str:
    import requests

    return requests.get(env.public_url, timeout=10).headers["X-Revision"]


def next_release_id_is_one_already_used(env: Environment, user) -> int:
    """What a restored (or new) database does: the next release gets an id
    that a release of the lost history had. Returns that id."""
    used = Release.objects.create(environment=env, revision="v1", fleet_size=1, requested_by=user,
                                  plan={"environment": {"name": env.name}}, status="cancelled").pk
    Release.objects.filter(pk=used).delete()
    with connection.cursor() as cursor:
        cursor.execute("SELECT setval(pg_get_serial_sequence('releases_release', 'id'), %s, false)", [used])
    return used


def left_behind_by_a_lost_release(release_sandbox, c: aws.Cloud, number: int, *, legacy: bool) -> tuple[str, str]:
    """A stopped canary and an image, tagged and named as release `number` of
    another database tagged them: by its id alone (before uuids), or by a uuid
    of its own."""
    lost = identity.Identity("prepan", number, "" if legacy else str(uuid.uuid4()), "another-installation")
    instance = release_sandbox.launch(name=f"lost-{number}-{'legacy' if legacy else 'uuid'}")
    c.ec2.create_tags(Resources=[instance["InstanceId"]],
                      Tags=[{"Key": k, "Value": v} for k, v in {**lost.tags(), **lost.instance("canary")}.items()])
    c.stop([instance["InstanceId"]])
    wait_for_stopped = time.monotonic() + 30
    while c.instances(ids=[instance["InstanceId"]])[0].state != "stopped":
        assert time.monotonic() < wait_for_stopped, "the lost canary did not stop"
        time.sleep(0.1)
    image = c.create_image(instance["InstanceId"], lost.image_name, lost.tags())
    return instance["InstanceId"], image


@sandbox
@pytest.mark.django_db(transaction=True)
def test_a_release_with_the_id_of_a_lost_databases_release_adopts_none_of_its_leftovers(prepan, release_sandbox):
    dana, ravi = person("dana", "deployer"), person("ravi", "approver")
    c = cloud(prepan)
    number = next_release_id_is_one_already_used(prepan, dana)
    lost = [left_behind_by_a_lost_release(release_sandbox, c, number, legacy=legacy) for legacy in (True, False)]
    lost_instances, lost_images = {i for i, _ in lost}, {image for _, image in lost}
    before = serving(prepan)
    target = "v2" if before == "v1" else "v1"

    release_id = start(dana, target, clone_count=2)
    assert release_id == number
    wait_gate(release_id, "verify_directly", timeout=120)
    decide(ravi, release_id, "verify_directly", "approve")
    wait_gate(release_id, "swap_elb", timeout=120)
    decide(ravi, release_id, "swap_elb", "approve")
    release = wait_status(release_id, Release.Status.SUCCEEDED, timeout=120)

    ours = identity.of(release)
    made = {i.id for i in c.instances(tags={aws.TAG_RELEASE: ours.key}, states=("pending", "running", "stopping", "stopped"))}
    assert len(made) == 2 and not made & lost_instances
    assert set(release.instances.filter(role__in=("canary", "clone")).values_list("instance_id", flat=True)) == made
    assert release.state["image"] not in lost_images
    images = c.ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag:greenlight:release", "Values": [ours.key]}])["Images"]
    assert [(i["ImageId"], i["Name"]) for i in images] == [(release.state["image"], ours.image_name)]
    # the leftovers are as they were: stopped, out of the load balancer, their images there
    assert {i.state for i in c.instances(ids=list(lost_instances))} == {"stopped"}
    assert not lost_instances & set(c.registered())
    assert all(c.image_state(image) == "available" for image in lost_images)
    assert serving(prepan) == target
    tags = c.instances(ids=[release.instances.get(slot="canary").instance_id])[0].tags
    assert tags[aws.TAG_RELEASE_NUMBER] == str(number) and tags[aws.TAG_INSTALLATION] == Installation.current_id()
    # the environment page links this release's instances, and names the lost ones' release without a link
    from django.test import Client

    viewer = Client()
    viewer.force_login(person("vera", "viewer"))
    page = viewer.get("/environments/prepan/aws/instances/").content.decode()  # loaded by the environment page
    assert page.count(f'<a href="/releases/{number}/">release #{number}</a>') == 2
    assert page.count(f'release #{number} <span class="muted">(not in this database)</span>') == 2
    c.terminate(lost_instances)


@sandbox
@pytest.mark.django_db(transaction=True)
def test_rejecting_the_swap_removes_the_image_the_release_baked_and_its_snapshots(prepan):
    dana, ravi = person("dana", "deployer"), person("ravi", "approver")
    before = serving(prepan)
    last_baked = Environment.objects.get(pk=prepan.pk).last_baked_ami

    release_id = start(dana, "v2" if before == "v1" else "v1", clone_count=1)
    wait_gate(release_id, "verify_directly", timeout=120)
    decide(ravi, release_id, "verify_directly", "approve")
    release = wait_gate(release_id, "swap_elb", timeout=120)
    image = release.state["image"]
    c = cloud(prepan)
    snapshots = aws.Cloud.image_snapshots(c.image(image))
    assert snapshots

    decide(ravi, release_id, "swap_elb", "reject")
    release = wait_status(release_id, Release.Status.ROLLED_BACK, timeout=120)

    assert [s.key for s in release.steps.filter(kind="rollback")] == ["stop_new", "remove_image", "revoke_access"]
    named = identity.of(release).image_name
    assert c.ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [named]}])["Images"] == []
    assert c.image(image) is None
    left = c.ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "snapshot-id", "Values": snapshots}])["Snapshots"]
    assert left == []
    assert {"aws:DeregisterImage", "aws:DeleteSnapshot"} <= set(
        AuditEvent.objects.filter(release=release).values_list("action", flat=True))
    assert Environment.objects.get(pk=prepan.pk).last_baked_ami == last_baked
    assert serving(prepan) == before


def run_step(release: Release, key: str, timeout: float = 60):
    """What the engine's timer would do, in a loop."""
    context = steps.Context(release=release, step=None, cloud=engine.release_cloud(release), log=LogWriter(release.pk))
    deadline = time.monotonic() + timeout
    while True:
        release.refresh_from_db()
        context.release = release
        try:
            return steps.ACTIONS[key](context)
        except steps.Wait:
            assert time.monotonic() < deadline, f"{key} kept waiting"
            time.sleep(0.1)


@sandbox
@pytest.mark.django_db(transaction=True)
def test_remove_image_leaves_an_image_another_release_launches_from_and_is_safe_to_run_again(prepan, release_sandbox):
    dana = person("dana", "deployer")
    c = cloud(prepan)
    frozen = plan.freeze(prepan, strategy="bake", revision="v2", fleet_size=1, installation=Installation.current_id())
    frozen["environment"]["last_baked_ami"] = "ami-before"
    # cancelled from the start, so the running worker leaves it alone
    release = Release.objects.create(environment=prepan, revision="v2", fleet_size=1, plan=frozen, requested_by=dana,
                                     status=Release.Status.CANCELLED)
    named = identity.of(release)
    canary = release_sandbox.launch(name="remove-image")
    # the bake made it, and its worker died before saving its id: found by its name
    image = c.create_image(canary["InstanceId"], named.image_name, named.tags())
    Environment.objects.filter(pk=prepan.pk).update(last_baked_ami=image)  # it had succeeded, then rolled back
    later = plan.freeze(Environment.objects.get(pk=prepan.pk), strategy="deploy_from_image", revision="v2", fleet_size=1)
    user = Release.objects.create(environment=prepan, revision="v2", fleet_size=1, plan=later, requested_by=dana,
                                  status=Release.Status.ROLLED_BACK, strategy="deploy_from_image")

    assert run_step(release, "remove_image") == {"kept": image}
    assert c.image_state(image) == "available"
    assert Environment.objects.get(pk=prepan.pk).last_baked_ami == "ami-before"

    user.delete()
    result = run_step(release, "remove_image")

    assert result["removed"] == image and result["snapshots"]
    assert c.image(image) is None
    assert run_step(release, "remove_image") == result  # again: nothing left to do, nothing fails
    c.terminate([canary["InstanceId"]])
