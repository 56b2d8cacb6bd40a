"""The sandbox's inbox: a mail catcher and a Slack / webhook receiver, on loopback.

What a release tells people has to land somewhere a newcomer can see it,
with no mail server and no Slack workspace. The inbox is both:

- SMTP (aiosmtpd) on `smtp_port`: every message is accepted and kept.
- HTTP on `http_port`:
    POST /slack/<name>   a Slack incoming webhook (any name: one per channel).
                         Answers as Slack does: 200 "ok", 400 "invalid_payload"
                         or "no_text"; a refused message is kept and shown as refused.
    POST /hooks/<name>   a generic webhook. X-Greenlight-Signature is checked
                         against the secret the sandbox made for <name>
                         (`secret(name)`); 200 when it verifies, 401 when not,
                         kept either way and shown as valid or INVALID.
    GET  /               a page of everything received, newest first (?kind=email|slack|webhook)
    GET  /messages.json  the same as JSON, for tests and scripts

Everything received is kept in memory and in `inbox.json` in the sandbox's
directory (the last KEEP messages), so a restarted sandbox still shows it.
Each hook's secret derives from a key kept in `inbox-key` (0600) beside it,
so a restart keeps the secrets the environments were given. The page is for
people on this machine: everything on it is escaped, it loads nothing from
elsewhere, and it runs no script (its Content-Security-Policy says so).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import html
import json
import logging
import os
import re
import secrets
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from aiosmtpd.smtp import SMTP

log = logging.getLogger("sandbox.inbox")

KEEP = 500  # messages kept (in memory and in the file); the oldest go first
MAX_BODY = 1_000_000  # bytes: a POST or an email larger than this is refused
KINDS = ("email", "slack", "webhook")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
EMAIL_RECIPIENT = "ops@example.com"  # the seeded environments' email channel
SIGNATURE_HEADER = "X-Greenlight-Signature"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _key(path: Path) -> bytes:
    """The inbox's key, made once (0600) and kept: the secrets it derives outlive a restart."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def signature(secret: str, body: bytes) -> str:
    """X-Greenlight-Signature's value: "sha256=" + hex HMAC-SHA256(secret, raw body)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Inbox:
    def __init__(self, *, directory: Path, host: str = "127.0.0.1", smtp_port: int = 1025, http_port: int = 8025, keep: int = KEEP):
        self.directory = Path(directory)
        self.host = host
        self.smtp_port = smtp_port
        self.http_port = http_port
        self.keep = keep
        self.file = self.directory / "inbox.json"
        self.lock = threading.Lock()
        self.messages: list[dict] = []  # oldest first
        self.hooks: list[str] = []  # the names the seeded environments were given, for the page's help
        self._http: ThreadingHTTPServer | None = None
        self._smtp: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = _key(self.directory / "inbox-key")
        self._load()
        loop = asyncio.get_running_loop()
        try:
            self._smtp = await loop.create_server(
                lambda: SMTP(_MailHandler(self), hostname="greenlight-sandbox", data_size_limit=MAX_BODY, enable_SMTPUTF8=True),
                self.host, self.smtp_port)
        except OSError as exc:
            raise OSError(f"the inbox's SMTP port {self.host}:{self.smtp_port} is taken ({exc.strerror}); "
                          "--smtp-port 0 picks a free one") from None
        try:
            self._http = ThreadingHTTPServer((self.host, self.http_port), _handler_class(self))
        except OSError as exc:
            self._smtp.close()
            raise OSError(f"the inbox's page port {self.host}:{self.http_port} is taken ({exc.strerror}); "
                          "--inbox-port 0 picks a free one") from None
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="inbox-http", daemon=True)
        self._thread.start()
        log.info("inbox: mail to smtp://%s:%d, page at %s", *self.smtp_address, self.url)

    async def stop(self) -> None:
        if self._http:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout=5)
        if self._smtp:
            self._smtp.close()
            await self._smtp.wait_closed()

    # -- where it is -------------------------------------------------------------

    def _public_host(self, host: str) -> str:
        return "127.0.0.1" if host in ("0.0.0.0", "") else host

    @property
    def smtp_address(self) -> tuple[str, int]:
        host, port = self._smtp.sockets[0].getsockname()[:2]
        return self._public_host(host), port

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{self._public_host(host)}:{port}/"

    def secret(self, name: str) -> str:
        """The secret the webhook /hooks/<name> is verified with."""
        return hmac.new(self._key, f"webhook:{name}".encode(), hashlib.sha256).hexdigest()

    def channels(self, environment: str) -> list[dict]:
        """Ready-made notification channels for an environment, pointing here."""
        return [
            {"name": "sandbox-email", "kind": "email", "recipients": EMAIL_RECIPIENT},
            {"name": "sandbox-slack", "kind": "slack", "url": f"{self.url}slack/{environment}"},
            {"name": "sandbox-webhook", "kind": "webhook", "url": f"{self.url}hooks/{environment}", "secret": self.secret(environment)},
        ]

    def endpoints(self, environments: list[str]) -> dict:
        """The sandbox file's "inbox" object."""
        self.hooks = list(environments)
        host, port = self.smtp_address
        return {
            "url": self.url,
            "messages_url": f"{self.url}messages.json",
            "smtp": f"{host}:{port}",
            "smtp_host": host,
            "smtp_port": port,
            "email_url": f"smtp://{host}:{port}",
            "channels": {name: self.channels(name) for name in environments},
        }

    # -- what it received --------------------------------------------------------

    def _load(self) -> None:
        try:
            saved = json.loads(self.file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("inbox: %s is unreadable (%s); starting empty", self.file, exc)
            return
        self.messages = [m for m in saved.get("messages", []) if isinstance(m, dict) and m.get("kind") in KINDS][-self.keep:]

    def record(self, message: dict) -> dict:
        with self.lock:
            message = {"id": (self.messages[-1]["id"] + 1) if self.messages else 1, "at": _now(), **message}
            self.messages.append(message)
            del self.messages[:-self.keep]
            draft = self.file.with_suffix(".tmp")
            draft.write_text(json.dumps({"messages": self.messages}, indent=1) + "\n")
            draft.replace(self.file)
        log.info("inbox: %s #%d%s", message["kind"], message["id"], f" for {message['name']}" if message.get("name") else "")
        return message

    def received(self, kind: str | None = None) -> list[dict]:
        """Newest first."""
        with self.lock:
            return [m for m in reversed(self.messages) if kind in (None, m["kind"])]

    def _seen_delivery(self, delivery: str) -> bool:
        with self.lock:
            return bool(delivery) and any(m.get("delivery") == delivery for m in self.messages if m.get("signature_valid"))

    def mail(self, mail_from: str, recipients: list[str], content: bytes) -> dict:
        message = email.message_from_bytes(content, policy=email.policy.default)
        body, has_html, html_body = "", False, ""
        try:
            if part := message.get_body(preferencelist=("plain", "html")):
                body = part.get_content()
            if (part := message.get_body(preferencelist=("html",))) is not None:
                has_html, html_body = True, part.get_content()
        except (LookupError, ValueError, AttributeError):  # an unknown charset, a malformed part
            body = content.decode(errors="replace")
        body, html_body = (text.replace("\r\n", "\n") for text in (body, html_body))  # SMTP's line ends, as a reader shows them
        return self.record({
            "kind": "email",
            "from": str(message.get("From") or mail_from),
            "to": str(message.get("To") or ", ".join(recipients)),
            "recipients": list(recipients),
            "subject": str(message.get("Subject") or ""),
            "body": body,
            **({"html": html_body} if has_html else {}),
        })

    def slack(self, name: str, body: bytes, content_type: str) -> tuple[int, str]:
        """As Slack's incoming webhooks answer: (200, "ok"), or 400 with the reason."""
        text = body.decode(errors="replace")
        try:
            if content_type.startswith("application/x-www-form-urlencoded"):
                text = parse_qs(text).get("payload", [""])[0]
            payload = json.loads(text)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            self.record({"kind": "slack", "name": name, "refused": "invalid_payload", "raw": text[:10_000]})
            return 400, "invalid_payload"
        if not payload.get("text") and not payload.get("blocks") and not payload.get("attachments"):
            self.record({"kind": "slack", "name": name, "refused": "no_text", "payload": payload})
            return 400, "no_text"
        self.record({"kind": "slack", "name": name, "payload": payload})
        return 200, "ok"

    def webhook(self, name: str, body: bytes, headers) -> tuple[int, dict]:
        given = headers.get(SIGNATURE_HEADER, "")
        valid = bool(given) and hmac.compare_digest(given.encode(), signature(self.secret(name), body).encode())
        delivery = headers.get("X-Greenlight-Delivery", "")
        try:
            payload, raw = json.loads(body), None
        except ValueError:
            payload, raw = None, body.decode(errors="replace")[:10_000]
        self.record({
            "kind": "webhook",
            "name": name,
            "event": headers.get("X-Greenlight-Event", ""),
            "delivery": delivery,
            "again": valid and self._seen_delivery(delivery),  # a delivery sent twice: a receiver dedupes on its id
            "signature": "valid" if valid else ("missing" if not given else "invalid"),
            "signature_valid": valid,
            "payload": payload,
            **({"raw": raw} if raw is not None else {}),
        })
        if not valid:
            return 401, {"error": f"{SIGNATURE_HEADER} {'is missing' if not given else 'does not verify'}"}
        return 200, {"ok": True}


class _MailHandler:
    def __init__(self, inbox: Inbox):
        self.inbox = inbox

    async def handle_DATA(self, server, session, envelope):
        try:
            self.inbox.mail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content or envelope.content)
        except Exception:  # noqa: BLE001 -- one bad message must not stop the catcher
            log.exception("inbox: a message could not be kept")
            return "451 Requested action aborted: error in processing"
        return "250 Message accepted for delivery"


