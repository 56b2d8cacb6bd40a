"""The web's defences, each tried as the attack it stops: guessing passwords,
sniffing cookies over http, injected script, a cached page, a leaked token."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from axes.models import AccessAttempt

from releases import services, tokens
from releases.models import ApiToken, AuditEvent
from tests.helpers import ROOT, child_environ
from tests.release_helpers import api, person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-passphrase"


def guess(client, url: str, username: str, password: str, **extra):
    return client.post(url, {"username": username, "password": password, "next": "/"}, **extra)


# -- sign-in throttling -----------------------------------------------------------------


@pytest.mark.parametrize("url", ["/accounts/login/", "/admin/login/"])
def test_thirty_wrong_passwords_lock_the_account_out_even_for_the_right_one(client, url):
    user = person("dana", "viewer")
    user.is_staff = True
    user.save()

    for attempt in range(30):
        guess(client, url, "dana", f"guess-{attempt}")
    response = guess(client, url, "dana", PASSWORD)

    assert response.status_code == 429
    assert b"Too many failed sign-ins" in response.content
    assert "_auth_user_id" not in client.session
    assert client.get("/").status_code == 302


def test_the_lockout_holds_through_the_asgi_handler_daphne_runs():
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    person("dana", "viewer")
    client = AsyncClient()
    post = async_to_sync(client.post)
    for attempt in range(10):
        post("/accounts/login/", {"username": "dana", "password": f"guess-{attempt}"})

    response = post("/accounts/login/", {"username": "dana", "password": PASSWORD})

    assert response.status_code == 429
    assert b"Too many failed sign-ins" in response.content


def test_a_lockout_is_audited_once_with_the_address(client):
    person("dana", "viewer")

    for attempt in range(30):
        guess(client, "/accounts/login/", "dana", f"guess-{attempt}")

    events = AuditEvent.objects.filter(action="login.lockout")
    assert [(e.target, e.source_ip, e.actor_name) for e in events] == [("dana", "127.0.0.1", "greenlight")]


def test_a_forged_forwarded_for_header_does_not_escape_the_lockout(client):
    person("dana", "viewer")
    for attempt in range(10):
        guess(client, "/accounts/login/", "dana", f"guess-{attempt}")

    response = guess(client, "/accounts/login/", "dana", PASSWORD, HTTP_X_FORWARDED_FOR="203.0.113.9")

    assert response.status_code == 429


def test_the_person_still_signs_in_from_their_own_address_while_a_stranger_is_locked_out(client):
    person("dana", "viewer")
    for attempt in range(10):
        guess(client, "/accounts/login/", "dana", f"guess-{attempt}")

    response = guess(client, "/accounts/login/", "dana", PASSWORD, REMOTE_ADDR="10.0.0.7")

    assert response.status_code == 302
    assert client.session["_auth_user_id"] == str(User.objects.get(username="dana").pk)


def test_a_script_that_is_locked_out_gets_json(client):
    person("dana", "viewer")
    for attempt in range(10):
        guess(client, "/accounts/login/", "dana", f"guess-{attempt}")

    response = guess(client, "/accounts/login/", "dana", PASSWORD, HTTP_ACCEPT="application/json")

    assert response.status_code == 429
    assert response.json()["locked_out"] is True
    assert int(response["Retry-After"]) > 0


def test_guessing_the_password_on_the_profile_page_locks_out_token_creation(client):
    client.force_login(person("dana", "viewer"))

    for attempt in range(10):
        client.post("/accounts/profile/", {"action": "rotate", "password": f"guess-{attempt}"})
    response = client.post("/accounts/profile/", {"action": "rotate", "password": PASSWORD})

    assert response.status_code == 429
    assert not ApiToken.objects.filter(user__username="dana").exists()


def test_a_wrong_password_on_the_profile_page_is_a_failed_sign_in_and_audited(client, settings):
    client.force_login(person("dana", "viewer"))
    limit = settings.AXES_FAILURE_LIMIT

    first = client.post("/accounts/profile/", {"action": "rotate", "password": "guess-0"})
    attempt = AccessAttempt.objects.get(username="dana")
    for n in range(1, limit + 3):
        client.post("/accounts/profile/", {"action": "rotate", "password": f"guess-{n}"})

    assert first.status_code == 200 and b"That is not your password." in first.content
    # axes counted it as a sign-in failure, on this page, without keeping the password
    assert (attempt.failures_since_start, attempt.path_info, attempt.ip_address) == (1, "/accounts/profile/", "127.0.0.1")
    assert "guess-0" not in attempt.post_data
    # each refusal up to the lockout, then the lockout, in the audit trail; none after
    refused = AuditEvent.objects.filter(action="token.password_refused").order_by("seq")
    assert [(e.actor_name, e.target, e.source_ip, e.details["failures"]) for e in refused] == [
        ("dana", "dana", "127.0.0.1", n) for n in range(1, limit + 1)]
    lockout = AuditEvent.objects.get(action="login.lockout")
    assert (lockout.target, lockout.details["path"]) == ("dana", "/accounts/profile/")
    assert "guess-" not in json.dumps([e.details for e in AuditEvent.objects.all()])


# -- HTTPS ------------------------------------------------------------------------------


def production_env() -> dict:
    lines = (ROOT / "docs" / "production.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_check_deploy_passes_with_the_production_example(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG")}
    env = {**clean, **production_env(), "GREENLIGHT_VAR_DIR": str(tmp_path),
           "SECRET_KEY": "x7Gq2-not-the-example-9pLmZ4tR8vW1yB6nC3kD5fH0jK2sQ7uE9iO4aT6gX"}

    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=env, capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_without_the_https_settings(tmp_path):
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG")}
    env = {**clean, "GREENLIGHT_VAR_DIR": str(tmp_path), "SECRET_KEY": "x7Gq2-not-the-example-9pLmZ4tR8vW1yB6nC3kD5fH0jK2sQ7uE9iO4aT6gX"}

    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=ROOT, env=env, capture_output=True, text=True)

    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr + result.stdout


PRINT_HTTPS = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps({name: getattr(settings, name) for name in (
    "SECURE_PROXY_SSL_HEADER", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
    "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD",
    "AXES_FAILURE_LIMIT", "AXES_COOLOFF_TIME", "AXES_IPWARE_PROXY_COUNT")}))
"""


