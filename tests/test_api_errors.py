"""Errors are JSON, never 500: each test is an attack from issue 8 that
answered HTML or a 500 (or told a stranger which releases exist) before."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import requests
from django.conf import settings

from releases import services, tasks
from releases.models import Approval, AuditEvent, Environment, Recipe, Release, Step
from tests.helpers import ROOT, child_environ, free_port, wait_for
from tests.release_helpers import api, person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

HUGE = 10**23


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


@pytest.fixture
def release(environment, dana):  # noqa: F811
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):
        return services.release_create(environment=environment, revision="v2", actor=dana)


def open_gate(release: Release, key: str = "verify_directly") -> None:
    Release.objects.filter(pk=release.pk).update(status=Release.Status.AWAITING_APPROVAL)
    Step.objects.filter(release=release, key=key).update(status=Step.Status.AWAITING_APPROVAL)


def json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response.content[:300]
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"]
    return body


# -- 1. every /api/ path answers JSON ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/", "/api/nope/", "/api/releases/1/explode", "/api/releases/x/", "/api/environments/prepan/"])
def test_an_unknown_api_path_is_a_json_404(dana, path):
    json_error(api(dana).get(path), 404)


def test_a_page_that_is_not_there_is_still_a_page(client, dana):
    client.force_login(dana)

    response = client.get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_a_wrong_method_is_a_json_405(dana):
    json_error(api(dana).delete("/api/releases/"), 405)
    json_error(api(dana).get("/api/releases/1/cancel"), 405)


def test_malformed_json_is_a_json_400(dana):
    json_error(api(dana).post("/api/releases/", "{not json", content_type="application/json"), 400)


def test_json_nested_deeper_than_the_parser_goes_is_a_json_400(environment, dana):  # noqa: F811
    json_error(api(dana).post("/api/releases/", "[" * 200_000, content_type="application/json"), 400)


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_body_over_the_limit_is_json_that_names_the_limit(environment, dana, content_type):  # noqa: F811
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    body = json.dumps({"environment": "prepan", "revision": "v" * (limit + 10)})
    if content_type != "application/json":
        body = "revision=" + "v" * (limit + 10)

    response = api(dana).post("/api/releases/", body, content_type=content_type)

    error = json_error(response, 413)["error"]
    assert str(limit) in error and "DATA_UPLOAD_MAX_MEMORY_SIZE" in error
    assert not Release.objects.exists()


def test_django_s_own_error_answers_are_json_under_api_and_pages_elsewhere(rf):
    from django.core.exceptions import PermissionDenied

    from deployer import handlers

    for path, is_json in (("/api/releases/", True), ("/releases/1/", False)):
        request = rf.get(path)
        for response, status in ((handlers.bad_request(request, ValueError()), 400),
                                 (handlers.permission_denied(request, PermissionDenied()), 403),
                                 (handlers.page_not_found(request, Exception()), 404),
                                 (handlers.server_error(request), 500)):
            assert response.status_code == status
            assert response["Content-Type"].startswith("application/json" if is_json else "text/html"), (path, status)


def test_an_error_that_escapes_an_api_view_is_a_json_500_that_shows_nothing_of_it(dana, environment):  # noqa: F811
    client = api(dana)
    client.raise_request_exception = False
    with mock.patch("releases.selectors.environments", autospec=True, side_effect=RuntimeError("s3cret detail")):
        response = client.get("/api/environments/")

    json_error(response, 500)
    assert b"s3cret" not in response.content


# -- 2. every bad parameter is a 400 that names it ------------------------------------------------------


@pytest.mark.parametrize("query, field", [
    ({"since": "2026-13-45T10:00:00"}, "since"),
    ({"until": "2026-02-30T10:00:00Z"}, "until"),
    ({"since": "2026-13-45"}, "since"),
    ({"since": "yesterday"}, "since"),
    ({"since": "0001-01-01T00:00:00+01:00"}, "since"),  # before the first time there is, in UTC
    ({"offset": str(10**20)}, "offset"),
    ({"offset": "-1"}, "offset"),
    ({"offset": "1.5"}, "offset"),
    ({"offset": "ten"}, "offset"),
    ({"offset": " 1"}, "offset"),
    ({"offset": "١"}, "offset"),  # an Arabic-Indic one: int() takes it, a person did not mean it
    ({"release": str(HUGE)}, "release"),
    ({"release": "-3"}, "release"),
    ({"release": "0"}, "release"),
    ({"release": "true"}, "release"),
    ({"actor": "da\x00na"}, "actor"),
    ({"environment": "\x00"}, "environment"),
    ({"action": "release.\x00"}, "action"),
])
def test_a_bad_audit_filter_is_a_400_that_names_it(dana, query, field):
    body = json_error(api(dana).get("/api/audit/", query), 400)

    assert body["field"] == field
    assert field in body["error"]


def test_a_good_audit_filter_still_answers(dana, release):
    response = api(dana).get("/api/audit/", {"since": "2026-01-01T00:00:00", "release": str(release.pk), "offset": "0"})

    assert response.status_code == 200
    assert [e["action"] for e in response.json()["events"]] == ["release.create"]
    # a zone offset ISO 8601 allows and PostgreSQL does not (beyond 15:59), found by Schemathesis
    response = api(dana).get("/api/audit/", {"since": "0350-06-08T16:29:43.454277+17:20"})
    assert response.status_code == 200 and response.json()["events"][0]["action"] == "release.create"


@pytest.mark.parametrize("query, field", [
    ({"after": str(10**20)}, "after"),
    ({"after": "-1"}, "after"),
    ({"after": "true"}, "after"),
    ({"after": "1e3"}, "after"),
    ({"limit": str(10**20)}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "0"}, "limit"),
    ({"limit": "lots"}, "limit"),
])
def test_a_bad_log_parameter_is_a_400_that_names_it(dana, release, query, field):
    body = json_error(api(dana).get(f"/api/releases/{release.pk}/logs/", query), 400)

    assert body["field"] == field


def test_a_large_limit_is_read_as_a_page(dana, release):
    response = api(dana).get(f"/api/releases/{release.pk}/logs/", {"after": "0", "limit": "9007199254740991"})

    assert response.status_code == 200
    assert response.json() == {"lines": [], "next": 0}


@pytest.mark.parametrize("body, field", [
    ({"environment": "prepan", "revision": "v\ud800"}, "revision"),
    ({"environment": "pre\udfffpan", "revision": "v2"}, "environment"),
    ({"environment": "pre\x00pan", "revision": "v2"}, "environment"),
    ({"environment": "prepan", "revision": "v2", "strategy": "\ud800"}, "strategy"),
    ({"environment": "prepan", "revision": "v2", "\ud800": 1}, "\\ud800"),
    ({"environment": "prepan", "revision": "v2", "clone_count": HUGE}, "clone_count"),
    ({"environment": "prepan", "revision": "v2", "clone_count": True}, "clone_count"),
])
def test_a_body_the_database_cannot_hold_is_a_400_that_names_the_field(environment, dana, body, field):  # noqa: F811
    # sent as JSON text, the way a script's "\ud800" arrives (it is no character in UTF-8)
    raw = json.dumps(body)

    response = api(dana).post("/api/releases/", raw, content_type="application/json")

    assert json_error(response, 400)["field"] == field
    assert not Release.objects.exists()


@pytest.mark.parametrize("comment", ["looks good \ud800", "nul \x00 inside", "x" * 2001, 7])
def test_a_comment_the_database_cannot_hold_is_a_400_that_names_comment(release, comment):
    open_gate(release)
    ravi = person("ravi", "approver")

    for decision in ("approve", "reject"):
        response = api(ravi).post(f"/api/releases/{release.pk}/gates/verify_directly/{decision}",
                                  json.dumps({"comment": comment}), content_type="application/json")
        assert json_error(response, 400)["field"] == "comment"
    assert not Approval.objects.exists()


@pytest.mark.parametrize("path, method", [
    (f"/api/releases/{HUGE}/", "get"),
    (f"/api/releases/{HUGE}/logs/", "get"),
    (f"/api/releases/{HUGE}/cancel", "post"),
    (f"/api/releases/{HUGE}/gates/verify_directly/approve", "post"),
    (f"/api/releases/{2**63}/", "get"),
])
def test_a_huge_release_id_in_the_path_is_a_json_404(dana, path, method):
    json_error(getattr(api(dana), method)(path), 404)


def test_a_huge_release_id_on_the_pages_is_a_404(client, dana):
    client.force_login(dana)

    for path in (f"/releases/{HUGE}/", f"/releases/{HUGE}/panel/", f"/releases/{HUGE}/log.txt"):
        assert client.get(path).status_code == 404, path


# -- 3. a lost race answers 409 --------------------------------------------------------------------


def test_a_database_that_stays_locked_is_a_409_not_a_500(dana, release):
    from django.db import OperationalError

    open_gate(release)
    locked = OperationalError("database is locked")
    with mock.patch("releases.services.Approval.objects.create", autospec=True, side_effect=locked):
        response = api(person("ravi", "approver")).post(f"/api/releases/{release.pk}/gates/verify_directly/approve")

    assert "someone else changed this" in json_error(response, 409)["error"]
    assert Step.objects.get(release=release, key="verify_directly").status == "awaiting_approval"


def test_the_default_sqlite_database_waits_for_its_lock_and_begins_writes_at_once():
    env = {**child_environ(), "DATABASE_URL": "sqlite:////tmp/not-opened.sqlite3"}
    code = "import json; from django.conf import settings; print(json.dumps(settings.DATABASES['default']['OPTIONS']))"
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout

    options = json.loads(out.strip().splitlines()[-1])
    assert options["transaction_mode"] == "IMMEDIATE"
    assert options["timeout"] >= 5
    assert "journal_mode=WAL" in options["init_command"]


RACERS = 20


def seed(suffix: str) -> dict:
    """Three environments: one to start a release on, one whose release waits at
    its first gate (to approve), one at a gate too (to cancel); and tokens."""
    from tests.release_helpers import token_for

    recipe = Recipe.objects.create(name=f"tiny-{suffix}", definition={
        "tasks": {"deploy:update": {"commands": ["true"]}}, "phases": {"deploy": ["deploy:update"]}})
    names = {what: f"race-{what}-{suffix}" for what in ("create", "approve", "cancel")}
    for name in names.values():
        Environment.objects.create(
            name=name, region="us-west-1", aws_endpoint_url="http://127.0.0.1:1", aws_credentials="sandbox",
            load_balancer_name=name, public_url="http://127.0.0.1:2", verify_security_group_id="sg-1",
            ssh_key_file="/nonexistent", subnet_id="subnet-1", key_name="k", base_ami="ami-1",
            repository="file:///nonexistent", recipe=recipe)
    dana, ravi = person(f"dana-{suffix}", "deployer"), person(f"ravi-{suffix}", "approver")
    releases = {}
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):  # nothing is to run them
        for what in ("approve", "cancel"):
            release = services.release_create(environment=Environment.objects.get(name=names[what]), revision="v2", actor=dana)
            open_gate(release)
            releases[what] = release.pk
    return {"names": names, "releases": releases,
            "dana": token_for(dana), "ravi": token_for(ravi)}


def _server_env(tmp_path, database_url: str) -> dict:
    # No task leaves the server (an in-memory broker nobody reads): the releases stay where the test put them.
    return {**child_environ(), "DATABASE_URL": database_url, "GREENLIGHT_VAR_DIR": str(tmp_path),
            "SECRET_KEY": settings.SECRET_KEY, "CELERY_BROKER_URL": "memory://"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def racing_server(request, django_db_setup, tmp_path_factory):
    """daphne, as `make demo` runs it, on a SQLite file of its own or on the test PostgreSQL."""
    tmp_path = tmp_path_factory.mktemp(f"race-{request.param}")
    if request.param == "sqlite":
        env = _server_env(tmp_path, f"sqlite:///{tmp_path / 'greenlight.sqlite3'}")
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    else:
        db = settings.DATABASES["default"]
        env = _server_env(tmp_path, f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}")
    port = free_port()
    log = tmp_path / "web.log"
    process = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "deployer.asgi:application"],
                               cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def up():
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            assert process.poll() is None, log.read_text()[-2000:]

    try:
        try:
            wait_for(up, 60, 0.2, "the web server")
        except AssertionError:
            raise AssertionError(requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).text + log.read_text()[-2000:]) from None
        yield {"kind": request.param, "url": f"http://127.0.0.1:{port}", "env": env, "log": log}
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def race(racing_server, request):
    """The seeded rows, in the server's database."""
    suffix = hashlib.sha256(request.node.originalname.encode()).hexdigest()[:8]  # the SQLite file outlives a test
    if racing_server["kind"] == "postgresql":
        return seed(suffix)  # committed: this test's database access is transactional
    code = f"import json; from tests.test_api_errors import seed; print(json.dumps(seed({suffix!r})))"
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=racing_server["env"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def at_once(url: str, token: str, path: str, body: dict | None = None) -> list[tuple[int, dict]]:
    """RACERS requests, each on its own connection, sent together; bounded, loopback only."""
    def one(_):
        response = requests.post(url + path, json=body, headers={"Authorization": f"Token {token}"}, timeout=60)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, {"not json": response.text[:200]}

    with ThreadPoolExecutor(max_workers=RACERS) as pool:
        return list(pool.map(one, range(RACERS)))


def read(server, token: str, path: str, **query) -> dict:
    return requests.get(server["url"] + path, params=query, headers={"Authorization": f"Token {token}"}, timeout=30).json()


race_db = pytest.mark.django_db(transaction=True)


@race_db
def test_twenty_approvals_of_one_gate_at_once_store_one_and_answer_200_or_409(racing_server, race):
    release_id = race["releases"]["approve"]

    answers = at_once(racing_server["url"], race["ravi"], f"/api/releases/{release_id}/gates/verify_directly/approve", {"comment": "ok"})

    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 409}, answers
    assert statuses[200] == 1, statuses
    gate = read(racing_server, race["ravi"], f"/api/releases/{release_id}/")["gates"][0]
    assert [d["decision"] for d in gate["decisions"]] == ["approve"]