def _handler_class(inbox: Inbox):
    class Handler(BaseHTTPRequestHandler):
        server_version = "greenlight-sandbox-inbox"

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            # no script at all, nothing from elsewhere; an email's HTML part shows in a sandboxed frame
            self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                                        "frame-src 'self'; base-uri 'none'; form-action 'none'")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data) -> None:
            self._send(status, (json.dumps(data, indent=1) + "\n").encode(), "application/json")

        def do_GET(self):
            url = urlsplit(self.path)
            kind = parse_qs(url.query).get("kind", [None])[0]
            kind = kind if kind in KINDS else None
            if url.path == "/messages.json":
                return self._json(200, {"messages": inbox.received(kind)})
            if url.path == "/":
                page = render_page(inbox.received(), kind=kind, smtp=inbox.smtp_address, base=inbox.url, hooks=inbox.hooks)
                self._send(200, page.encode(), "text/html; charset=utf-8")
                return
            self._send(404, b"not found\n", "text/plain")

        do_HEAD = do_GET

        def do_POST(self):
            parts = urlsplit(self.path).path.strip("/").split("/")
            if len(parts) != 2 or parts[0] not in ("slack", "hooks") or not NAME.fullmatch(parts[1]):
                return self._send(404, b"POST /slack/<name> or /hooks/<name>\n", "text/plain")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True
                return self._send(413, b"too large\n", "text/plain")
            body = self.rfile.read(length)
            if parts[0] == "slack":
                status, text = inbox.slack(parts[1], body, self.headers.get("Content-Type", ""))
                return self._send(status, text.encode(), "text/plain")
            status, answer = inbox.webhook(parts[1], body, self.headers)
            self._json(status, answer)

        def log_message(self, format, *args):
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


