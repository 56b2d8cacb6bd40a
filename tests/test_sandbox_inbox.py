"""The sandbox's inbox: a real mail catcher and a Slack / webhook receiver on loopback.

Mail goes in over SMTP (smtplib, and Django's own SMTP backend), Slack
messages and webhooks over HTTP, as Greenlight sends them; what they left is
read back from /messages.json and from the page a person reads.
"""

import hashlib
import hmac
import http.client
import json
import os
import smtplib
import tempfile
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from django.core.mail import EmailMultiAlternatives, get_connection

from releases import notifications, services
from releases.models import AuditEvent, NotificationChannel
from tests.helpers import SandboxProcess

pytestmark = pytest.mark.sandbox
HOSTILE = "<script>alert(1)</script>"
SHOTS = Path(os.environ.get("SCREENSHOTS") or tempfile.mkdtemp(prefix="greenlight-screenshots-"))
RELEASE_URL = "http://127.0.0.1:8000/releases/12/"


def channels(info: dict, environment: str = "prepan") -> dict:
    return {c["kind"]: c for c in info["inbox"]["channels"][environment]}


def messages(info: dict, kind: str | None = None) -> list[dict]:
    response = requests.get(info["inbox"]["messages_url"], params={"kind": kind} if kind else None, timeout=5)
    assert response.status_code == 200
    return response.json()["messages"]


def send_email(info: dict, subject: str, body: str, to: str = "ops@example.com") -> None:
    message = EmailMessage()
    message["From"] = "Greenlight <greenlight@example.com>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    with smtplib.SMTP(info["inbox"]["smtp_host"], info["inbox"]["smtp_port"], timeout=10) as smtp:
        smtp.send_message(message)


def slack_message(text: str) -> dict:
    """A Slack incoming webhook's JSON as Greenlight sends it: a fallback text, a section and a button."""
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*prepan*: {text}"}},
            {"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": "Open the release"},
                                              "url": RELEASE_URL, "style": "primary"}]},
        ],
    }


def post_webhook(url: str, secret: str, payload: dict, *, delivery: str, event: str = "gate.opened") -> requests.Response:
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return requests.post(url, data=body, timeout=5, headers={
        "Content-Type": "application/json", "X-Greenlight-Event": event, "X-Greenlight-Delivery": delivery,
        "X-Greenlight-Signature": signature})


