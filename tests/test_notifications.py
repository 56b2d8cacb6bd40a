"""Notifications (issue 11): events written with the moves they report,
delivered by the real worker to a real SMTP server (aiosmtpd) and a real HTTP
receiver on loopback, retried when a receiver is down, never sent twice as a
rule and never zero times; the channels' forms and who may use them."""

from __future__ import annotations

import email
import hashlib
import hmac
import json
import os
import threading
from collections import Counter
from datetime import timedelta
from datetime import timezone as dt_timezone
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from releases import engine, notifications, services, transitions
from releases.models import AuditEvent, Delivery, Environment, Notification, NotificationChannel, Release, Step
from tests.helpers import free_port, wait_for
from tests.release_helpers import api, person, revisions_behind, start, wait_gate, wait_status
from tests.test_api import environment  # noqa: F401  (fixture)

SLACK_PATH = "/services/T0000/B0000/slack-secret-path-0123456789"
HOOK_SECRET = "webhook-secret-of-these-tests-0123456789"


# -- receivers ----------------------------------------------------------------------------------


class Receiver:
    """An HTTP server on loopback that keeps every POST: (path, headers, body)."""

    def __init__(self, hold: threading.Event | None = None):
        self.posts: list[tuple[str, dict, bytes]] = []
        self.lock = threading.Lock()
        # `hold`: each POST is kept waiting for its answer until the test sets it
        self.hold, self.arrived = hold, threading.Event()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with received.lock:
                    received.posts.append((self.path, dict(self.headers), body))
                received.arrived.set()
                if received.hold is not None:
                    received.hold.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def at(self, path: str) -> list[tuple[dict, bytes]]:
        with self.lock:
            return [(headers, body) for p, headers, body in self.posts if p == path]


class Mailbox:
    """aiosmtpd's handler: every message it accepts, parsed."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
        with self.lock:
            self.messages.append(message)
        return "250 OK"

    def all(self) -> list:
        with self.lock:
            return list(self.messages)


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture
def held_receiver():
    """A receiver that takes a POST and answers it only once the test sets its `hold`."""
    receiver = Receiver(hold=threading.Event())
    receiver.thread.start()
    yield receiver
    receiver.hold.set()
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture(scope="module")
def mailbox():
    """An SMTP server where the workers send mail: EMAIL_URL, as tests/conftest.py set it for them."""
    from aiosmtpd.controller import Controller

    where = urlsplit(os.environ["EMAIL_URL"])
    box = Mailbox()
    controller = Controller(box, hostname=where.hostname, port=where.port)
    controller.start()
    yield box
    controller.stop()


@pytest.fixture
def received(receiver, mailbox):
    with receiver.lock:
        receiver.posts.clear()
    with mailbox.lock:
        mailbox.messages.clear()
    return receiver, mailbox


def channels_for(where: Environment, receiver: Receiver, **extra) -> dict[str, NotificationChannel]:
    return {
        "email": NotificationChannel.objects.create(environment=where, name="team", kind="email",
                                                    recipients="ops@example.com, dana@example.com"),
        "slack": NotificationChannel.objects.create(environment=where, name="slack", kind="slack",
                                                    url=receiver.url + SLACK_PATH),
        "webhook": NotificationChannel.objects.create(environment=where, name="hook", kind="webhook",
                                                      url=receiver.url + "/hook", secret=HOOK_SECRET),
        **extra,
    }


def verified(headers: dict, body: bytes, secret: str = HOOK_SECRET) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("X-Greenlight-Signature", ""))


def hooks(receiver: Receiver, release_id: int | None = None) -> list[dict]:
    bodies = []
    for headers, body in receiver.at("/hook"):
        assert headers["Content-Type"] == "application/json"
        assert verified(headers, body), "the signature verifies with the webhook's secret"
        assert not verified(headers, body, "another-secret-of-sixteen-chars"), "and with no other"
        payload = json.loads(body)
        assert headers["X-Greenlight-Event"] == payload["event"] and headers["X-Greenlight-Delivery"] == payload["id"]
        if release_id is None or (payload["release"] or {}).get("id") == release_id:
            bodies.append(payload)
    return bodies


def events_of(release_id: int, receiver: Receiver, mailbox: Mailbox) -> tuple[Counter, Counter, Counter]:
    """What each receiver got about the release, by event."""
    webhook = Counter(p["event"] for p in hooks(receiver, release_id))
    slack = Counter(json.loads(body)["text"] for _, body in receiver.at(SLACK_PATH) if f"release #{release_id} " in json.loads(body)["text"])
    mail = Counter(subject(m) for m in mailbox.all() if f"release #{release_id} " in subject(m))
    return webhook, slack, mail


def subject(message) -> str:
    return " ".join(str(message["Subject"]).split())  # unfolded: a long one is folded, as it may be


def all_sent(release_id: int, count: int):
    """Every delivery of the release's notifications went out (or was given up on): `count` of them."""
    rows = list(Delivery.objects.filter(notification__release_id=release_id))
    done = [d for d in rows if d.status in (Delivery.Status.SENT, Delivery.Status.FAILED)]
    return rows if len(rows) == count and len(done) == count else None