# -- the page --------------------------------------------------------------------

def e(value) -> str:
    return html.escape(str(value if value is not None else ""), quote=True)


def _when(at: str) -> str:
    try:
        moment = datetime.fromisoformat(at)
    except (TypeError, ValueError):
        return e(at)
    return f'<time datetime="{e(at)}">{moment:%Y-%m-%d %H:%M:%S} UTC</time>'


_LINK = re.compile(r"<([^<>|\n]+)(?:\|([^<>\n]+))?>")
_BOLD = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)\*(?![\w*])")
_ITALIC = re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)_(?![\w_])")
_STRIKE = re.compile(r"(?<![\w~])~(?=\S)([^~\n]+?)~(?![\w~])")
_CODE = re.compile(r"`([^`\n]+)`")


def _safe_url(url: str) -> str | None:
    return url if urlsplit(url).scheme in ("http", "https", "mailto") else None


def _unslack(text: str) -> str:
    # Slack's senders escape these three; Slack shows them as they were
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _plain(text: str) -> str:
    out = e(_unslack(text))
    out = _CODE.sub(r"<code>\1</code>", out)
    out = _BOLD.sub(r"<b>\1</b>", out)
    out = _ITALIC.sub(r"<i>\1</i>", out)
    return _STRIKE.sub(r"<s>\1</s>", out)