def https_settings(env: dict, tmp_path) -> dict:
    output = subprocess.run([sys.executable, "-c", PRINT_HTTPS], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={**child_environ(), "DJANGO_SETTINGS_MODULE": "deployer.settings",
                                 "GREENLIGHT_VAR_DIR": str(tmp_path), **env}).stdout
    return json.loads(output)


def test_the_https_settings_come_from_the_environment_and_default_to_plain_http(tmp_path):
    production = https_settings(production_env(), tmp_path)
    laptop = https_settings({}, tmp_path)

    assert production == {
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"], "SECURE_SSL_REDIRECT": True,
        "SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True, "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True, "SECURE_HSTS_PRELOAD": True,
        "AXES_FAILURE_LIMIT": 5, "AXES_COOLOFF_TIME": 0.25, "AXES_IPWARE_PROXY_COUNT": 1,
    }
    assert laptop["SECURE_PROXY_SSL_HEADER"] is None
    assert not any(laptop[name] for name in ("SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE",
                                             "SECURE_HSTS_SECONDS"))


@pytest.fixture
def behind_tls(settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SESSION_COOKIE_SECURE = True
    settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    settings.SECURE_HSTS_PRELOAD = True
    return settings


def test_behind_tls_the_cookies_are_secure_and_hsts_is_sent(client, behind_tls):
    person("dana", "viewer")

    page = client.get("/accounts/login/", HTTP_X_FORWARDED_PROTO="https")
    signed_in = guess(client, "/accounts/login/", "dana", PASSWORD, HTTP_X_FORWARDED_PROTO="https")

    assert page["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    assert page.cookies["csrftoken"]["secure"] is True
    assert signed_in.status_code == 302
    assert signed_in.cookies["sessionid"]["secure"] is True


def test_behind_tls_plain_http_is_redirected_but_the_health_check_is_not(client, behind_tls):
    page = client.get("/accounts/login/")
    health = client.get("/healthz")

    assert page.status_code == 301 and page["Location"] == "https://testserver/accounts/login/"
    assert health.status_code == 200


# -- Content-Security-Policy and no-store ------------------------------------------------


@pytest.fixture
def release(environment):  # noqa: F811
    return services.release_create(environment=environment, revision="v2", actor=person("dana", "deployer", "approver"))


SIGNED_IN_PAGES = ["/", "/environments/", "/environments/prepan/", "/environments/prepan/edit/", "/releases/new/",
                   "/audit/", "/accounts/profile/", "/admin/", "/admin/releases/apitoken/", "/api/releases/{release}/"]


@pytest.mark.parametrize("url", SIGNED_IN_PAGES + ["/releases/{release}/", "/releases/{release}/panel/"])
def test_every_signed_in_page_carries_the_policy_and_is_never_stored(client, release, url):
    admin = person("root", "viewer", "deployer", "approver")
    admin.is_staff = admin.is_superuser = True
    admin.save()
    client.force_login(admin)

    response = client.get(url.format(release=release.pk))

    assert response.status_code == 200, url
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy and "'unsafe-inline'" not in policy
    assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
    assert "no-store" in response["Cache-Control"]


def test_an_api_answer_to_a_token_is_never_stored(release):
    response = api(User.objects.get(username="dana")).get(f"/api/releases/{release.pk}/")

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]


TEMPLATES_WITH_CODE = re.compile(
    r"<script(?![^>]*\bsrc=)[^>]*>"   # a script element with a body
    r"|\son[a-z]+\s*="                # an event handler attribute
    r"|javascript:"                   # a script URL
    r"|\sstyle\s*=",                  # an inline style (style-src 'self' refuses it)
    re.IGNORECASE,
)


def test_no_template_carries_inline_script_handlers_or_styles():
    found = []
    for path in sorted((ROOT / "templates").rglob("*.html")) + sorted((ROOT / "releases").rglob("templates/**/*.html")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if TEMPLATES_WITH_CODE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")

    assert found == []


def test_htmx_is_told_not_to_add_its_own_inline_style(client):
    response = client.get("/accounts/login/")

    assert b'<meta name="htmx-config" content=\'{"includeIndicatorStyles": false}\'>' in response.content


# -- tokens -----------------------------------------------------------------------------


def new_key(response) -> str:
    """The key a profile answer shows, the once it does."""
    found = re.search(r'<code class="token" id="new-token">([0-9a-f]{40})</code>', response.content.decode())
    assert found, "no new token in the answer"
    return found.group(1)


def test_a_person_rotates_their_token_and_the_old_one_stops_working(client, release):
    dana = User.objects.get(username="dana")
    client.force_login(dana)

    first = new_key(client.post("/accounts/profile/", {"action": "rotate", "password": PASSWORD}))
    second = new_key(client.post("/accounts/profile/", {"action": "rotate", "password": PASSWORD}))

    assert first != second
    assert api_with(first).get(f"/api/releases/{release.pk}/").status_code == 401
    assert api_with(second).get(f"/api/releases/{release.pk}/").status_code == 200
    assert list(AuditEvent.objects.filter(action__startswith="token.").order_by("pk").values_list("action", "actor_name")) == [
        ("token.create", "dana"), ("token.rotate", "dana")]


def test_the_database_holds_the_keys_digest_never_the_key(client):
    from django.db import connection

    dana = person("dana", "viewer")
    client.force_login(dana)
    key = new_key(client.post("/accounts/profile/", {"action": "rotate", "password": PASSWORD}))

    token = ApiToken.objects.get(user=dana)
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM releases_apitoken")
        rows = cursor.fetchall()
        cursor.execute("SELECT details::text FROM releases_auditevent")
        audit_details = " ".join(row[0] for row in cursor.fetchall())

    assert token.digest == hashlib.sha256(key.encode()).hexdigest()
    assert token.prefix == key[:6]
    assert len(rows) == 1 and not any(key in str(value) for value in rows[0])
    assert key not in audit_details and key[:6] in audit_details


def test_the_key_authenticates_and_notes_when_it_was_used(release):
    dana = User.objects.get(username="dana")
    key = tokens.token_rotate(user=dana, actor=dana)

    response = api_with(key).get(f"/api/releases/{release.pk}/")

    assert response.status_code == 200
    assert ApiToken.objects.get(user=dana).last_used is not None


@pytest.mark.parametrize("header", ["Token 0123456789abcdef0123456789abcdef01234567", "Token", "Token a b", "Token é"])
def test_a_wrong_or_malformed_key_is_a_json_401(release, header):
    from rest_framework.test import APIClient

    tokens.token_rotate(user=User.objects.get(username="dana"), actor=None)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    response = client.get(f"/api/releases/{release.pk}/")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert response.json()["error"].startswith(("Invalid token", "Invalid token header"))


def test_an_inactive_persons_key_is_refused(release):
    dana = User.objects.get(username="dana")
    key = tokens.token_rotate(user=dana, actor=dana)
    dana.is_active = False
    dana.save()

    response = api_with(key).get(f"/api/releases/{release.pk}/")

    assert response.status_code == 401
    assert response.json() == {"error": "User inactive or deleted."}


@pytest.mark.django_db(transaction=True)
def test_a_key_works_over_the_running_server_until_it_is_rotated(web_server):
    import requests

    dana = person("dana", "viewer")
    old = tokens.token_rotate(user=dana, actor=dana)

    def get(key):
        return requests.get(f"{web_server}/api/environments/", headers={"Authorization": f"Token {key}"}, timeout=10)

    before = get(old)
    new = tokens.token_rotate(user=dana, actor=dana)
    after_old, after_new = get(old), get(new)

    assert before.status_code == 200 and before.json() == {"environments": []}
    assert after_old.status_code == 401 and after_old.json() == {"error": "Invalid token."}
    assert after_new.status_code == 200
    assert ApiToken.objects.get(user=dana).last_used is not None


def test_a_token_is_shown_in_full_only_once(client):
    dana = person("dana", "viewer")
    client.force_login(dana)
    key = new_key(client.post("/accounts/profile/", {"action": "rotate", "password": PASSWORD}))

    later = client.get("/accounts/profile/").content.decode()

    assert key not in later
    assert ApiToken.objects.get(user=dana).digest not in later
    assert key[:6] in later


def test_a_wrong_password_makes_no_token(client):
    client.force_login(person("dana", "viewer"))

    response = client.post("/accounts/profile/", {"action": "rotate", "password": "nope"})

    assert b"That is not your password." in response.content
    assert not ApiToken.objects.exists()


def test_a_person_revokes_their_token_and_it_stops_working(client, release):
    dana = User.objects.get(username="dana")
    key = tokens.token_rotate(user=dana, actor=dana)
    client.force_login(dana)

    response = client.post("/accounts/profile/", {"action": "revoke"}, follow=True)

    assert b"Your token is revoked" in response.content
    assert api_with(key).get(f"/api/releases/{release.pk}/").status_code == 401
    assert AuditEvent.objects.filter(action="token.revoke", actor_name="dana").exists()


def test_the_profile_page_is_linked_from_the_navigation(client):
    client.force_login(person("dana", "viewer"))

    assert b'href="/accounts/profile/"' in client.get("/").content


def test_the_admin_shows_a_prefix_never_the_key_or_its_digest(client):
    root = User.objects.create_superuser("root", password=PASSWORD)
    dana = person("dana", "viewer")
    key = tokens.token_rotate(user=dana, actor=dana)
    token = ApiToken.objects.get(user=dana)
    api_with(key).get("/api/environments/")  # sets last_used
    ravi = person("ravi", "viewer")
    tokens.token_rotate(user=ravi, actor=ravi)
    client.force_login(root)

    listing = client.get("/admin/releases/apitoken/")
    detail = client.get(f"/admin/releases/apitoken/{token.pk}/change/")
    by_key = client.get("/admin/releases/apitoken/", {"q": key})
    by_prefix = client.get("/admin/releases/apitoken/", {"q": key[:6]})
    by_name = client.get("/admin/releases/apitoken/", {"q": "dana"})

    assert listing.status_code == detail.status_code == 200
    for page in (listing, detail):
        assert key not in page.content.decode() and token.digest not in page.content.decode()
        assert key[:6] in page.content.decode()
    assert "Last used" in listing.content.decode() and "Created" in listing.content.decode()
    for search in (by_key, by_prefix):
        assert b"0 results" in search.content  # no key, prefix or digest is a search term: no oracle
    assert b"1 result" in by_name.content
    assert client.get("/admin/releases/apitoken/add/").status_code == 403


def test_a_token_revoked_in_the_admin_is_audited(client):
    root = User.objects.create_superuser("root", password=PASSWORD)
    dana = person("dana", "viewer")
    key = tokens.token_rotate(user=dana, actor=dana)
    token = ApiToken.objects.get(user=dana)
    client.force_login(root)

    confirm = client.get(f"/admin/releases/apitoken/{token.pk}/delete/")
    client.post(f"/admin/releases/apitoken/{token.pk}/delete/", {"post": "yes"})

    assert key[:6] in confirm.content.decode() and token.digest not in confirm.content.decode()
    assert not ApiToken.objects.filter(user=dana).exists()
    assert not LogEntry.objects.filter(object_repr__contains=token.digest).exists()
    assert api_with(key).get("/api/environments/").status_code == 401
    assert AuditEvent.objects.filter(action="token.revoke", actor_name="root", target="dana").exists()


def test_tokens_deleted_in_bulk_in_the_admin_are_each_revoked_and_audited(client):
    root = User.objects.create_superuser("root", password=PASSWORD)
    for name in ("dana", "ravi"):
        user = person(name, "viewer")
        tokens.token_rotate(user=user, actor=user)
    client.force_login(root)

    client.post("/admin/releases/apitoken/", {"action": "delete_selected", "post": "yes",
                                              "_selected_action": list(ApiToken.objects.values_list("pk", flat=True))})

    assert not ApiToken.objects.exists()
    assert sorted(AuditEvent.objects.filter(action="token.revoke", actor_name="root").values_list("target", flat=True)) == [
        "dana", "ravi"]


def test_the_create_token_command_prints_a_working_key_and_replaces_the_old_one(release):
    from django.core.management import CommandError, call_command

    dana = User.objects.get(username="dana")
    old = tokens.token_rotate(user=dana, actor=dana)
    out = io.StringIO()

    call_command("create_token", "dana", stdout=out)
    key = out.getvalue().strip()

    assert re.fullmatch(r"[0-9a-f]{40}", key)
    assert api_with(key).get(f"/api/releases/{release.pk}/").status_code == 200
    assert api_with(old).get(f"/api/releases/{release.pk}/").status_code == 401
    event = AuditEvent.objects.filter(action="token.rotate").latest("seq")
    assert (event.actor_name, event.target, event.details["prefix"]) == ("greenlight", "dana", f"{key[:6]}…")
    with pytest.raises(CommandError, match="there is no user 'nobody'"):
        call_command("create_token", "nobody")


def api_with(key: str):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client