@race_db
def test_twenty_creates_for_one_environment_at_once_start_one_release(racing_server, race):
    name = race["names"]["create"]

    answers = at_once(racing_server["url"], race["dana"], "/api/releases/", {"environment": name, "revision": "v2"})

    statuses = Counter(status for status, _ in answers)
    assert statuses == {201: 1, 409: RACERS - 1}, answers
    started = next(body["id"] for status, body in answers if status == 201)
    assert all(body["release"] == started for status, body in answers if status == 409 and "release" in body)
    events = read(racing_server, race["dana"], "/api/audit/", action="release.create", environment=name)["events"]
    assert [e["release"] for e in events] == [started]


@race_db
def test_twenty_cancels_at_once_cancel_once_and_answer_200_or_409(racing_server, race):
    release_id = race["releases"]["cancel"]

    answers = at_once(racing_server["url"], race["dana"], f"/api/releases/{release_id}/cancel")

    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 409}, answers
    assert statuses[200] == 1, statuses
    body = read(racing_server, race["dana"], f"/api/releases/{release_id}/")
    assert body["cancel_requested"] and body["status"] == "rolling_back"
    assert [h["action"] for h in body["history"] if h["step"] is None].count("cancel") == 1
    assert len(read(racing_server, race["dana"], "/api/audit/", action="release.cancel", release=release_id)["events"]) == 1


