"""Whole releases on the sandbox, driven through the API, run by a real worker."""

import pytest
import requests

from deployer import aws
from releases import services
from releases.models import AuditEvent, Environment, LogLine, Release
from tests.release_helpers import LoadLoop, api, person, revisions_behind, wait_gate, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def prepan(release_sandbox, celery_worker):
    return services.environment_import_sandbox(info=release_sandbox.info)


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


@pytest.fixture
def ravi():
    return person("ravi", "approver")


def cloud(environment: Environment) -> aws.Cloud:
    return aws.Cloud(aws.Account.from_reference(environment.region, environment.aws_endpoint_url, environment.aws_credentials),
                     load_balancer_name=environment.load_balancer_name)


def start(user, revision: str, **extra) -> int:
    response = api(user).post("/api/releases/", {"environment": "prepan", "revision": revision, **extra}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()["id"]


def approve(user, release_id: int, key: str) -> None:
    response = api(user).post(f"/api/releases/{release_id}/gates/{key}/approve", {"comment": "looks good"}, format="json")
    assert response.status_code == 200, response.json()


def serving(environment: Environment) -> str:
    [revision] = revisions_behind(environment.public_url)
    return revision


def assert_nothing_left(environment: Environment, release: Release) -> None:
    c = cloud(environment)
    new = [i for i in [release.state.get("canary"), *release.state.get("clones", [])] if i]
    assert not set(new) & set(c.registered())
    assert all(i.state == "stopped" for i in c.instances(ids=new)) if new else True
    assert not c.port_open(environment.verify_security_group_id, environment.app_port, environment.verify_cidr)


def test_a_bake_release_and_then_a_release_from_its_image(prepan, dana, ravi):
    before = serving(prepan)
    target = "v2" if before == "v1" else "v1"
    old = set(cloud(prepan).registered())

    with LoadLoop(prepan.public_url) as load:
        release_id = start(dana, target)
        release = wait_gate(release_id, "verify_directly")
        card = api(ravi).get(f"/api/releases/{release_id}/").json()["gates"][0]["card"]
        direct = requests.get(card["url"], timeout=5)
        assert direct.headers["X-Revision"] == target
        assert any("200" in check for check in card["checks"])
        approve(ravi, release_id, "verify_directly")

        wait_gate(release_id, "swap_elb")
        card = api(ravi).get(f"/api/releases/{release_id}/").json()["gates"][1]["card"]
        assert {i["instance"] for i in card["old"]} == old
        assert len(card["new"]) == prepan.desired_count
        approve(ravi, release_id, "swap_elb")

        release = wait_status(release_id, Release.Status.SUCCEEDED)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50 and load.revisions == {before, target}

    assert revisions_behind(prepan.public_url) == {target}
    c = cloud(prepan)
    assert {i.state for i in c.instances(ids=list(old))} == {"stopped"}
    assert set(c.registered()).isdisjoint(old)
    assert not c.port_open(prepan.verify_security_group_id, prepan.app_port, prepan.verify_cidr)

    actions = set(AuditEvent.objects.filter(release=release).values_list("action", flat=True))
    assert {"release.create", "gate.approve", "aws:RunInstances", "aws:CreateImage", "aws:RegisterInstancesWithLoadBalancer",
            "aws:DeregisterInstancesFromLoadBalancer", "aws:StopInstances", "aws:AuthorizeSecurityGroupIngress",
            "aws:RevokeSecurityGroupIngress"} <= actions
    approvals = AuditEvent.objects.filter(release=release, action="gate.approve")
    assert [a.actor_name for a in approvals] == ["ravi", "ravi"]
    assert all(e.details["request_id"] for e in AuditEvent.objects.filter(release=release, action__startswith="aws:"))
    seqs = list(LogLine.objects.filter(release=release).values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))

    prepan.refresh_from_db()
    assert prepan.last_baked_ami == release.state["image"]

    # a day-to-day release: from that image, no provisioning
    second = start(dana, before, strategy="deploy_from_image")
    release = wait_gate(second, "verify_directly")
    assert "provision" not in [s.key for s in release.steps.all()]
    canary = cloud(prepan).instances(ids=[release.state["canary"]])[0]
    assert cloud(prepan).ec2.describe_instances(InstanceIds=[canary.id])["Reservations"][0]["Instances"][0]["ImageId"] == prepan.last_baked_ami
    approve(ravi, second, "verify_directly")
    wait_gate(second, "swap_elb")
    approve(ravi, second, "swap_elb")
    wait_status(second, Release.Status.SUCCEEDED)
    assert revisions_behind(prepan.public_url) == {before}