# -- recording events (in this process: no worker, nothing queued before the test's transaction ends) --


@pytest.fixture
def release(environment):  # noqa: F811
    return services.release_create(environment=environment, revision="v2", actor=person("dana", "deployer", "approver"))


@pytest.mark.django_db
def test_an_environment_without_channels_records_nothing_and_an_action_step_move_does_not_even_look(release):
    launch = release.steps.get(key="launch")
    with CaptureQueriesContext(connection) as queries:
        transitions.step(launch.pk, "start", release_id=release.pk, lease_owner="w", started_at=timezone.now())
    assert not [q for q in queries.captured_queries if "notification" in q["sql"]]

    transitions.release(release.pk, "start")
    with CaptureQueriesContext(connection) as queries:
        transitions.release(release.pk, "fail", error="launch: no")
    assert len([q for q in queries.captured_queries if "notification" in q["sql"]]) == 1  # is there a channel? no
    assert not Notification.objects.exists()


def open_gate(release: Release, key: str = "verify_directly") -> Step:
    gate = release.steps.get(key=key)
    Step.objects.filter(release=release, key__in=["launch", "provision", "deploy", "open_access", "smoke_direct"]).update(status="succeeded")
    transitions.release(release.pk, "start")
    transitions.step(gate.pk, "open", release_id=release.pk, deadline=timezone.now() + timedelta(seconds=3600),
                     started_at=timezone.now())
    transitions.release(release.pk, "open_gate")
    gate.refresh_from_db()
    return gate


@pytest.mark.django_db
def test_a_gate_that_opens_is_recorded_once_with_the_link_the_revision_who_started_it_its_deadline_and_who_decides(
        release, settings):
    from django.contrib.auth.models import Group

    settings.GREENLIGHT_URL = "https://greenlight.example.com/"
    here = release.environment
    here.verify_groups.add(Group.objects.create(name="release-managers"))
    hook = NotificationChannel.objects.create(environment=here, name="hook", kind="webhook", url="http://127.0.0.1:9/x",
                                              secret=HOOK_SECRET)
    NotificationChannel.objects.create(environment=here, name="ends only", kind="email", recipients="a@example.com",
                                       events=["release.succeeded"])
    NotificationChannel.objects.create(environment=here, name="off", kind="email", recipients="b@example.com", enabled=False)

    gate = open_gate(release)

    notification = Notification.objects.get()
    assert notification.event == "gate.opened" and notification.release == release
    assert [d.channel for d in notification.deliveries.all()] == [hook]  # subscribed and enabled only
    payload = notification.payload
    assert payload["release"]["url"] == f"https://greenlight.example.com/releases/{release.pk}/"
    assert payload["release"]["revision"] == "v2" and payload["release"]["started_by"] == "dana"
    assert payload["release"]["status"] == "awaiting_approval"
    assert payload["gate"]["key"] == "verify_directly"
    assert payload["gate"]["deadline"] == gate.deadline.astimezone(dt_timezone.utc).isoformat().replace("+00:00", "Z")
    assert payload["gate"]["may_decide"] == {"groups": ["release-managers"], "approvals_required": 1, "not": "dana"}
    assert payload["text"].startswith(f"prepan: release #{release.pk} v2 waits for verify_directly (decide by ")
    assert "any of: release-managers, not dana" in payload["text"]

    # a gate opens once: the same event again (a second call, say) is not told again
    assert notifications.gate_event(gate, "gate.opened") is None
    assert Notification.objects.filter(event="gate.opened").count() == 1


