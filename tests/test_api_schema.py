"""The API's OpenAPI schema: valid, served to signed-in people only, with a docs
page that holds under the Content-Security-Policy, and true to the API.

Schemathesis reads /api/schema/ from a real server (daphne, a Celery worker,
PostgreSQL) and calls every operation with generated input, as a person
holding every role and as one holding viewer only: no answer may be a server
error, or have a status, a content type or a body the schema does not describe.
"""

from __future__ import annotations

import io
import json

import pytest
import schemathesis
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from releases import services
from releases.models import Environment, Recipe, Release, Step
from tests.helpers import wait_for
from tests.release_helpers import person, token_for

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_the_schema_is_valid_openapi_with_no_warnings(tmp_path):
    out = tmp_path / "schema.yaml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out), stdout=io.StringIO())

    text = out.read_text()
    assert text.startswith("openapi: 3.0")
    for path in ("/api/environments/", "/api/environments/{name}/preflight", "/api/releases/", "/api/releases/{release_id}/", "/api/releases/{release_id}/logs/",
                 "/api/releases/{release_id}/gates/{key}/approve", "/api/releases/{release_id}/gates/{key}/reject",
                 "/api/releases/{release_id}/gates/{key}/assignee", "/api/releases/{release_id}/cancel", "/api/releases/{release_id}/retry",
                 "/api/releases/{release_id}/rollback", "/api/audit/"):
        assert f"  {path}:\n" in text, path


@pytest.mark.django_db
def test_every_api_path_is_in_the_schema(client):
    from django.urls import get_resolver

    client.force_login(person("vic", "viewer"))
    documented = set(json.loads(client.get("/api/schema/", {"format": "json"}).content)["paths"])

    def api_routes(resolver, prefix=""):
        for pattern in resolver.url_patterns:
            route = prefix + str(pattern.pattern)
            if hasattr(pattern, "url_patterns"):
                yield from api_routes(pattern, route)
            elif route.startswith("api/") and not route.startswith(("api/schema", "api/docs")):
                yield "/" + route.replace("<int:", "{").replace("<str:", "{").replace(">", "}")

    assert set(api_routes(get_resolver())) == documented


@pytest.mark.django_db
def test_only_signed_in_people_read_the_schema_and_the_docs(client):
    stranger = client.get("/api/schema/")
    docs = client.get("/api/docs/")
    client.force_login(person("nobody"))  # signed in, with no role: the schema is no secret from a colleague
    signed_in = client.get("/api/schema/", {"format": "json"})

    assert stranger.status_code == 401 and "error" in stranger.json()
    assert docs.status_code == 302 and docs["Location"].startswith("/accounts/login/")
    assert signed_in.status_code == 200
    body = json.loads(signed_in.content)
    assert body["components"]["securitySchemes"]["token"] == {**body["components"]["securitySchemes"]["token"],
                                                              "type": "apiKey", "in": "header", "name": "Authorization"}
    assert "/api/schema/" not in body["paths"]


# -- Schemathesis, against a running server -----------------------------------------


@pytest.fixture
def fuzzed(transactional_db, web_server):
    """Two people, their tokens, an environment and a release to aim at."""
    recipe = Recipe.objects.create(name="tiny", definition={"tasks": {"deploy:update": {"commands": ["true"]}},
                                                            "phases": {"deploy": ["deploy:update"]}})
    environment = Environment.objects.create(
        name="prepan", region="us-west-1", aws_endpoint_url="http://127.0.0.1:1", aws_credentials="sandbox",
        load_balancer_name="prepan", public_url="http://127.0.0.1:2", verify_security_group_id="sg-1",
        ssh_key_file="/nonexistent", subnet_id="subnet-1", key_name="prepan", base_ami="ami-1",
        repository="file:///nonexistent", recipe=recipe,
    )
    everyone = token_holder("avery", "viewer", "deployer", "approver", "maintainer")
    viewer = token_holder("vic", "viewer")
    release = services.release_create(environment=environment, revision="v1", actor=token_holder("dana", "deployer"))
    tokens = {name: f"Token {token_for(user)}" for name, user in (("everyone", everyone), ("viewer", viewer))}
    yield {"tokens": tokens, "release": release.pk, "base": web_server}
    settle(release.pk)


