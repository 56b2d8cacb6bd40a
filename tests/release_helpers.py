"""Helpers for tests that run whole releases through a real worker."""

from __future__ import annotations

import hashlib
import threading
import time

import requests
from django.contrib.auth.models import Group, User
from rest_framework.test import APIClient

from deployer import aws
from releases import tokens
from releases.models import ApiToken, Environment, Recipe, Release
from tests.helpers import wait_for


def person(username: str, *roles: str) -> User:
    user = User.objects.create_user(username, password="a-long-passphrase")
    user.groups.add(*(Group.objects.get_or_create(name=role)[0] for role in roles))
    return user


def offline_environment(name: str = "prepan", repository: str = "file:///nonexistent") -> Environment:
    """An environment no worker can reach (its AWS endpoint and load balancer are closed ports) with a
    one-command recipe: for pages and rows a test makes by hand."""
    recipe, _ = Recipe.objects.get_or_create(name="tiny", defaults={"definition": {
        "tasks": {"deploy:update": {"commands": ["true"]}}, "phases": {"deploy": ["deploy:update"]}}})
    return Environment.objects.create(
        name=name, region="us-west-1", aws_endpoint_url="http://127.0.0.1:1", aws_credentials="sandbox",
        load_balancer_name=name, public_url="http://127.0.0.1:2", verify_security_group_id="sg-0123456789abcdef0",
        ssh_key_file="/nonexistent", subnet_id="subnet-0123456789abcdef0", key_name=name, base_ami="ami-0123456789abcdef0",
        repository=repository, recipe=recipe,
    )


def sign_in_page(page, base: str, username: str, password: str = "a-long-passphrase"):
    """Sign `page` in through the form, as a person does; on the dashboard after."""
    page.goto(f"{base}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base}/")
    return page


def api(user: User | None = None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return client


def token_for(user: User) -> str:
    """A key for `user`, the same every call (so two clients of one person both
    work), stored as the service stores one but with no audit event."""
    key = hashlib.sha1(f"greenlight-test-{user.pk}-{user.get_username()}".encode()).hexdigest()
    ApiToken.objects.update_or_create(user=user, defaults={"prefix": key[:tokens.PREFIX], "digest": tokens.token_digest(key)})
    return key


def cloud(environment: Environment) -> aws.Cloud:
    """The environment's AWS as a release sees it, from its settings as stored
    now (a test may have changed them with update())."""
    from releases import engine, plan

    return engine.cloud_for(plan.settings_of(Environment.objects.get(pk=environment.pk)))


def start(user, revision: str, **extra) -> int:
    """Start a release of prepan through the API; its id."""
    response = api(user).post("/api/releases/", {"environment": "prepan", "revision": revision, **extra}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()["id"]


def wait_status(release_id: int, *statuses: str, timeout: float = 120) -> Release:
    def reached():
        release = Release.objects.get(pk=release_id)
        return release if release.status in statuses else None

    try:
        return wait_for(reached, timeout, 0.2, f"release {release_id} to be {' or '.join(statuses)}")
    except AssertionError:
        release = Release.objects.get(pk=release_id)
        steps = ", ".join(f"{s.key}={s.status}" for s in release.steps.all())
        raise AssertionError(f"release {release_id} is {release.status} ({release.error}); steps: {steps}") from None


def wait_gate(release_id: int, key: str, timeout: float = 120) -> Release:
    release = wait_status(release_id, Release.Status.AWAITING_APPROVAL, timeout=timeout)
    step = release.steps.get(key=key)
    assert step.status == "awaiting_approval", f"{key} is {step.status}"
    return release


def revisions_behind(url: str, n: int = 12) -> set[str]:
    return {requests.get(url, timeout=10).headers.get("X-Revision", "?") for _ in range(n)}


class LoadLoop:
    """Requests against the load balancer, until stopped or a bounded count."""

    def __init__(self, url: str, max_requests: int = 50_000, pause: float = 0.01):
        self.url, self.max_requests, self.pause = url, max_requests, pause
        self.ok = 0
        self.failures: list[str] = []
        self.revisions: set[str] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        for _ in range(self.max_requests):
            if self.stopping.is_set():
                return
            try:
                response = requests.get(self.url, timeout=10)
                if response.status_code == 200:
                    self.ok += 1
                    self.revisions.add(response.headers.get("X-Revision", "?"))
                else:
                    self.failures.append(f"{response.status_code} {response.text[:80]}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            time.sleep(self.pause)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)