@pytest.mark.django_db
def test_a_rejection_is_recorded_with_who_and_the_comment_and_a_failure_with_its_step_and_redacted_error(release):
    hook = NotificationChannel.objects.create(environment=release.environment, name="hook", kind="webhook",
                                              url="http://127.0.0.1:9/x", secret=HOOK_SECRET)
    gate = open_gate(release)
    ravi = person("ravi", "approver")

    services.gate_reject(release=release, key="verify_directly", actor=ravi, comment="the logo is wrong")

    decided = Notification.objects.get(event="gate.decided").payload
    assert decided["actor"] == "ravi" and decided["gate"]["decision"] == "rejected"
    assert decided["gate"]["comment"] == "the logo is wrong"
    assert decided["text"] == f"prepan: release #{release.pk} v2: verify_directly rejected by ravi: “the logo is wrong”"
    assert gate.pk and hook.deliveries.count() == 2  # opened, decided

    second = Environment.objects.create(
        name="second", region="us-west-1", aws_endpoint_url="http://127.0.0.1:1", aws_credentials="sandbox",
        load_balancer_name="second", public_url="http://127.0.0.1:2", verify_security_group_id="sg-1",
        ssh_key_file="/nonexistent", subnet_id="subnet-1", key_name="second", base_ami="ami-1",
        repository="file:///nonexistent", recipe=release.environment.recipe)
    other = services.release_create(environment=second, revision="v3", actor=release.requested_by)
    NotificationChannel.objects.create(environment=other.environment, name="hook", kind="webhook", url="http://127.0.0.1:9/x",
                                       secret=HOOK_SECRET)
    deploy = other.steps.get(key="deploy")
    transitions.release(other.pk, "start")
    transitions.step(deploy.pk, "start", release_id=other.pk, lease_owner="w")
    token = "AKIA" + "ABCDEFGHIJKLMNOP"
    transitions.step(deploy.pk, "fail", held_by="w", release_id=other.pk, error=f"exit 1: aws_secret_access_key={token}",
                     finished_at=timezone.now())
    transitions.release(other.pk, "fail", error="deploy: exit 1")

    failed = Notification.objects.get(event="release.failed").payload
    assert failed["release"]["failed_step"]["key"] == "deploy"
    assert token not in json.dumps(failed) and "[redacted]" in failed["release"]["failed_step"]["error"]
    assert failed["text"].startswith(f"second: release #{other.pk} v3 failed at deploy: exit 1")


# -- formats and delivery, against the receivers (in this process) ------------------------------


@pytest.mark.django_db
def test_the_three_formats(release, receiver, received, mailoutbox):
    channels = channels_for(release.environment, receiver)
    open_gate(release)
    deliveries = {d.channel.kind: d for d in Delivery.objects.select_related("channel")}

    for delivery in deliveries.values():
        assert notifications.deliver(delivery.pk) is None
        delivery.refresh_from_db()
        assert delivery.status == "sent" and delivery.attempts == 1 and delivery.sent_at

    [(headers, body)] = receiver.at("/hook")
    payload = json.loads(body)
    assert list(payload) == ["id", "event", "at", "environment", "release", "gate", "actor", "text"]
    assert payload["id"] == str(deliveries["webhook"].uuid) and payload["event"] == "gate.opened"
    assert payload["at"].endswith("Z") and payload["gate"]["key"] == "verify_directly"
    assert headers["X-Greenlight-Delivery"] == payload["id"] and headers["X-Greenlight-Event"] == "gate.opened"
    assert verified(headers, body) and not verified(headers, body, "another-secret-of-sixteen-chars")

    [(headers, body)] = receiver.at(SLACK_PATH)
    slack = json.loads(body)
    assert slack["text"] == payload["text"]
    kinds = [b["type"] for b in slack["blocks"]]
    assert kinds[0] == "section" and kinds[-1] == "actions"
    [button] = slack["blocks"][-1]["elements"]
    assert button["type"] == "button" and button["url"] == payload["release"]["url"]
    assert "X-Greenlight-Signature" not in headers

    [mail] = mailoutbox
    assert mail.subject == f"[greenlight] {payload['text']}"
    assert mail.subject.startswith(f"[greenlight] prepan: release #{release.pk} v2 waits for verify_directly")
    assert mail.to == ["ops@example.com", "dana@example.com"]
    assert payload["release"]["url"] in mail.body
    [(html, kind)] = mail.alternatives
    assert kind == "text/html" and f'href="{payload["release"]["url"]}"' in html
    assert channels["email"].deliveries.get().status == "sent"