def mrkdwn(text) -> str:
    """Slack's mrkdwn as HTML: <url|label> links, *bold*, _italic_, ~strike~, `code`, line breaks; all else escaped."""
    text, out, at = str(text or ""), [], 0
    for link in _LINK.finditer(text):
        out.append(_plain(text[at:link.start()]))
        target, label = _unslack(link.group(1)), link.group(2)
        if target.startswith(("@", "#", "!")):  # a mention: shown as Slack does, by its label or id
            out.append(f'<span class="mention">{e(_unslack(label or target))}</span>')
        elif url := _safe_url(target):
            out.append(f'<a href="{e(url)}">{e(_unslack(label or target))}</a>')
        else:
            out.append(e(link.group(0)))
        at = link.end()
    out.append(_plain(text[at:]))
    return "".join(out).replace("\n", "<br>")


def _text_object(obj) -> str:
    if isinstance(obj, str):
        return mrkdwn(obj)
    if not isinstance(obj, dict):
        return ""
    return mrkdwn(obj.get("text")) if obj.get("type") == "mrkdwn" else e(obj.get("text")).replace("\n", "<br>")


def _button(element: dict) -> str:
    label = _text_object(element.get("text"))
    style = element.get("style") if element.get("style") in ("primary", "danger") else ""
    if url := _safe_url(str(element.get("url") or "")):
        return f'<a class="sbutton {style}" href="{e(url)}">{label}</a>'
    return f'<span class="sbutton {style}" title="no link">{label}</span>'


def _block(block) -> str:
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "header":
        return f'<div class="sheader">{_text_object(block.get("text"))}</div>'
    if kind == "divider":
        return '<hr class="sdivider">'
    if kind == "section":
        parts = []
        if block.get("text"):
            parts.append(f'<div class="stext">{_text_object(block["text"])}</div>')
        if isinstance(block.get("fields"), list):
            parts.append('<div class="sfields">' + "".join(f"<div>{_text_object(f)}</div>" for f in block["fields"]) + "</div>")
        if isinstance(accessory := block.get("accessory"), dict) and accessory.get("type") == "button":
            parts.append(f'<div class="sactions">{_button(accessory)}</div>')
        return f'<div class="ssection">{"".join(parts)}</div>'
    if kind == "context":
        elements = block.get("elements") if isinstance(block.get("elements"), list) else []
        return '<div class="scontext">' + " ".join(_text_object(x) for x in elements if isinstance(x, dict) and x.get("type") != "image") + "</div>"
    if kind == "actions":
        elements = block.get("elements") if isinstance(block.get("elements"), list) else []
        return '<div class="sactions">' + "".join(_button(x) for x in elements if isinstance(x, dict) and x.get("type") == "button") + "</div>"
    return f'<div class="sunknown">({e(kind)} block)</div>'


