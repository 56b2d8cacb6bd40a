"""Secrets never reach a log line, an error, the API, the websocket or a page:
not as themselves, not inside URLs, not base64'd or hex'd."""

import base64
import io
import logging
import os
import sys
import textwrap

import pytest
from django.conf import settings

from deployer import redact
from deployer.redact import REDACTED, Redactor

SECRET_KEY = settings.SECRET_KEY
TOKEN = os.environ["GREENLIGHT_TEST_API_TOKEN"]  # a sensitive setting of the workers' (tests/conftest.py)
ENV_KEY_ID, ENV_SECRET = os.environ["GLREDACT_ACCESS_KEY_ID"], os.environ["GLREDACT_SECRET_ACCESS_KEY"]


def printed(data: bytes) -> list[str]:
    """What commands print for `data`: as is, and base64'd or hex'd the ways coreutils does."""
    b64 = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    hexed = data.hex()
    return [
        *data.decode().splitlines(),
        b64,  # base64 -w0
        *textwrap.wrap(b64, 76),  # base64
        *textwrap.wrap(url, 76),  # basenc --base64url
        *textwrap.wrap(hexed.upper(), 76),  # basenc --base16
        *textwrap.wrap(hexed, 60),  # xxd -p
        base64.b64encode(b"x" + data).decode(),  # after a byte of something else
        base64.b64encode(b"xy" + data).decode(),
        hexed,
    ]


def leaks(text: str, data: bytes) -> list[str]:
    """The pieces of `data`, as printed, that `text` still shows. A wrapped
    encoding's last line may be too short to tell from any other word: the
    redaction promises pieces of ENCODED_WINDOW characters and more."""
    return [piece for piece in printed(data) if len(piece) >= redact.ENCODED_WINDOW and piece in text]


def private_key_text() -> str:
    import paramiko

    out = io.StringIO()
    paramiko.RSAKey.generate(2048).write_private_key(out)
    return out.getvalue()


def test_the_secret_key_and_a_sensitive_setting_are_redacted_in_every_form():
    redactor = Redactor()
    for secret in (SECRET_KEY, TOKEN):
        lines = printed(secret.encode())
        shown = "\n".join(redactor(line) for line in lines)
        assert leaks(shown, secret.encode()) == []
        assert shown.count(REDACTED) >= sum(len(line) >= redact.ENCODED_WINDOW for line in lines)


def test_an_environments_secret_and_its_key_files_content_are_redacted_in_every_form():
    key = private_key_text()
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzzEXAMPLEKEY"
    redactor = Redactor([secret, key], worker=False)
    for data in (secret.encode(), key.encode()):
        shown = "\n".join(redactor(line, ("a",)) for line in printed(data))
        assert leaks(shown, data) == []
    # one line of the key's body, taken out by itself
    assert redactor(key.splitlines()[5]) == REDACTED


def test_a_password_of_the_workers_database_or_broker_url_is_redacted_even_outside_a_url(monkeypatch):
    monkeypatch.setenv("BROKER_URL", "redis://:Sup3r-s3cret-pw@cache:6379/0")
    redact.worker_secrets.cache_clear()
    try:
        assert Redactor()("auth with Sup3r-s3cret-pw failed") == f"auth with {REDACTED} failed"
    finally:
        redact.worker_secrets.cache_clear()


def test_ordinary_output_is_left_alone():
    redactor = Redactor([ENV_SECRET, private_key_text()])
    for line in (
        "HEAD is now at 9f2c1e0a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e prepan v2",
        "deployed 1a2b3c4 Add the /healthz endpoint to srv/prepan/repo/app.py",
        "Collecting requests==2.34.2 from /usr/lib/python3/dist-packages/requests-2.34.2.dist-info",
        "the password field is required",
        "dXNlcm5hbWU6IGRhbmEsIHJvbGU6IGRlcGxveWVyLCBlbnY6IHByZXBhbg==",  # base64 of something that is no secret
    ):
        assert redactor(line) == line


def test_the_workers_log_lines_and_tracebacks_are_redacted():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(redact.LogFilter())
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("connecting with %s", base64.b64encode(SECRET_KEY.encode()).decode())
        try:
            raise RuntimeError(f"the token {TOKEN} was refused")
        except RuntimeError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(handler)
    shown = out.getvalue()
    assert "RuntimeError" in shown and shown.count(REDACTED) == 2
    assert leaks(shown, SECRET_KEY.encode()) == [] and TOKEN not in shown


# -- through a whole release: an SSH command, a local task, a boto3 error ------------------------

LEAK = 'for f in {leakfile} {ssh_key_file}; do cat $f; base64 $f; base64 -w0 $f; echo; basenc --base16 $f; basenc --base64url $f; done'
EACH = ('while read -r l; do printf %s "$l" | base64 -w0; echo; printf x%s "$l" | base64 -w0; echo; '
        'printf %s "$l" | basenc --base16; done < {leakfile}')
