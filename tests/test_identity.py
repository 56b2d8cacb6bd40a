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
from tests.release_helpers import api, person, wait_gate, wait_status
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