def _attachment(attachment) -> str:
    if not isinstance(attachment, dict):
        return ""
    color = attachment.get("color", "")
    color = {"good": "#2eb67d", "warning": "#ecb22e", "danger": "#e01e5a"}.get(color, color)
    color = color if re.fullmatch(r"#[0-9A-Fa-f]{3,6}", str(color)) else "#dddddd"
    inner = "".join(_block(b) for b in attachment.get("blocks", []) if isinstance(attachment.get("blocks"), list))
    if attachment.get("title"):
        inner = f'<div class="stext"><b>{e(attachment["title"])}</b></div>' + inner
    if attachment.get("text"):
        inner += f'<div class="stext">{mrkdwn(attachment["text"])}</div>'
    # the color has a fixed shape (checked above), so it may go into a style attribute
    return f'<div class="sattachment"><span class="sbar" style="background:{e(color)}"></span>{inner}</div>'


def _slack(message: dict) -> str:
    payload = message.get("payload") if isinstance(message.get("payload"), dict) else {}
    sender = payload.get("username") or "Greenlight"
    if message.get("refused"):
        content = (f'<p class="refused">Refused with 400 <code>{e(message["refused"])}</code>, as Slack would: '
                   'an incoming webhook needs a JSON object with "text" or "blocks".</p>')
        content += f'<pre class="json">{e(message.get("raw") or json.dumps(payload, indent=2))}</pre>'
    else:
        blocks = payload.get("blocks") if isinstance(payload.get("blocks"), list) else []
        # Slack shows the blocks when there are any; "text" is then the notification's fallback
        content = "".join(_block(b) for b in blocks) if blocks else f'<div class="stext">{mrkdwn(payload.get("text"))}</div>'
        attachments = payload.get("attachments") if isinstance(payload.get("attachments"), list) else []
        content += "".join(_attachment(a) for a in attachments)
        if blocks and payload.get("text"):
            content += f'<div class="fallback">notification text: {mrkdwn(payload["text"])}</div>'
    return (
        f'<article class="card slack" id="m{e(message["id"])}">'
        f'<header><span class="kind">Slack</span> <span class="channel">#{e(message.get("name"))}</span>'
        f'<span class="at">{_when(message.get("at"))}</span></header>'
        '<div class="smessage"><div class="avatar" aria-hidden="true">G</div><div class="sbody">'
        f'<div class="ssender"><b>{e(sender)}</b> <span class="app">APP</span> '
        f'<span class="stime">{e(str(message.get("at", ""))[11:16])}</span></div>'
        f"{content}</div></div></article>"
    )


_URL = re.compile(r"https?://[^\s<>\"']+[^\s<>\"'.,;:!?)]")


def _linked(text) -> str:
    """Plain text, escaped, with its http(s) addresses as links (as a mail reader shows them)."""
    text, out, at = str(text or ""), [], 0
    for found in _URL.finditer(text):
        out.append(e(text[at:found.start()]))
        out.append(f'<a href="{e(found.group(0))}">{e(found.group(0))}</a>')
        at = found.end()
    return "".join(out) + e(text[at:])


def _email(message: dict) -> str:
    recipients = message.get("recipients") or []
    bcc = [r for r in recipients if r not in str(message.get("to", ""))]
    html_part = ""
    if message.get("html"):
        # the HTML part as a mail reader shows it: in a sandboxed frame that runs nothing and loads nothing
        html_part = ('<details><summary>HTML part</summary>'
                     f'<iframe sandbox="" referrerpolicy="no-referrer" title="HTML part" srcdoc="{e(message["html"])}"></iframe></details>')
    return (
        f'<article class="card email" id="m{e(message["id"])}">'
        f'<header><span class="kind">Email</span> <span class="subject">{e(message.get("subject")) or "(no subject)"}</span>'
        f'<span class="at">{_when(message.get("at"))}</span></header>'
        '<dl class="headers">'
        f'<dt>From</dt><dd>{e(message.get("from"))}</dd>'
        f'<dt>To</dt><dd>{e(message.get("to"))}</dd>'
        + (f'<dt>Bcc</dt><dd>{e(", ".join(bcc))}</dd>' if bcc else "")
        + f'<dt>Subject</dt><dd>{e(message.get("subject"))}</dd>'
        f'</dl><pre class="mailbody">{_linked(message.get("body"))}</pre>{html_part}</article>'
    )