def token_holder(username: str, *roles: str) -> User:
    # no password: hashing one costs more than a whole operation's fuzzing
    user = User.objects.create_user(username)
    user.groups.add(*(Group.objects.get_or_create(name=role)[0] for role in roles))
    return user


def settle(release_id: int) -> None:
    """Wait until the worker is done with the release (the fuzzing cancels,
    retries and rolls it back), so that emptying the tables after the test does
    not deadlock with a step that still writes."""
    def still():
        release = Release.objects.get(pk=release_id)
        return (release.status, release.log_seq, Step.objects.filter(release_id=release_id, status="running").count())

    last = None

    def resting():
        nonlocal last
        now = still()
        done = now == last and now[0] not in ("queued", "running", "rolling_back") and not now[2]
        last = now
        return done

    wait_for(resting, 60, 0.5, f"release {release_id} to come to rest")


OPERATIONS = [
    ("GET", "/api/environments/"), ("POST", "/api/environments/{name}/preflight"), ("POST", "/api/releases/"), ("GET", "/api/releases/{release_id}/"),
    ("POST", "/api/releases/{release_id}/gates/{key}/approve"), ("POST", "/api/releases/{release_id}/gates/{key}/reject"),
    ("POST", "/api/releases/{release_id}/gates/{key}/assignee"), ("DELETE", "/api/releases/{release_id}/gates/{key}/assignee"),
    ("POST", "/api/releases/{release_id}/cancel"), ("POST", "/api/releases/{release_id}/retry"),
    ("POST", "/api/releases/{release_id}/rollback"), ("GET", "/api/releases/{release_id}/logs/"), ("GET", "/api/audit/"),
]
# Per operation and person: a bounded, reproducible run (derandomize: the same
# examples every time), positive and negative input alike.
FUZZ = settings(max_examples=20, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


def load_schema(fuzzed, token: str):
    schema = schemathesis.openapi.from_url(f"{fuzzed['base']}/api/schema/", headers={"Authorization": token})
    schema.config.update(base_url=fuzzed["base"])
    return schema


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_api_answers_as_its_schema_says(fuzzed, method, path):
    """As a person with every role, then as one with viewer only (who is refused every change)."""
    for token in fuzzed["tokens"].values():
        operation = load_schema(fuzzed, token)[path][method]
        cases = [operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)]
        if "{release_id}" in path:
            # one in three aimed at a release that exists: a random id is a 404
            cases.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters={"release_id": fuzzed["release"]}))

        @FUZZ
        @given(case=st.one_of(cases))
        def call(case):
            response = case.call(headers={"Authorization": token})
            case.validate_response(response, checks=CHECKS, headers={"Authorization": token})

        call()


@pytest.mark.django_db(transaction=True)
def test_the_docs_page_shows_every_operation_under_the_content_security_policy(web_server, browser):
    person("vic", "viewer")
    context = browser.new_context()
    page = context.new_page()
    problems, outside = [], []
    page.on("console", lambda message: message.type in ("error", "warning") and problems.append(message.text))
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("request", lambda request: request.url.startswith(web_server) or outside.append(request.url))
    page.goto(f"{web_server}/api/docs/")
    page.fill("#id_username", "vic")
    page.fill("#id_password", "a-long-passphrase")
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{web_server}/api/docs/")

    policy = page.evaluate("() => fetch(location.href).then(r => r.headers.get('content-security-policy'))")
    wait_for(lambda: page.locator(".opblock").count() >= len(OPERATIONS), 30, 0.2, "Swagger UI to list the operations")
    summaries = page.locator(".opblock-summary-path").all_inner_texts()

    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert {s.replace("\u200b", "") for s in summaries} == {p for _, p in OPERATIONS}
    assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
    assert outside == []
    context.close()
