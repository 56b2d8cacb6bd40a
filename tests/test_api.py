"""The API's answers to bad input, conflicts and people without the right role."""

import pytest

from releases import services
from releases.models import Environment, Recipe, Release, Step
from tests.release_helpers import api, person

pytestmark = pytest.mark.django_db


@pytest.fixture
def environment():
    recipe = Recipe.objects.create(name="tiny", definition={"tasks": {"deploy:update": {"commands": ["true"]}}, "phases": {"deploy": ["deploy:update"]}})
    return Environment.objects.create(
        name="prepan", region="us-west-1", aws_endpoint_url="http://127.0.0.1:1", aws_credentials="sandbox",
        load_balancer_name="prepan", public_url="http://127.0.0.1:2", verify_security_group_id="sg-0123456789abcdef0",
        ssh_key_file="/nonexistent", subnet_id="subnet-0123456789abcdef0", key_name="prepan", base_ami="ami-0123456789abcdef0",
        repository="file:///nonexistent", recipe=recipe,
    )


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


def create(user, body, **kwargs):
    return api(user).post("/api/releases/", body, format="json", **kwargs)


def test_a_deployer_starts_a_release_with_a_frozen_plan(environment, dana):
    response = create(dana, {"environment": "prepan", "revision": "v2"})

    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued"
    assert [s["key"] for s in body["steps"]][:3] == ["launch", "provision", "deploy"]
    assert [g["key"] for g in body["gates"]] == ["verify_directly", "swap_elb"]
    Environment.objects.filter(pk=environment.pk).update(app_port=9999)
    assert Release.objects.get(pk=body["id"]).plan["environment"]["app_port"] == 80


def test_a_second_release_of_the_same_environment_is_a_conflict(environment, dana):
    first = create(dana, {"environment": "prepan", "revision": "v2"}).json()

    response = create(dana, {"environment": "prepan", "revision": "v1"})

    assert response.status_code == 409
    assert response.json() == {"error": "prepan already has an active release", "release": first["id"]}


def test_the_database_itself_refuses_a_second_active_release(environment, dana):
    from django.db import IntegrityError

    Release.objects.create(environment=environment, revision="a", fleet_size=1, plan={}, requested_by=dana)
    with pytest.raises(IntegrityError):
        Release.objects.create(environment=environment, revision="b", fleet_size=1, plan={}, requested_by=dana, status="failed")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"environment": "nowhere", "revision": "v2"}, "there is no environment 'nowhere'"),
        ({"revision": "v2"}, "environment is required"),
        ({"environment": "prepan"}, "revision is required"),
        ({"environment": "prepan", "revision": "v2; touch pwned"}, "is not a valid branch, tag or commit name"),
        ({"environment": "prepan", "revision": "--upload-pack=evil"}, "is not a valid branch, tag or commit name"),
        ({"environment": "prepan", "revision": "v2", "strategy": "yolo"}, "unknown strategy 'yolo'"),
        ({"environment": "prepan", "revision": "v2", "strategy": "deploy_from_image"}, "has no baked image yet"),
        ({"environment": "prepan", "revision": "v2", "clone_count": "three"}, "clone_count"),
        ({"environment": "prepan", "revision": "v2", "clone_count": 0}, "clone_count"),
        ({"environment": "prepan", "revision": "v2", "colour": "blue"}, "unknown fields: colour"),
        (["prepan", "v2"], "the body must be a JSON object"),
    ],
)
def test_bad_input_is_a_400_that_says_what_is_wrong(environment, dana, body, message):
    response = create(dana, body)

    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not Release.objects.exists()


def test_malformed_json_is_a_400(environment, dana):
    response = api(dana).post("/api/releases/", "{not json", content_type="application/json")

    assert response.status_code == 400
    assert "error" in response.json()


def open_gate(release: Release, key: str = "verify_directly") -> None:
    Release.objects.filter(pk=release.pk).update(status=Release.Status.AWAITING_APPROVAL)
    Step.objects.filter(release=release, key=key).update(status=Step.Status.AWAITING_APPROVAL)


def test_a_viewer_cannot_start_a_release(environment):
    response = create(person("vic", "viewer"), {"environment": "prepan", "revision": "v2"})

    assert response.status_code == 403
    assert response.json() == {"error": "starting a release needs the deployer role"}


def test_a_deployer_cannot_decide_a_gate(environment, dana):
    release = services.release_create(environment=environment, revision="v2", actor=dana)
    open_gate(release)

    response = api(person("dev", "deployer")).post(f"/api/releases/{release.pk}/gates/verify_directly/approve")

    assert response.status_code == 403
    assert "approver role" in response.json()["error"]