def _webhook(message: dict) -> str:
    valid = message.get("signature_valid")
    verdict = ('<span class="ok">signature valid</span>' if valid else
               f'<span class="bad">signature INVALID</span> <span class="why">({e(message.get("signature"))}; answered 401)</span>')
    body = json.dumps(message["payload"], indent=2, ensure_ascii=False) if message.get("payload") is not None else message.get("raw", "")
    return (
        f'<article class="card webhook" id="m{e(message["id"])}">'
        f'<header><span class="kind">Webhook</span> <span class="event">{e(message.get("event")) or "(no X-Greenlight-Event)"}</span>'
        f'<span class="at">{_when(message.get("at"))}</span></header>'
        '<dl class="headers">'
        f'<dt>To</dt><dd><code>POST /hooks/{e(message.get("name"))}</code></dd>'
        f'<dt>Delivery</dt><dd><code>{e(message.get("delivery")) or "-"}</code>'
        + (' <span class="again">sent before: a receiver ignores this one</span>' if message.get("again") else "")
        + f'</dd><dt>Signature</dt><dd>{verdict}</dd></dl>'
        f'<pre class="json">{e(body)}</pre></article>'
    )


RENDER = {"email": _email, "slack": _slack, "webhook": _webhook}

STYLE = """
:root { color-scheme: light; --ink: #1d1c1d; --muted: #616061; --line: #e2e2e2; --bg: #f4f5f7; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--ink); background: var(--bg); }
.top { background: #1f2933; color: #fff; padding: 14px 24px; display: flex; align-items: baseline; gap: 18px; flex-wrap: wrap; }
.top h1 { font-size: 18px; margin: 0; font-weight: 700; }
.top .where { color: #cbd2d9; font-size: 13px; }
.top a { color: #fff; }
.top code { color: #fff; background: rgba(255,255,255,.12); padding: 1px 5px; border-radius: 4px; }
main { max-width: 920px; margin: 0 auto; padding: 18px 24px 48px; }
nav.kinds { display: flex; gap: 8px; margin: 0 0 16px; flex-wrap: wrap; }
nav.kinds a { text-decoration: none; color: var(--ink); background: #fff; border: 1px solid var(--line); border-radius: 16px; padding: 3px 12px; font-size: 13px; }
nav.kinds a.on { background: #1f2933; color: #fff; border-color: #1f2933; }
.empty { color: var(--muted); background: #fff; border: 1px dashed #c8c8c8; border-radius: 8px; padding: 24px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; margin: 0 0 14px; overflow: hidden; box-shadow: 0 1px 2px rgba(0,0,0,.04); }
.card > header { display: flex; gap: 10px; align-items: baseline; padding: 9px 14px; border-bottom: 1px solid var(--line); background: #fafafa; }
.card > header .at { margin-left: auto; color: var(--muted); font-size: 12px; white-space: nowrap; }
.kind { font-size: 11px; font-weight: 700; text-transform: uppercase; letter-spacing: .04em; padding: 2px 7px; border-radius: 4px; color: #fff; }
.email .kind { background: #3f6ad8; } .slack .kind { background: #4a154b; } .webhook .kind { background: #0f766e; }
.subject, .event, .channel { font-weight: 600; overflow-wrap: anywhere; }
dl.headers { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; padding: 10px 14px; font-size: 13px; }
dl.headers dt { color: var(--muted); } dl.headers dd { margin: 0; overflow-wrap: anywhere; }
pre { margin: 0; padding: 12px 14px; white-space: pre-wrap; overflow-wrap: anywhere; font: 13px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre.mailbody { border-top: 1px solid var(--line); font-family: inherit; font-size: 14px; }
pre.json { background: #f6f8fa; border-top: 1px solid var(--line); }
details { border-top: 1px solid var(--line); padding: 8px 14px; } summary { cursor: pointer; color: var(--muted); font-size: 13px; }
iframe { width: 100%; height: 320px; border: 1px solid var(--line); border-radius: 4px; margin-top: 8px; background: #fff; resize: vertical; }
.ok { color: #13734b; font-weight: 700; } .bad { color: #c01c28; font-weight: 700; } .why, .again { color: var(--muted); font-size: 12px; }
.smessage { display: flex; gap: 10px; padding: 12px 14px; }
.avatar { flex: none; width: 36px; height: 36px; border-radius: 6px; background: #2eb67d; color: #fff; font-weight: 800; display: grid; place-items: center; }
.sbody { min-width: 0; flex: 1; }
.ssender b { font-weight: 900; } .app { font-size: 10px; font-weight: 700; color: var(--muted); background: #e8e8e8; border-radius: 3px; padding: 1px 4px; }
.stime { color: var(--muted); font-size: 12px; margin-left: 4px; }
.stext, .ssection { margin: 2px 0 6px; overflow-wrap: anywhere; }
.sheader { font-weight: 900; font-size: 17px; margin: 4px 0; }
.sfields { display: grid; grid-template-columns: 1fr 1fr; gap: 6px 16px; margin: 6px 0; }
.scontext { color: var(--muted); font-size: 12px; margin: 4px 0; }
.sdivider { border: 0; border-top: 1px solid var(--line); margin: 8px 0; }
.sactions { display: flex; gap: 8px; margin: 8px 0 2px; flex-wrap: wrap; }
.sbutton { display: inline-block; padding: 4px 12px; border: 1px solid #bbbabb; border-radius: 4px; color: var(--ink); font-weight: 700; font-size: 14px; text-decoration: none; background: #fff; }
.sbutton.primary { background: #007a5a; border-color: #007a5a; color: #fff; } .sbutton.danger { background: #e01e5a; border-color: #e01e5a; color: #fff; }
.sattachment { position: relative; padding-left: 14px; margin: 6px 0; } .sbar { position: absolute; left: 0; top: 0; bottom: 0; width: 4px; border-radius: 2px; background: #ddd; }
.smessage a { color: #1264a3; } .mention { color: #1264a3; background: #e8f5fa; border-radius: 3px; padding: 0 2px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f2f2f2; border-radius: 3px; padding: 0 3px; color: #c01343; }
.fallback { color: var(--muted); font-size: 12px; border-top: 1px dashed var(--line); margin-top: 8px; padding-top: 4px; }
.refused { color: #c01c28; margin: 4px 0; }
"""