@pytest.mark.django_db
def test_a_receiver_that_is_down_is_tried_again_with_a_backoff_then_given_up_on_and_its_url_is_never_shown(
        release, settings):
    settings.NOTIFY_ATTEMPTS, settings.NOTIFY_RETRY_SECONDS = 3, 5
    closed = free_port()
    NotificationChannel.objects.create(environment=release.environment, name="slack", kind="slack",
                                       url=f"http://127.0.0.1:{closed}{SLACK_PATH}")
    open_gate(release)
    delivery = Delivery.objects.get()

    delays = []
    for _ in range(3):
        Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())  # due now
        delays.append(notifications.deliver(delivery.pk))
    delivery.refresh_from_db()

    assert delays == [5, 10, None]
    assert delivery.status == "failed" and delivery.attempts == 3
    assert f"127.0.0.1:{closed}" in delivery.last_error and "slack-secret-path" not in delivery.last_error
    assert notifications.deliver(delivery.pk) is None and Delivery.objects.get(pk=delivery.pk).attempts == 3


@pytest.mark.django_db
def test_a_delivery_to_a_channel_deleted_or_disabled_since_is_given_up_on_at_once(release):
    kept = NotificationChannel.objects.create(environment=release.environment, name="kept", kind="email", recipients="a@example.com")
    gone = NotificationChannel.objects.create(environment=release.environment, name="gone", kind="email", recipients="b@example.com")
    open_gate(release)
    gone.delete()
    NotificationChannel.objects.filter(pk=kept.pk).update(enabled=False)

    for delivery in Delivery.objects.all():
        assert notifications.deliver(delivery.pk) is None
    assert sorted(Delivery.objects.values_list("channel_name", "status", "attempts", "last_error")) == [
        ("gone", "failed", 1, "the channel was deleted"), ("kept", "failed", 1, "the channel was disabled")]


@pytest.mark.django_db
def test_a_delivery_whose_worker_died_mid_send_is_sent_again_and_a_sent_one_never(release, receiver, received):
    NotificationChannel.objects.create(environment=release.environment, name="hook", kind="webhook",
                                       url=receiver.url + "/hook", secret=HOOK_SECRET)
    open_gate(release)
    delivery = Delivery.objects.get()
    past = timezone.now() - timedelta(seconds=1)
    Delivery.objects.filter(pk=delivery.pk).update(status="sending", lease_expires_at=past)

    assert notifications.deliver(delivery.pk) is None and not receiver.at("/hook")  # held (by a dead worker)
    swept = engine.sweep()
    assert delivery.pk in swept["deliver"] and swept["taken_back"] == 1
    notifications.deliver(delivery.pk)
    assert Delivery.objects.get(pk=delivery.pk).status == "sent"
    assert [json.loads(body)["id"] for _, body in receiver.at("/hook")] == [str(delivery.uuid)]

    Delivery.objects.filter(pk=delivery.pk).update(sent_at=past - timedelta(days=1), next_attempt_at=past)
    assert delivery.pk not in engine.sweep()["deliver"]
    assert notifications.deliver(delivery.pk) is None
    assert len(receiver.at("/hook")) == 1


@pytest.mark.django_db
def test_a_gate_near_its_deadline_is_reminded_of_once(release, settings):
    NotificationChannel.objects.create(environment=release.environment, name="hook", kind="webhook",
                                       url="http://127.0.0.1:9/x", secret=HOOK_SECRET)
    gate = open_gate(release)
    Environment.objects.filter(pk=release.environment_id).update(gate_reminder=600)

    assert notifications.remind(timezone.now()) == 0  # an hour left
    Step.objects.filter(pk=gate.pk).update(deadline=timezone.now() + timedelta(seconds=300))
    assert notifications.remind(timezone.now()) == 1
    assert notifications.remind(timezone.now()) == 0
    expiring = Notification.objects.get(event="gate.expiring").payload
    assert "verify_directly closes itself at" in expiring["text"]

    Environment.objects.filter(pk=release.environment_id).update(gate_reminder=0)  # 0: never
    Step.objects.filter(pk=gate.pk).update(reminded_at=None)
    assert notifications.remind(timezone.now()) == 0


# -- the channels' forms and pages ----------------------------------------------------------------