# an AWS error that names what it was asked for: the instance id is the secret
BOTO = """
import pathlib, sys, boto3
secret = pathlib.Path(sys.argv[1]).read_text().split()[0]
ec2 = boto3.client("ec2", endpoint_url=sys.argv[2], region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
ec2.describe_instances(InstanceIds=["i-" + secret])
"""


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
def test_no_secret_printed_by_a_release_reaches_the_database_api_websocket_or_page(release_sandbox, celery_worker, tmp_path):
    from asgiref.sync import async_to_sync
    from django.test import Client

    from deployer.sandbox.demo_recipe import RECIPE
    from releases import services
    from releases.models import AuditEvent, LogLine, Recipe, Release, StatusChange, Step
    from tests.release_helpers import api, person, wait_status
    from tests.test_websocket import ORIGIN, connect, session_cookie

    environment = services.environment_import_sandbox(info=release_sandbox.info)
    secrets = [ENV_SECRET, ENV_KEY_ID, TOKEN, SECRET_KEY]  # the boto3 error names the first; the step error, the last
    leakfile = tmp_path / "leak"
    url_password = f"pw{os.urandom(8).hex()}"  # a secret nobody told Greenlight of, in a URL
    leakfile.write_text("\n".join([*secrets[:-1], f"postgres://app:{url_password}@db:5432/app", secrets[-1]]) + "\n")
    script = tmp_path / "boto_error.py"
    script.write_text(BOTO)
    definition = {
        **RECIPE,
        "params": {**RECIPE["params"], "leakfile": str(leakfile), "python": sys.executable, "script": str(script),
                   "endpoint": release_sandbox.info["aws_endpoint_url"]},
        "tasks": {
            **RECIPE["tasks"],
            "provision:leak": {"run": "local", "commands": ["echo leak-local", LEAK, EACH, "{python} {script} {leakfile} {endpoint} || true"]},
            # the remote host has no key file of the worker's: its cat fails, and says so
            "deploy:leak": {"run": "remote", "commands": ["echo leak-remote", LEAK.replace(" {ssh_key_file}", ""), EACH,
                                                          f"tail -1 {leakfile} >&2; exit 3"]},
        },
        "phases": {"provision": [*RECIPE["phases"]["provision"], "provision:leak"], "deploy": ["deploy:leak"]},
    }
    recipe = Recipe.objects.create(name="leaky", definition=definition)
    type(environment).objects.filter(pk=environment.pk).update(recipe=recipe, aws_credentials="env:GLREDACT")
    dana = person("dana", "deployer", "approver")

    response = api(dana).post("/api/releases/", {"environment": environment.name, "revision": "v2", "clone_count": 1}, format="json")
    assert response.status_code == 201, response.json()
    release = wait_status(response.json()["id"], Release.Status.FAILED, Release.Status.ROLLED_BACK, timeout=180)

    lines = list(LogLine.objects.filter(release=release).values_list("text", flat=True))
    assert "leak-local" in lines and "leak-remote" in lines  # both tasks ran
    assert sum(REDACTED in line for line in lines) >= 40
    assert any("InvalidInstanceID" in line for line in lines)  # the boto3 error is there, less its secret
    assert release.steps.get(key="deploy").error.endswith(REDACTED)
    key = open(release.plan["environment"]["ssh_key_file"]).read()

    stored = "\n".join([
        *lines, release.error,
        *(f"{s.error} {s.waiting_for} {s.result}" for s in Step.objects.filter(release=release)),
        *(f"{h.reason}" for h in StatusChange.objects.filter(release=release)),
        *(str(e.details) + e.target for e in AuditEvent.objects.filter(release=release)),
    ])
    client = Client()
    client.force_login(dana)
    shown = {
        "the database": stored,
        "the API": api(dana).get(f"/api/releases/{release.pk}/").content.decode()
        + api(dana).get(f"/api/releases/{release.pk}/logs/", {"limit": 5000}).content.decode(),
        "the page": client.get(f"/releases/{release.pk}/").content.decode()
        + b"".join(client.get(f"/releases/{release.pk}/log.txt").streaming_content).decode(),
        "the websocket": str(async_to_sync(_replay)(connect, release.pk, ORIGIN, session_cookie(dana))),
    }
    for where, text in shown.items():
        assert "leak-remote" in text, f"{where} shows no log"
        for secret in [*secrets, key]:
            assert leaks(text, secret.encode()) == [], f"{where} shows a secret"
        assert url_password not in text, f"{where} shows a URL's password"


async def _replay(connect, release_id, *headers) -> list:
    communicator = connect(release_id, *headers)
    connected, _ = await communicator.connect()
    assert connected
    await communicator.send_json_to({"after": 0})
    messages = []
    while True:
        message = await communicator.receive_json_from(timeout=10)
        messages.append(message)
        if message.get("type") == "replayed":
            break
    await communicator.disconnect()
    return messages


def test_an_adapters_error_is_redacted_wherever_it_is_shown_later():
    from deployer.errors import AdapterError

    error = AdapterError(f"InvalidParameterValue: {base64.b64encode(TOKEN.encode()).decode()} is not valid")

    assert str(error) == f"InvalidParameterValue: {REDACTED} is not valid"