def test_four_eyes_the_requester_cannot_approve_their_own_release(environment, dana):
    release = services.release_create(environment=environment, revision="v2", actor=dana)
    open_gate(release)

    response = api(dana).post(f"/api/releases/{release.pk}/gates/verify_directly/approve")

    assert response.status_code == 403
    assert response.json()["error"] == "four eyes: dana started this release, so someone else decides its gates"
    assert Step.objects.get(release=release, key="verify_directly").status == "awaiting_approval"


def test_a_gate_that_is_not_open_is_a_conflict_and_a_double_click_changes_nothing(environment, dana):
    release = services.release_create(environment=environment, revision="v2", actor=dana)
    ravi = person("ravi", "approver")

    assert api(ravi).post(f"/api/releases/{release.pk}/gates/swap_elb/approve").status_code == 409
    open_gate(release)
    assert api(ravi).post(f"/api/releases/{release.pk}/gates/verify_directly/approve").status_code == 200
    again = api(ravi).post(f"/api/releases/{release.pk}/gates/verify_directly/approve")

    assert again.status_code == 409
    assert again.json()["error"] == "the gate verify_directly is not open (it is succeeded)"
    assert release.steps.get(key="verify_directly").approvals.count() == 1


def test_a_release_shows_what_may_be_asked_of_it_and_its_history_and_refuses_the_rest(environment, dana):
    release = services.release_create(environment=environment, revision="v2", actor=dana)
    ravi = person("ravi", "approver")
    open_gate(release)
    api(ravi).post(f"/api/releases/{release.pk}/gates/verify_directly/approve", {"comment": "fine"}, format="json")

    body = api(dana).get(f"/api/releases/{release.pk}/").json()
    retry = api(dana).post(f"/api/releases/{release.pk}/retry")

    assert body["status"] == "running" and body["actions"] == ["cancel"]
    assert [(h["step"], h["action"], h["from"], h["to"], h["by"]) for h in body["history"]][-2:] == [
        ("verify_directly", "approve", "awaiting_approval", "succeeded", "ravi"), (None, "approve", "awaiting_approval", "running", "ravi")]
    assert body["history"][0] == {**body["history"][0], "action": "create", "to": "queued", "by": "dana"}
    assert retry.status_code == 409 and "only a release with a failed step can be retried" in retry.json()["error"]


def test_unknown_things_are_404(environment, dana):
    release = services.release_create(environment=environment, revision="v2", actor=dana)

    assert api(dana).get("/api/releases/999999/").status_code == 404
    assert api(dana).post(f"/api/releases/{release.pk}/gates/deploy/approve").json()["error"].startswith("'deploy' is not a gate")


def test_strangers_get_a_json_401(environment):
    response = api().get("/api/environments/")

    assert response.status_code == 401
    assert "error" in response.json()


def test_a_person_with_no_role_reads_nothing(environment):
    assert api(person("nobody")).get("/api/environments/").status_code == 403


def test_the_audit_lists_actions_with_filters(environment, dana):
    services.release_create(environment=environment, revision="v2", actor=dana, source_ip="10.0.0.7")

    events = api(dana).get("/api/audit/", {"actor": "dana", "action": "release."}).json()["events"]

    assert [(e["action"], e["actor"], e["source_ip"], e["environment"]) for e in events] == [("release.create", "dana", "10.0.0.7", "prepan")]
    assert api(dana).get("/api/audit/", {"since": "yesterday"}).status_code == 400


def test_logs_page_after_a_sequence_number(environment, dana):
    from releases.logs import LogWriter

    release = services.release_create(environment=environment, revision="v2", actor=dana)
    writer = LogWriter(release.pk)
    for n in range(5):
        writer.write("deploy", f"line {n}", host="app-3", stream="stdout")
    writer.flush()

    page = api(dana).get(f"/api/releases/{release.pk}/logs/", {"after": 2}).json()

    assert [line["seq"] for line in page["lines"]] == [3, 4, 5]
    assert page["lines"][0] == {**page["lines"][0], "step": "deploy", "host": "app-3", "stream": "stdout", "text": "line 2"}
    assert page["next"] == 5


def test_an_environment_change_in_the_admin_is_audited_with_what_changed(environment, admin_client):
    from django.forms.models import model_to_dict

    from releases.models import AuditEvent

    data = {k: v for k, v in model_to_dict(environment).items() if v is not None}
    data.update(desired_count=3, security_group_ids="[]")
    response = admin_client.post(f"/admin/releases/environment/{environment.pk}/change/", data)

    assert response.status_code == 302, response.content.decode()[:2000]
    event = AuditEvent.objects.get(action="environment.update")
    assert (event.actor_name, event.environment) == ("admin", environment)
    assert "desired_count" in event.details["changed"]


def test_a_recipe_with_an_undeclared_parameter_is_refused_with_the_reason():
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="deploy:update: undeclared parameter brnach"):
        Recipe.objects.create(name="bad", definition={"tasks": {"deploy:update": {"commands": ["git checkout {brnach}"]}}})