def signed_in(client, *roles, name="someone"):
    client.force_login(person(name, *roles))
    return client


@pytest.mark.django_db
def test_a_maintainer_adds_a_webhook_whose_url_and_secret_are_never_shown_again(client, environment):  # noqa: F811
    maintainer = signed_in(client, "maintainer", "viewer", name="mia")
    url = "https://hooks.example.com/in/very-secret-path"
    response = maintainer.post("/environments/prepan/channels/new/", {
        "name": "hook", "kind": "webhook", "url": url, "secret": HOOK_SECRET, "events": ["gate.opened", "gate.decided"],
        "enabled": "on"})
    assert response.status_code == 302, response.content.decode()[:2000]
    channel = NotificationChannel.objects.get()
    assert (channel.url, channel.secret, channel.events) == (url, HOOK_SECRET, ["gate.opened", "gate.decided"])

    for page in ("/environments/prepan/", f"/environments/prepan/channels/{channel.pk}/edit/"):
        body = maintainer.get(page).content.decode()
        assert "very-secret-path" not in body and HOOK_SECRET not in body and "hooks.example.com" not in body
    assert "URL set" in maintainer.get("/environments/prepan/").content.decode()

    # empty on an edit: the stored ones stay
    response = maintainer.post(f"/environments/prepan/channels/{channel.pk}/edit/", {
        "name": "hook", "kind": "webhook", "url": "", "secret": "", "events": ["gate.opened"], "enabled": "on"})
    assert response.status_code == 302
    channel.refresh_from_db()
    assert (channel.url, channel.secret, channel.events) == (url, HOOK_SECRET, ["gate.opened"])

    maintainer.post(f"/environments/prepan/channels/{channel.pk}/edit/", {
        "name": "hook", "kind": "webhook", "url": "https://hooks.example.com/new-secret-path", "secret": "", "enabled": "on"})
    channel.refresh_from_db()
    assert channel.url.endswith("new-secret-path") and channel.events == []
    audit = json.dumps(list(AuditEvent.objects.filter(action__startswith="channel.").values("action", "details")))
    assert "secret-path" not in audit and HOOK_SECRET not in audit
    assert '"(set; changed)"' in audit

    response = maintainer.post(f"/environments/prepan/channels/{channel.pk}/delete/")
    assert response.status_code == 302 and not NotificationChannel.objects.exists()
    assert AuditEvent.objects.filter(action="channel.delete").exists()


@pytest.mark.django_db
def test_bad_channels_are_refused_with_what_is_wrong_and_without_echoing_a_url(client, environment):  # noqa: F811
    maintainer = signed_in(client, "maintainer", name="mia")
    cases = [
        ({"name": "e", "kind": "email", "recipients": "not an address"}, "is not an email address"),
        ({"name": "e", "kind": "email", "recipients": ""}, "needs at least one address"),
        ({"name": "s", "kind": "slack"}, "A slack channel needs a URL"),
        ({"name": "s", "kind": "slack", "url": "ftp://x.example.com/secret-bit"}, "not an http:// or https:// URL"),
        ({"name": "w", "kind": "webhook", "url": "https://x.example.com/a"}, "A webhook needs a secret"),
        ({"name": "w", "kind": "webhook", "url": "https://x.example.com/a", "secret": "short"}, "at least 16 characters"),
    ]
    for data, error in cases:
        response = maintainer.post("/environments/prepan/channels/new/", data)
        body = response.content.decode()
        assert response.status_code == 200 and error in body, (data, body[-3000:])
        assert "secret-bit" not in body
    assert not NotificationChannel.objects.exists()


