"""Secrets never reach a stored log line; every line is stored, numbered, soon."""

import asyncio
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django import db
from django.db import transaction

from releases import logs
from releases.logs import REDACTED, LogWriter, Redactor
from releases.models import Environment, LogLine, Recipe, Release
from tests.helpers import wait_for
from tests.release_helpers import person


def test_it_redacts_aws_keys_tokens_and_passwords():
    redact = Redactor()

    assert redact("export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE") == f"export AWS_ACCESS_KEY_ID={REDACTED}"
    assert "wJalrXUtnFEMI" not in redact("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert redact("Authorization: Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b") == f"Authorization: {REDACTED}"
    assert redact("mysql -u app --password=hunter2hunter2") == f"mysql -u app --password={REDACTED}"


def test_a_password_inside_a_url_is_redacted_and_the_rest_of_the_url_kept():
    redact = Redactor()

    assert redact("connecting to postgres://app:hunter2@db:5432/app") == f"connecting to postgres://app:{REDACTED}@db:5432/app"
    assert redact("REDIS=redis://:s3cret@cache:6379/0 ok") == f"REDIS=redis://:{REDACTED}@cache:6379/0 ok"
    assert redact("git clone https://dana:ghp_x1@github.com/o/r.git") == f"git clone https://dana:{REDACTED}@github.com/o/r.git"
    assert redact("see https://example.com:8443/a@b and git@github.com:o/r") == "see https://example.com:8443/a@b and git@github.com:o/r"
    # over https a lone userinfo is a token; an ssh user is a name; a URL masked already (git.shown) stays as it is
    assert redact("git clone https://ghp_x1y2@github.com/o/r.git") == f"git clone https://{REDACTED}@github.com/o/r.git"
    assert redact("git clone ssh://git@github.com/o/r.git") == "git clone ssh://git@github.com/o/r.git"
    assert redact("cannot read https://***@h/r and https://u:***@h/r") == "cannot read https://***@h/r and https://u:***@h/r"


def test_a_git_sha_is_not_mistaken_for_a_secret():
    line = "HEAD is now at 9f2c1e0a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e prepan v2"
    assert Redactor()(line) == line


def test_every_line_of_a_private_key_is_redacted():
    redact = Redactor()
    lines = ["-----BEGIN OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ", "AAAAC3NzaC1lZDI1NTE5", "-----END OPENSSH PRIVATE KEY-----", "after"]

    assert [redact(line, ("deploy", "app-3", "stdout")) for line in lines] == [REDACTED] * 4 + ["after"]


def test_the_environment_s_own_secrets_are_redacted_wherever_they_appear():
    redact = Redactor(["s3cr3t-db-pass"])

    assert redact("connecting with s3cr3t-db-pass...") == f"connecting with {REDACTED}..."


# -- storing lines ------------------------------------------------------------------


@pytest.fixture
def release():
    recipe = Recipe.objects.create(name="logs", definition={"tasks": {"t": {"commands": ["true"]}}})
    environment = Environment.objects.create(
        name="logs", region="us-west-1", load_balancer_name="logs", public_url="http://127.0.0.1:1",
        verify_security_group_id="sg-1", ssh_key_file="/x", subnet_id="s", key_name="k", base_ami="ami-1",
        repository="r", recipe=recipe,
    )
    return Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan={},
                                  requested_by=person("logs", "viewer"), status="running")


def flushers(release) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"log-flusher-{release.pk}" and t.is_alive()]


def stored(release) -> list[tuple[int, str]]:
    return list(LogLine.objects.filter(release=release).order_by("seq").values_list("seq", "text"))


@pytest.mark.django_db(transaction=True)
def test_a_line_followed_by_silence_is_stored_and_sent_within_a_second(release):
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"release-{release.pk}", channel)
    writer = LogWriter(release.pk)

    writer.write("provision", "Chef Infra Client, version 18")
    written = time.monotonic()

    wait_for(lambda: stored(release), timeout=1, interval=0.02, message="the quiet line in the database")
    assert stored(release) == [(1, "Chef Infra Client, version 18")]
    message = async_to_sync(receive)(layer, channel, timeout=1 - (time.monotonic() - written))
    assert [line["text"] for line in message["event"]["lines"]] == ["Chef Infra Client, version 18"]
    writer.close()


@pytest.mark.django_db(transaction=True)
def test_after_close_every_line_is_stored_and_no_thread_is_left(release):
    writer = LogWriter(release.pk)
    writer.write("deploy", "one")
    writer.write("deploy", "two")

    writer.close()

    assert stored(release) == [(1, "one"), (2, "two")]
    assert not flushers(release)


@pytest.mark.django_db(transaction=True)
def test_a_writer_is_a_context_manager_that_closes(release):
    with LogWriter(release.pk) as writer:
        writer.write("deploy", "inside")
        assert flushers(release)

    assert stored(release) == [(1, "inside")]
    assert not flushers(release)


@pytest.mark.django_db(transaction=True)
def test_a_flusher_with_nothing_to_do_ends_by_itself(release, monkeypatch):
    monkeypatch.setattr(logs, "FLUSHER_IDLE_SECONDS", 0.3)
    writer = LogWriter(release.pk)  # never closed, as a sweep's one-off line

    writer.write("rollback", "the rollback's worker stopped answering")

    wait_for(lambda: not flushers(release), timeout=3, interval=0.05, message="the idle flusher to end")
    assert stored(release) == [(1, "the rollback's worker stopped answering")]


@pytest.mark.django_db(transaction=True)
def test_threads_writing_and_flushing_at_once_get_every_line_once_and_in_order(release, monkeypatch):
    monkeypatch.setattr(logs, "QUIET_SECONDS", 0.005)  # the flusher races the writers all the time
    monkeypatch.setattr(logs, "FLUSHER_TICK_SECONDS", 0.005)
    writer = LogWriter(release.pk)

    def host(name):
        for n in range(150):
            writer.write("deploy", f"{name} {n}", host=name)
            if n % 40 == 0:
                writer.flush()
            if n % 10 == 0:
                time.sleep(0.01)
        db.connection.close()

    threads = [threading.Thread(target=host, args=(f"app-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()

    lines = stored(release)
    assert [seq for seq, _ in lines] == list(range(1, 601))
    for i in range(4):
        assert [text for _, text in lines if text.startswith(f"app-{i} ")] == [f"app-{i} {n}" for n in range(150)]
    assert Release.objects.get(pk=release.pk).log_seq == 600


@pytest.mark.timeout(30)
@pytest.mark.django_db(transaction=True)
def test_a_caller_holding_the_release_row_can_still_flush(release):
    writer = LogWriter(release.pk)

    with transaction.atomic():
        Release.objects.filter(pk=release.pk).update(status="running")  # the row is ours until commit
        writer.write("deploy", "first")
        time.sleep(0.5)  # the flusher takes the line and waits for the row
        writer.write("deploy", "second")
        writer.flush()  # waits for the flusher to give up, then stores both itself

    writer.close()
    assert stored(release) == [(1, "first"), (2, "second")]


async def receive(layer, channel, timeout):
    """The first log event on `channel` within `timeout`: a release's status events are passed over
    (a worker's sweep, left running by an earlier test in this process, may move the bare release)."""
    async def first_log():
        while (message := await layer.receive(channel))["event"].get("type") != "log":
            pass
        return message
    return await asyncio.wait_for(first_log(), max(timeout, 0.01))