@race_db
def test_a_body_over_the_limit_is_json_from_daphne_too(racing_server, race):
    body = b'{"comment": "' + b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + b'"}'

    response = requests.post(f"{racing_server['url']}/api/releases/{race['releases']['approve']}/gates/verify_directly/approve",
                             data=body, headers={"Authorization": f"Token {race['ravi']}", "Content-Type": "application/json"},
                             timeout=60)

    assert response.status_code == 413
    assert "DATA_UPLOAD_MAX_MEMORY_SIZE" in response.json()["error"]
    assert read(racing_server, race["ravi"], f"/api/releases/{race['releases']['approve']}/")["gates"][0]["decisions"] == []


# -- 5. a long comment on the page is refused, keeping what was typed ------------------------------


@pytest.mark.parametrize("decision", ["reject", "approve"])
def test_a_comment_too_long_for_the_page_decides_nothing_and_keeps_the_text(client, release, decision):
    open_gate(release)
    client.force_login(person("ravi", "approver"))
    comment = "because" + " the canary answered slowly" * 100
    assert len(comment) == 2707

    response = client.post(f"/releases/{release.pk}/gates/verify_directly/{decision}/", {"comment": comment})

    assert response.status_code == 400
    page = response.content.decode()
    assert "at most 2000 characters and this one has 2707" in page
    assert f'value="{comment}"' in page
    assert Step.objects.get(release=release, key="verify_directly").status == "awaiting_approval"
    assert not Approval.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="gate.").exists()


