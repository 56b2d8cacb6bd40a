"""Sending notifications: email through Django's mail settings, and a JSON
POST for Slack incoming webhooks and generic webhooks.

Plain values in, nothing or one AdapterError out. A webhook URL is a
credential (a Slack one carries its secret in the path), so no message here
ever names more of it than its host and port, and neither the URL nor a
webhook's secret reaches an error. Every call has a short deadline: a
receiver that is down or slow costs a worker seconds, never minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import smtplib
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from django.conf import settings

from .errors import AdapterError
from .redact import REDACTED

ANSWER_LIMIT = 300  # characters of a refusing receiver's answer kept in the error


def signature(secret: str, body: bytes) -> str:
    """X-Greenlight-Signature: "sha256=" and the hex HMAC-SHA256 of the raw body under the webhook's secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def where(url: str) -> str:
    """host:port of a URL, the most of it a message may show."""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    except ValueError:
        return "an invalid URL"


def _scrub(text: str, *secrets: str) -> str:
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def post_json(url: str, body: bytes, headers: dict[str, str] | None = None, *, secret: str = "") -> int:
    """POST `body` to `url`; its HTTP status when 2xx, else AdapterError.

    Connecting may take NOTIFY_CONNECT_TIMEOUT seconds and the whole exchange
    NOTIFY_TIMEOUT: a watchdog closes the socket at the deadline, so a
    receiver that trickles its answer a byte at a time is cut off too.
    Redirects are not followed (a 3xx is a refusal)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise AdapterError("the channel's URL is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdapterError("the channel's URL is not an http:// or https:// URL")
    target = where(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    hidden = (url, parts.path, parts.query, parts.password or "", secret)
    total = float(settings.NOTIFY_TIMEOUT)
    connect = min(float(settings.NOTIFY_CONNECT_TIMEOUT), total)
    deadline = time.monotonic() + total
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, port, timeout=connect, context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname, port, timeout=connect)
    watchdog = None
    try:
        connection.connect()
        left = deadline - time.monotonic()
        connection.sock.settimeout(max(left, 0.01))
        sock = connection.sock
        watchdog = threading.Timer(max(left, 0.01), _cut, (sock,))
        watchdog.daemon = True
        watchdog.start()
        connection.request("POST", path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": "Greenlight", **(headers or {})})
        response = connection.getresponse()
        answer = response.read(ANSWER_LIMIT * 4)
        status = response.status
    except (TimeoutError, socket.timeout):
        raise AdapterError(f"{target} did not answer within {total:g}s") from None
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            raise AdapterError(f"{target} did not answer within {total:g}s") from None
        reason = _scrub(str(exc) or type(exc).__name__, *hidden)
        raise AdapterError(f"could not post to {target}: {reason}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        connection.close()
    if not 200 <= status < 300:
        text = _scrub(answer.decode("utf-8", "replace"), *hidden).strip()[:ANSWER_LIMIT]
        raise AdapterError(f"{target} answered HTTP {status}" + (f": {text}" if text else ""))
    return status


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


def send_webhook(url: str, body: bytes, *, event: str, delivery: str, secret: str) -> int:
    """A generic webhook: the JSON body, signed with the channel's secret."""
    headers = {"X-Greenlight-Event": event, "X-Greenlight-Delivery": delivery}
    if secret:
        headers["X-Greenlight-Signature"] = signature(secret, body)
    return post_json(url, body, headers, secret=secret)


def send_slack(url: str, body: bytes) -> int:
    """A Slack incoming webhook (its URL is the credential)."""
    return post_json(url, body)


def send_email(*, subject: str, text: str, html: str, recipients: list[str], sender: str) -> None:
    """One message to every recipient, through Django's mail settings (EMAIL_URL)."""
    from django.core.mail import EmailMultiAlternatives, get_connection

    subject = " ".join(subject.split())  # a header holds no line break
    message = EmailMultiAlternatives(subject, text, sender, recipients, connection=get_connection(fail_silently=False))
    if html:
        message.attach_alternative(html, "text/html")
    host = f"{settings.EMAIL_HOST}:{settings.EMAIL_PORT}"
    try:
        message.send()
    except smtplib.SMTPRecipientsRefused as exc:
        refused = ", ".join(f"{who} ({code})" for who, (code, _) in exc.recipients.items())
        raise AdapterError(f"the mail server at {host} refused {refused}") from None
    except smtplib.SMTPResponseException as exc:
        reason = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        raise AdapterError(f"the mail server at {host} answered {exc.smtp_code}: {reason[:ANSWER_LIMIT]}") from None
    except (TimeoutError, socket.timeout):
        raise AdapterError(f"the mail server at {host} did not answer within {settings.EMAIL_TIMEOUT:g}s") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise AdapterError(f"could not send mail through {host}: {exc or type(exc).__name__}") from None