def render_page(messages: list[dict], *, kind: str | None, smtp: tuple[str, int], base: str, hooks: list[str]) -> str:
    counts = {k: sum(1 for m in messages if m["kind"] == k) for k in KINDS}
    shown = [m for m in messages if kind in (None, m["kind"])]
    tabs = [("", "Everything", len(messages))] + [(k, {"email": "Emails", "slack": "Slack", "webhook": "Webhooks"}[k], counts[k]) for k in KINDS]
    nav = "".join(f'<a class="{"on" if (k or None) == kind else ""}" href="/{f"?kind={k}" if k else ""}">{label} ({n})</a>'
                  for k, label, n in tabs)
    hook = hooks[0] if hooks else "NAME"
    where = (f'mail: <code>smtp://{e(smtp[0])}:{e(smtp[1])}</code> &middot; Slack: <code>POST {e(base)}slack/{e(hook)}</code> '
             f'&middot; webhooks: <code>POST {e(base)}hooks/{e(hook)}</code> &middot; <a href="/messages.json">JSON</a>')
    body = "".join(RENDER[m["kind"]](m) for m in shown) or (
        '<p class="empty">Nothing yet. Start a release of an environment whose notifications point here '
        "(the demo's <b>prepan</b> does), or send a channel's <b>Send test</b>.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="10">
<title>Sandbox inbox ({len(messages)})</title>
<style>{STYLE}</style></head>
<body><div class="top"><h1>Sandbox inbox</h1><span class="where">{where}</span></div>
<main><nav class="kinds">{nav}</nav>
{body}
</main></body></html>
"""