@pytest.mark.django_db
def test_only_a_maintainer_changes_channels_and_a_viewer_cannot_send_a_test(client, environment):  # noqa: F811
    channel = NotificationChannel.objects.create(environment=environment, name="team", kind="email", recipients="a@example.com")
    deployer = signed_in(client, "deployer", "viewer", name="dana")
    body = deployer.get("/environments/prepan/").content.decode()
    assert "Send test" in body and "Add channel" not in body and f"/channels/{channel.pk}/edit/" not in body
    assert deployer.get("/environments/prepan/channels/new/").status_code == 403
    assert deployer.post("/environments/prepan/channels/new/", {"name": "x", "kind": "email",
                                                                "recipients": "a@example.com"}).status_code == 403
    assert deployer.post(f"/environments/prepan/channels/{channel.pk}/edit/", {"name": "team", "kind": "email",
                                                                               "recipients": "evil@example.com"}).status_code == 403
    assert deployer.post(f"/environments/prepan/channels/{channel.pk}/delete/").status_code == 403

    viewer = signed_in(client, "viewer", name="vic")
    assert "Send test" not in viewer.get("/environments/prepan/").content.decode()
    assert viewer.post(f"/environments/prepan/channels/{channel.pk}/test/").status_code == 403
    assert viewer.get("/environments/prepan/deliveries/").status_code == 200  # what the page shows them already
    assert signed_in(client, name="nobody").get("/environments/prepan/deliveries/").status_code == 403
    channel.refresh_from_db()
    assert channel.recipients == "a@example.com" and not Notification.objects.exists()

    with pytest.raises(services.NotAllowed):
        services.channel_test(channel=channel, actor=person("ann", "approver"))


@pytest.mark.django_db
def test_a_maintainer_or_a_deployer_of_the_environment_sends_a_test_and_a_deployer_outside_its_groups_cannot(
        client, environment):  # noqa: F811
    from django.contrib.auth.models import Group

    channel = NotificationChannel.objects.create(environment=environment, name="team", kind="email", recipients="a@example.com")
    managers = Group.objects.create(name="release-managers")
    environment.deploy_groups.add(managers)
    inside = person("dana", "deployer")
    inside.groups.add(managers)

    outside = signed_in(client, "deployer", "viewer", name="otto").post(f"/environments/prepan/channels/{channel.pk}/test/")
    assert outside.status_code == 403 and not Notification.objects.exists()
    for user in (inside, person("mia", "maintainer")):
        client.force_login(user)
        response = client.post(f"/environments/prepan/channels/{channel.pk}/test/")
        assert response.status_code == 302 and response["Location"] == "/environments/prepan/"
    assert sorted(AuditEvent.objects.filter(action="channel.test").values_list("actor_name", flat=True)) == ["dana", "mia"]


def delivery_rows(fragment: str) -> list[tuple[str, str]]:
    """(status, the row's HTML) of each delivery the environment page's deliveries fragment lists, newest first."""
    return [(chunk.split('"', 1)[0], chunk.split("</tr>", 1)[0]) for chunk in fragment.split('<tr class="delivery-')[1:]]


POLLS = 'hx-get="/environments/prepan/deliveries/" hx-trigger="load delay:2s"'


@pytest.mark.django_db(transaction=True)
def test_send_test_answers_at_once_and_the_page_follows_its_delivery_until_it_is_sent(
        client, environment, celery_worker, held_receiver):  # noqa: F811
    hook = NotificationChannel.objects.create(environment=environment, name="hook", kind="webhook",
                                              url=held_receiver.url + "/hook", secret=HOOK_SECRET)
    deployer = signed_in(client, "deployer", "viewer", name="dana")

    response = deployer.post(f"/environments/prepan/channels/{hook.pk}/test/")

    # the answer came back while the receiver holds the test unanswered: the request waited for nobody
    assert not held_receiver.hold.is_set()
    assert response.status_code == 302 and response["Location"] == "/environments/prepan/"
    assert hook.deliveries.get().status in ("pending", "sending")
    page = deployer.get(response["Location"]).content.decode()
    assert "Test queued for hook" in page and POLLS in page
    [(status, _)] = delivery_rows(page)
    assert status in ("pending", "sending")

    held_receiver.arrived.wait(30)  # the worker is sending it, and the receiver holds its answer
    fragment = deployer.get("/environments/prepan/deliveries/").content.decode()
    assert [status for status, _ in delivery_rows(fragment)] == ["sending"] and POLLS in fragment

    held_receiver.hold.set()
    fragment = wait_for(lambda: (f := deployer.get("/environments/prepan/deliveries/").content.decode())
                        and delivery_rows(f)[0][0] != "sending" and f, 30, 0.2, "the test's row to say how it went")
    [(status, row)] = delivery_rows(fragment)
    assert status == "sent" and "<td>hook</td>" in row
    assert "hx-trigger" not in fragment  # nothing on its way: the page stops asking
    [(_, body)] = held_receiver.at("/hook")
    payload = json.loads(body)
    assert payload["event"] == "test" and payload["release"] is None and payload["actor"] == "dana"


