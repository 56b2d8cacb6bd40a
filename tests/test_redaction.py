"""Secrets never reach a log line, an error, the API, the websocket or a page:
not as themselves, not inside URLs, not base64'd or hex'd."""

import base64
import io
import logging
import os
import re
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


def test_redacting_a_batch_of_lines_gives_what_redacting_each_line_gives():
    """Redactor.lines (the release log's way, a batch at a time) skips the
    lines no rule can match: line for line, it must give what __call__ gives,
    private keys' per-source state across batches included."""
    import random

    key, secret = private_key_text(), "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzzEXAMPLEKEY"
    known = [secret, key, "s3cr3t-db-pass", "shorty7"]
    rng = random.Random(9)
    lines = [
        "HEAD is now at 9f2c1e0a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e prepan v2", "", "ok", "a\nb password=x\nc",
        "Collecting requests==2.34.2 from /usr/lib/python3/dist-packages/requests-2.34.2.dist-info",
        "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "xAKIAIOSFODNN7EXAMPLEx", "Authorization: Token 9944b09199c62bcf9418ad",
        "PROXY-AUTHORIZATION = Basic abc", "bearer abcdefghijklmnopqrstu", "connecting to postgres://app:hunter2@db:5432/app",
        "mysql --password=hunter2hunter2", "API-KEY: k", "pwd", "PWD: hunter2", "Secret_Key=abc", "TOKEN", "token: abc", "aws says Zq3xLm9PwT2vRk8sYb4nHc7dJf1gNa6eUo5iKt0Q ok", "git://h/r", "pa\u017fsword=x", "\u212a\u212aapi_\u212aey=1 \u2713", "\u0130 token=\u0130", "se\u0130cret", "the password field is required",
        "connecting with s3cr3t-db-pass...", "shorty7shorty7", "-----END RSA PRIVATE KEY-----", "ab" * 30,
        "dXNlcm5hbWU6IGRhbmEsIHJvbGU6IGRlcGxveWVyLCBlbnY6IHByZXBhbg==", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        f"{SECRET_KEY} and {TOKEN}", f"x{TOKEN[3:]}y", "\u212a\u212aapi_\u212aey=1",
        *(line for data in (secret.encode(), key.encode(), SECRET_KEY.encode(), b"s3cr3t-db-pass") for line in printed(data)),
    ]
    texts = [rng.choice(lines) for _ in range(3000)]
    for n in rng.sample(range(len(texts)), 40):  # keys that begin and end, some never, on several sources
        texts[n:n] = key.splitlines()[: rng.choice([3, 30, 100])]
    sources = [rng.choice([("deploy", "app-1", "stdout"), ("deploy", "app-2", "stdout"), ("deploy", "app-1", "stderr")])
               for _ in texts]

    one_by_one, batched = Redactor(known), Redactor(known)
    expected = [one_by_one(text, source) for text, source in zip(texts, sources)]
    got, at = [], 0
    while at < len(texts):
        size = rng.choice([1, 7, 100, 2000])
        got += batched.lines(texts[at:at + size], sources[at:at + size])
        at += size

    assert got == expected
    assert sum(text == REDACTED for text in got) > 1000  # the corpus has something to redact
    each = Redactor(known)
    assert Redactor(known).text(f"a\n{key}\nb") == "\n".join([each(t, ("text",)) for t in ("a", *key.split("\n"), "b")])


def test_the_batchs_quick_search_knows_every_character_that_matches_an_ascii_letter_in_any_case():
    letters = set("".join(redact._WORDS))
    others = "".join(chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c < 0xE000)
    folding = {found for letter in letters for found in re.findall("(?i)" + letter, others)}
    assert all(redact._FOLDS_TO_ASCII.match(c) for c in folding)
    assert [c for c in others if len(c.lower()) != 1] == ["\u0130"]  # what the quick search's offsets rely on