def test_it_keeps_an_email_a_slack_message_and_webhooks_and_shows_them_escaped(sandbox):
    info = sandbox.info
    inbox, ours = info["inbox"], channels(info)
    assert inbox["smtp"] == f"{inbox['smtp_host']}:{inbox['smtp_port']}" and inbox["email_url"] == f"smtp://{inbox['smtp']}"
    assert ours["email"]["recipients"] == "ops@example.com"

    send_email(info, f"[greenlight] prepan: release #12 waits {HOSTILE}", f"Open {RELEASE_URL}\n{HOSTILE}")
    slack = requests.post(ours["slack"]["url"], json=slack_message(f"release #12 v2 waits for verify_directly {HOSTILE}"), timeout=5)
    payload = {"event": "gate.opened", "release": {"id": 12, "revision": "v2"}, "text": HOSTILE}
    signed = post_webhook(ours["webhook"]["url"], ours["webhook"]["secret"], payload, delivery="d-signed")
    forged = post_webhook(ours["webhook"]["url"], "not-the-secret", payload, delivery="d-forged")
    unsigned = requests.post(ours["webhook"]["url"], json=payload, timeout=5, headers={"X-Greenlight-Event": "gate.opened"})

    assert (slack.status_code, slack.text) == (200, "ok")  # as Slack answers
    assert (signed.status_code, forged.status_code, unsigned.status_code) == (200, 401, 401)

    received = messages(info)
    assert [m["id"] for m in received] == sorted((m["id"] for m in received), reverse=True)  # newest first
    email = next(m for m in received if m["kind"] == "email" and HOSTILE in m["subject"])
    assert email["from"] == "Greenlight <greenlight@example.com>" and email["to"] == "ops@example.com"
    assert email["recipients"] == ["ops@example.com"] and email["body"] == f"Open {RELEASE_URL}\n{HOSTILE}\n"
    assert email["at"]
    slacked = next(m for m in received if m["kind"] == "slack" and HOSTILE in m["payload"]["text"])
    assert slacked["name"] == "prepan" and slacked["payload"]["blocks"][1]["elements"][0]["url"] == RELEASE_URL
    hooks = {m["delivery"]: m for m in messages(info, "webhook") if m["delivery"] in ("d-signed", "d-forged")}
    assert hooks["d-signed"]["signature_valid"] is True and hooks["d-signed"]["payload"] == payload
    assert hooks["d-signed"]["event"] == "gate.opened" and hooks["d-signed"]["name"] == "prepan"
    assert hooks["d-forged"]["signature_valid"] is False
    assert any(m["signature"] == "missing" for m in messages(info, "webhook"))
    assert {m["kind"] for m in messages(info, "email")} == {"email"}

    page = requests.get(inbox["url"], timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src" not in page.headers["Content-Security-Policy"] and "default-src 'none'" in page.headers["Content-Security-Policy"]
    text = page.text
    assert HOSTILE not in text and "<script" not in text  # escaped everywhere, and the page itself runs nothing
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    for shown in ("[greenlight] prepan: release #12 waits", "Greenlight &lt;greenlight@example.com&gt;", "ops@example.com",
                  "release #12 v2 waits for verify_directly", "<b>prepan</b>", "Open the release",
                  f'href="{RELEASE_URL}"', "gate.opened", "d-signed", "signature valid", "signature INVALID"):
        assert shown in text, shown
    assert text.index("d-forged") < text.index("d-signed") < text.index("release #12 v2 waits")  # newest first
    assert ours["webhook"]["secret"] not in text and ours["webhook"]["secret"] not in json.dumps(messages(info))
    assert ours["webhook"]["secret"] not in sandbox.log.read_text()


def test_django_mail_reaches_the_catcher(sandbox):
    """What Greenlight's own mail goes through (EMAIL_URL=smtp://...) speaks with the catcher."""
    from django.core import mail

    inbox = sandbox.info["inbox"]
    connection = mail.get_connection("django.core.mail.backends.smtp.EmailBackend", host=inbox["smtp_host"], port=inbox["smtp_port"])
    message = mail.EmailMultiAlternatives("Déploiement prêt", "Le corps: ünïcødé", "greenlight@example.com",
                                          ["ops@example.com"], bcc=["audit@example.com"], connection=connection)
    message.attach_alternative("<p>Le <b>corps</b></p>", "text/html")
    message.send()

    [kept] = [m for m in messages(sandbox.info, "email") if m["subject"] == "Déploiement prêt"]
    assert kept["body"].strip() == "Le corps: ünïcødé" and kept["html"].strip() == "<p>Le <b>corps</b></p>"
    assert sorted(kept["recipients"]) == ["audit@example.com", "ops@example.com"]
    page = requests.get(sandbox.info["inbox"]["url"], params={"kind": "email"}, timeout=5).text
    # the HTML part is shown in a frame that runs nothing, never inline
    assert 'sandbox="" referrerpolicy="no-referrer" title="HTML part" srcdoc="&lt;p&gt;Le &lt;b&gt;corps&lt;/b&gt;&lt;/p&gt;' in page


def test_what_slack_would_refuse_is_refused_and_bad_addresses_are_not_found(sandbox):
    ours = channels(sandbox.info)
    base = sandbox.info["inbox"]["url"]

    not_json = requests.post(ours["slack"]["url"], data=b"{not json", headers={"Content-Type": "application/json"}, timeout=5)
    no_text = requests.post(ours["slack"]["url"], json={"channel": "#ops"}, timeout=5)
    form = requests.post(ours["slack"]["url"], data={"payload": json.dumps({"text": "from a form"})}, timeout=5)

    assert (not_json.status_code, not_json.text) == (400, "invalid_payload")
    assert (no_text.status_code, no_text.text) == (400, "no_text")
    assert (form.status_code, form.text) == (200, "ok")
    assert requests.post(f"{base}elsewhere/prepan", json={}, timeout=5).status_code == 404
    assert requests.post(f"{base}hooks/..%2Fx", json={}, timeout=5).status_code == 404
    assert requests.get(f"{base}nothing", timeout=5).status_code == 404
    too_large = http.client.HTTPConnection(sandbox.info["inbox"]["smtp_host"], urlsplit(base).port, timeout=5)
    too_large.request("POST", "/hooks/prepan", headers={"Content-Length": "1000001"})  # said, never sent: refused first
    assert too_large.getresponse().status == 413
    too_large.close()
    refused = [m.get("refused") for m in messages(sandbox.info, "slack")[:3]]
    assert refused == [None, "no_text", "invalid_payload"]  # kept, and shown as refused
    assert "Refused with 400" in requests.get(base, timeout=5).text


def test_what_it_received_and_its_secrets_survive_a_restart(tmp_path):
    process = SandboxProcess(tmp_path, seed=False)
    first = process.start()
    try:
        ours = channels(first)
        assert post_webhook(ours["webhook"]["url"], ours["webhook"]["secret"], {"n": 1}, delivery="before").status_code == 200
    finally:
        assert process.stop() == 0
    assert not (tmp_path / "state" / "inbox-key").stat().st_mode & 0o077

    second = process.start()
    try:
        again = channels(second)
        assert again["webhook"]["secret"] == ours["webhook"]["secret"]  # the channels stored in Greenlight still verify
        assert [m["delivery"] for m in messages(second, "webhook")] == ["before"]
        assert post_webhook(again["webhook"]["url"], again["webhook"]["secret"], {"n": 2}, delivery="before").status_code == 200
        repeat = messages(second, "webhook")[0]
        assert repeat["again"] is True  # the same delivery twice: shown as such, for a receiver to ignore
        # another hook name has a secret of its own
        other = post_webhook(again["webhook"]["url"].replace("/hooks/prepan", "/hooks/alpha"), again["webhook"]["secret"], {},
                             delivery="other")
        assert other.status_code == 401
    finally:
        assert process.stop() == 0


@pytest.mark.django_db
def test_the_import_points_prepan_at_the_inbox_and_keeps_what_a_person_changed(sandbox):
    info = sandbox.info
    ours = channels(info)

    environment = services.environment_import_sandbox(info=info)

    stored = {c.kind: c for c in NotificationChannel.objects.filter(environment=environment)}
    assert set(stored) == {"email", "slack", "webhook"}
    assert stored["email"].recipients == "ops@example.com"
    assert stored["slack"].url == ours["slack"]["url"]
    assert (stored["webhook"].url, stored["webhook"].secret) == (ours["webhook"]["url"], ours["webhook"]["secret"])
    assert all(c.enabled and c.events == [] for c in stored.values())  # every event
    recorded = AuditEvent.objects.filter(action="environment.import").latest("id")
    assert sorted(recorded.details["channels"]) == ["sandbox-email", "sandbox-slack", "sandbox-webhook"]
    assert ours["webhook"]["secret"] not in json.dumps(recorded.details) and ours["slack"]["url"] not in json.dumps(recorded.details)

    # imported again (a restarted sandbox): where they go is set again, what a person chose stays
    stored["slack"].enabled, stored["slack"].events, stored["slack"].url = False, ["gate.opened"], "http://127.0.0.1:1/old"
    stored["slack"].save()
    services.environment_import_sandbox(info=info)
    slack = NotificationChannel.objects.get(pk=stored["slack"].pk)
    assert (slack.enabled, slack.events, slack.url) == (False, ["gate.opened"], ours["slack"]["url"])
    assert NotificationChannel.objects.filter(environment=environment).count() == 3


@pytest.fixture(scope="module")
def quiet_inbox(tmp_path_factory):
    """An inbox of its own (no environment seeded), for a page with only what this module sends."""
    with SandboxProcess(tmp_path_factory.mktemp("inbox"), seed=False) as process:
        yield process


def test_the_page_in_a_browser_shows_the_slack_button_and_the_email(quiet_inbox, browser):
    """Also the README's screenshot: $SCREENSHOTS/inbox.png (`make screenshots`), else a temporary folder."""
    info = quiet_inbox.info
    # what Greenlight sends when a gate opens, in its own formats (releases/notifications.py)
    payload = {
        "event": "gate.opened", "actor": None,
        "environment": {"name": "prepan", "url": "http://127.0.0.1:8000/environments/prepan/"},
        "release": {"id": 12, "url": RELEASE_URL, "revision": "v2", "strategy": "bake", "status": "awaiting_approval",
                    "started_by": "dana", "error": "", "failed_step": None},
        "gate": {"key": "verify_directly", "status": "awaiting_approval", "opened_at": "2026-11-29T13:05:00Z",
                 "deadline": "2026-11-29T14:05:00Z", "assignee": None, "decision": None, "comment": "", "approvals": [],
                 "may_decide": {"groups": ["release-managers"], "approvals_required": 2, "not": "dana"}},
    }
    payload["text"] = notifications.headline(payload)
    subject, text, html = notifications.email_message(payload)
    mail = EmailMultiAlternatives(subject, text, "Greenlight <greenlight@example.com>", ["ops@example.com"],
                                  connection=get_connection("django.core.mail.backends.smtp.EmailBackend",
                                                            host=info["inbox"]["smtp_host"], port=info["inbox"]["smtp_port"]))
    mail.attach_alternative(html, "text/html")
    mail.send()
    requests.post(channels(info)["slack"]["url"], data=notifications.slack_body(payload), timeout=5,
                  headers={"Content-Type": "application/json"}).raise_for_status()

    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        page.goto(info["inbox"]["url"])
        button = page.locator("a.sbutton", has_text="Open release #12")
        assert button.get_attribute("href") == RELEASE_URL and button.is_visible()
        assert page.locator(".ssender b").first.inner_text() == "Greenlight"
        assert subject.startswith("[greenlight] prepan: release #12 v2 waits for verify_directly")
        assert subject in page.locator(".email .subject").inner_text()
        assert page.locator(".mailbody a").first.get_attribute("href") == RELEASE_URL
        assert page.locator("nav.kinds a.on").inner_text() == "Everything (2)"
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "inbox.png"), full_page=True)
        assert dialogs == []
    finally:
        context.close()