def test_a_comment_that_fits_is_kept_with_the_decision(client, release):
    open_gate(release)
    client.force_login(person("ravi", "approver"))

    response = client.post(f"/releases/{release.pk}/gates/verify_directly/reject/", {"comment": "x" * 2000})

    assert response.status_code == 302
    assert Approval.objects.get().comment == "x" * 2000


# -- 6. no role, no knowing which releases exist ---------------------------------------------------


def _pages(release_id: int) -> list[tuple[str, str]]:
    return [("get", f"/releases/{release_id}/"), ("get", f"/releases/{release_id}/panel/"), ("get", f"/releases/{release_id}/log.txt"),
            ("post", f"/releases/{release_id}/cancel/"), ("post", f"/releases/{release_id}/retry/"),
            ("post", f"/releases/{release_id}/rollback/"), ("post", f"/releases/{release_id}/gates/verify_directly/approve/"),
            ("post", f"/releases/{release_id}/gates/verify_directly/reject/")]


def _api_paths(release_id: int) -> list[tuple[str, str]]:
    return [("get", f"/api/releases/{release_id}/"), ("get", f"/api/releases/{release_id}/logs/"),
            ("post", f"/api/releases/{release_id}/cancel"), ("post", f"/api/releases/{release_id}/retry"),
            ("post", f"/api/releases/{release_id}/rollback"), ("post", f"/api/releases/{release_id}/gates/verify_directly/approve"),
            ("post", f"/api/releases/{release_id}/gates/verify_directly/reject")]


def test_someone_with_no_role_gets_the_same_403_whether_or_not_a_release_exists(client, release):
    nobody = person("nobody")
    client.force_login(nobody)
    missing = release.pk + 1000

    for (method, there), (_, not_there) in zip(_pages(release.pk), _pages(missing)):
        answers = [getattr(client, method)(path) for path in (there, not_there)]
        assert [a.status_code for a in answers] == [403, 403], there
    for (method, there), (_, not_there) in zip(_api_paths(release.pk), _api_paths(missing)):
        answers = [getattr(api(nobody), method)(path) for path in (there, not_there)]
        assert [a.status_code for a in answers] == [403, 403], there
        assert answers[0].json() == answers[1].json()
    assert Release.objects.get(pk=release.pk).cancel_requested is False


def test_someone_with_no_role_cannot_tell_which_environments_exist(environment):  # noqa: F811
    nobody = person("nobody")

    answers = [create_as(nobody, name) for name in ("prepan", "nowhere")]

    assert [a.status_code for a in answers] == [403, 403]
    assert answers[0].json() == answers[1].json()


def create_as(user, name: str):
    return api(user).post("/api/releases/", {"environment": name, "revision": "v2"}, format="json")