@pytest.mark.django_db(transaction=True)
def test_in_the_browser_the_test_s_row_turns_sent_without_a_reload(environment, web_server, browser, held_receiver):  # noqa: F811
    from tests.test_browser import sign_in

    NotificationChannel.objects.create(environment=environment, name="hook", kind="webhook", url=held_receiver.url + "/hook",
                                       secret=HOOK_SECRET)
    person("dana", "deployer", "viewer")
    page = sign_in(browser, web_server, "dana")
    page.goto(f"{web_server}/environments/prepan/")

    page.get_by_role("button", name="Send test").click()
    page.wait_for_selector("text=Test queued for hook")
    page.evaluate("window.sameDocument = true")
    held_receiver.arrived.wait(30)
    assert page.locator("#environment-deliveries tr.delivery-sent").count() == 0
    held_receiver.hold.set()

    page.wait_for_selector("#environment-deliveries tr.delivery-sent", timeout=30_000)
    assert page.evaluate("window.sameDocument") is True  # htmx replaced the rows: the page was not loaded again
    assert page.csp_violations == []


@pytest.mark.django_db
@pytest.mark.parametrize("due_in, status, asks_in", [
    (30, "pending", "30s"),  # waiting for its retry: asked again when it is due
    (600, "pending", "60s"),  # not before a minute passes, at the latest
    (0.5, "pending", "2s"),  # not more often than every 2 s
    (30, "sending", "2s"),  # on its way now
])
def test_the_deliveries_are_asked_for_again_when_the_soonest_retry_is_due(client, environment, due_in, status, asks_in):  # noqa: F811
    hook = NotificationChannel.objects.create(environment=environment, name="hook", kind="webhook",
                                              url="https://hooks.example.com/x", secret=HOOK_SECRET)
    notification = Notification.objects.create(key="test:1", event="test", environment=environment)
    Delivery.objects.create(notification=notification, channel=hook, channel_name="hook", status=status, attempts=1,
                            next_attempt_at=timezone.now() + timedelta(seconds=due_in))

    fragment = signed_in(client, "viewer").get("/environments/prepan/deliveries/").content.decode()

    assert f'hx-trigger="load delay:{asks_in}"' in fragment


@pytest.mark.django_db(transaction=True)
def test_a_test_to_a_receiver_that_is_down_is_tried_once_and_its_row_says_why(client, environment, celery_worker):  # noqa: F811
    dead = NotificationChannel.objects.create(environment=environment, name="dead", kind="webhook",
                                              url=f"http://127.0.0.1:{free_port()}/hook", secret=HOOK_SECRET)
    deployer = signed_in(client, "deployer", "viewer", name="dana")

    page = deployer.post(f"/environments/prepan/channels/{dead.pk}/test/", follow=True).content.decode()
    assert "Test queued for dead" in page

    fragment = wait_for(lambda: (f := deployer.get("/environments/prepan/deliveries/").content.decode())
                        and "hx-trigger" not in f and f, 30, 0.2, "the test's row to say how it went")
    [(status, row)] = delivery_rows(fragment)
    assert status == "failed" and "could not post to 127.0.0.1:" in row
    delivery = dead.deliveries.get()
    assert delivery.status == "failed" and delivery.attempts == 1  # a test is tried once: someone is watching
    assert AuditEvent.objects.filter(action="channel.test", actor_name="dana").count() == 1


# -- whole releases on the sandbox, the real worker sending ----------------------------------------


@pytest.fixture
def prepan(release_sandbox, celery_worker):
    imported = services.environment_import_sandbox(info=release_sandbox.info)
    imported.channels.all().delete()  # the sandbox's own (to its inbox): each test here says where everything goes
    return imported


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


@pytest.fixture
def ravi():
    return person("ravi", "approver")


def decide(user, release_id: int, key: str, decision: str, comment: str) -> None:
    response = api(user).post(f"/api/releases/{release_id}/gates/{key}/{decision}", {"comment": comment}, format="json")
    assert response.status_code == 200, response.json()


def other_revision(where: Environment) -> str:
    [serving] = revisions_behind(where.public_url)
    return "v2" if serving == "v1" else "v1"


