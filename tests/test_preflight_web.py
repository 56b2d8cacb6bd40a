"""Preflight from the web process: a worker runs it. The API's endpoint, the
environment page's Check button, and the release wizard and the API's
release create refusing a release whose preflight failed, saying why."""

import pytest

from releases import services
from releases.models import AuditEvent, Environment, Release
from tests.release_helpers import api, person

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def prepan(release_sandbox, celery_worker, settings):
    settings.PREFLIGHT_BEFORE_RELEASE = True
    settings.PREFLIGHT_TIMEOUT = 120  # a loaded machine: the worker may be busy a while
    return services.environment_import_sandbox(info=release_sandbox.info)


@pytest.fixture
def dana():
    return person("dana", "deployer", "viewer")


def without_key_file(environment: Environment, tmp_path) -> str:
    missing = str(tmp_path / "gone.pem")
    Environment.objects.filter(pk=environment.pk).update(ssh_key_file=missing)
    return missing


def test_the_api_runs_preflight_on_a_worker_for_a_deployer_only(prepan, dana):
    answer = api(dana).post("/api/environments/prepan/preflight", {"revision": "v2"}, format="json")
    assert answer.status_code == 200, answer.json()
    body = answer.json()
    assert body["environment"] == "prepan" and body["ok"] is True
    named = {c["name"]: c for c in body["checks"]}
    assert named["credentials"]["status"] == "ok" and named["key file"]["status"] == "ok"
    assert named["repository"]["message"].startswith("v2 is ")
    assert set(body["checks"][0]) == {"name", "status", "message", "fix"}
    event = AuditEvent.objects.get(action="environment.preflight")
    assert event.actor_name == "dana" and event.details["failed"] == []

    viewer = api(person("vic", "viewer")).post("/api/environments/prepan/preflight", {}, format="json")
    assert viewer.status_code == 403 and "deployer role" in viewer.json()["error"]
    unknown = api(dana).post("/api/environments/nope/preflight", {}, format="json")
    assert unknown.status_code == 404 and unknown.json()["error"] == "there is no environment 'nope'"
    bad = api(dana).post("/api/environments/prepan/preflight", {"strategy": "yolo"}, format="json")
    assert bad.status_code == 400 and bad.json()["field"] == "strategy"


def test_the_api_refuses_to_start_a_release_whose_preflight_failed(prepan, dana, tmp_path):
    missing = without_key_file(prepan, tmp_path)
    answer = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v2"}, format="json")
    assert answer.status_code == 409, answer.json()
    body = answer.json()
    assert body["error"].startswith("preflight failed, so the release was not started: key file: cannot read the SSH "
                                    f"key file {missing}: No such file or directory")
    failed = [c["name"] for c in body["checks"] if c["status"] == "failed"]
    assert failed == ["key file", "ssh"]
    assert not Release.objects.exists()


def test_the_check_button_shows_every_check_on_the_environment_page(prepan, dana, client, tmp_path):
    client.force_login(dana)
    page = client.post("/environments/prepan/preflight/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "Preflight: every check passed" in text and "may RunInstances" in text and "✔ ok" in text
    without_key_file(prepan, tmp_path)
    text = client.post("/environments/prepan/preflight/").content.decode()
    assert "Preflight: 2 of " in text and "checks failed" in text and "cannot read the SSH key file" in text
    client.force_login(person("vic", "viewer"))
    assert client.post("/environments/prepan/preflight/").status_code == 403
    assert client.get("/environments/prepan/preflight/").status_code in (403, 405)


def test_the_wizard_shows_the_preflight_at_review_and_refuses_to_start_when_it_failed(prepan, dana, client, tmp_path):
    without_key_file(prepan, tmp_path)
    client.force_login(dana)
    client.get("/releases/new/", {"environment": "prepan"})
    client.post("/releases/new/", {"step": "revision", "revision": "v2"})
    client.post("/releases/new/", {"step": "options", "strategy": "bake", "clone_count": 2})
    review = client.get("/releases/new/", {"step": "review"}).content.decode()
    assert "checks failed; the release cannot start until they pass" in review
    assert "cannot read the SSH key file" in review and "Start release" not in review and "Check again" in review

    started = client.post("/releases/new/", {"step": "review", "next": "1"}, follow=True)
    assert "preflight failed, so the release was not started: key file: cannot read the SSH key file" in \
        started.content.decode()
    assert not Release.objects.exists()

    Environment.objects.filter(pk=prepan.pk).update(ssh_key_file=prepan.ssh_key_file)  # mended
    again = client.post("/releases/new/", {"step": "review", "recheck": "1"}, follow=True).content.decode()
    assert "Preflight: every check passed" in again and "Start release" in again