def expect_exactly(release_id: int, received, events: list[str], decisions: list[str]) -> None:
    receiver, mailbox = received
    channels = NotificationChannel.objects.filter(environment__releases=release_id).count()
    wait_for(lambda: all_sent(release_id, len(events) * channels), 60, 0.2, "every delivery of the release")
    webhook, slack, mail = events_of(release_id, receiver, mailbox)
    assert webhook == Counter(events)
    assert sorted(slack.elements()) == sorted(subject.removeprefix("[greenlight] ") for subject in mail.elements())
    assert sum(slack.values()) == sum(mail.values()) == len(events)
    bodies = hooks(receiver, release_id)
    assert sorted(p["gate"]["decision"] for p in bodies if p["event"] == "gate.decided") == sorted(decisions)
    assert len({p["id"] for p in bodies}) == len(bodies)  # one delivery each, never twice
    assert all(d.attempts == 1 for d in Delivery.objects.filter(notification__release_id=release_id, channel__name__in=["team", "slack", "hook"]))


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
def test_a_release_with_both_gates_approved_tells_each_channel_exactly_five_things(prepan, dana, ravi, received):
    channels_for(prepan, received[0])
    release_id = start(dana, other_revision(prepan))
    wait_gate(release_id, "verify_directly")
    decide(ravi, release_id, "verify_directly", "approve", "looks good")
    wait_gate(release_id, "swap_elb")
    decide(ravi, release_id, "swap_elb", "approve", "swap it")
    wait_status(release_id, Release.Status.SUCCEEDED)

    expect_exactly(release_id, received, ["gate.opened", "gate.opened", "gate.decided", "gate.decided", "release.succeeded"],
                   ["approved", "approved"])
    receiver, mailbox = received
    opened = [p for p in hooks(receiver, release_id) if p["event"] == "gate.opened"]
    assert {p["gate"]["key"] for p in opened} == {"verify_directly", "swap_elb"}
    assert all(p["release"]["started_by"] == "dana" and p["gate"]["deadline"] for p in opened)
    decided = {p["gate"]["key"]: p for p in hooks(receiver, release_id) if p["event"] == "gate.decided"}
    assert decided["swap_elb"]["actor"] == "ravi" and decided["swap_elb"]["gate"]["comment"] == "swap it"
    mail = next(m for m in mailbox.all() if "waits for verify_directly" in subject(m))
    assert subject(mail).startswith(f"[greenlight] prepan: release #{release_id} v")
    assert sorted(mail["X-Envelope-To"].split(", ")) == ["dana@example.com", "ops@example.com"]
    assert f"/releases/{release_id}/" in mail.get_body(("plain",)).get_content()


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
def test_a_rejected_release_is_told_and_a_receiver_that_is_down_is_retried_and_recorded_while_it_rolls_back(
        prepan, dana, ravi, received):
    dead_url = f"http://127.0.0.1:{free_port()}/hooks/dead-secret-path"
    dead = NotificationChannel.objects.create(environment=prepan, name="down", kind="webhook", url=dead_url, secret=HOOK_SECRET)
    channels_for(prepan, received[0])
    release_id = start(dana, other_revision(prepan))
    wait_gate(release_id, "verify_directly")
    decide(ravi, release_id, "verify_directly", "reject", "not right")

    wait_status(release_id, Release.Status.ROLLED_BACK)

    expect_exactly(release_id, received, ["gate.opened", "gate.decided", "release.rolled_back"], ["rejected"])
    down = list(dead.deliveries.all())
    assert len(down) == 3 and all(d.status == "failed" and d.attempts == 3 for d in down)  # NOTIFY_ATTEMPTS, tests/conftest.py
    assert all("127.0.0.1:" in d.last_error and "dead-secret-path" not in d.last_error for d in down)
    rolled_back = next(p for p in hooks(received[0], release_id) if p["event"] == "release.rolled_back")
    assert "rejected by ravi: not right" in rolled_back["text"]


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
def test_a_gate_nobody_decides_is_reminded_of_then_expires_and_the_release_rolls_back(prepan, dana, received):
    # the reminder is due a second after the gate opens; the sweep (every second here) sends it, then the deadline comes
    Environment.objects.filter(pk=prepan.pk).update(gate_timeout=8, gate_reminder=7)
    channels_for(prepan, received[0])
    release_id = start(dana, other_revision(prepan))

    wait_status(release_id, Release.Status.ROLLED_BACK)

    expect_exactly(release_id, received, ["gate.opened", "gate.expiring", "gate.decided", "release.rolled_back"], ["expired"])
    assert Release.objects.get(pk=release_id).steps.get(key="verify_directly").reminded_at is not None
