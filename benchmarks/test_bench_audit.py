"""`make bench`: the audit's CSV export of 50,000 events, downloaded from the
web server (daphne) as a browser would: the time to its first byte and to its
last. Asserts that every event arrived; the table shows the times.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import requests
from django.test import Client
from django.utils import timezone

from releases import audit, chain
from releases.models import AuditChainHead, AuditEvent, Environment, Recipe
from tests.release_helpers import person

pytestmark = pytest.mark.django_db(transaction=True)
EVENTS = 50_000
FIRST_BYTE_S = 1.0


def fill_audit(environment: Environment, dana) -> None:
    audit.record("bench.start", actor=dana)  # makes the chain's head
    head = AuditChainHead.objects.get(pk=audit.HEAD)
    seq, prev, now, events = head.seq, head.hash, timezone.now(), []
    for n in range(EVENTS - 1):
        seq += 1
        event = AuditEvent(action="aws:RunInstances", actor_name=audit.ENGINE, target=f"i-{n:017x}", environment_id=environment.pk,
                           details={"request_id": f"req-{n}"}, at=now - timedelta(seconds=EVENTS - n), seq=seq, prev_hash=prev)
        event.hash = prev = chain.mac(event)
        events.append(event)
    AuditEvent.objects.bulk_create(events, batch_size=5000)
    AuditChainHead.objects.filter(pk=audit.HEAD).update(seq=seq, hash=prev)


def test_the_audit_csv_of_50000_events_starts_at_once(web_server, bench):
    recipe = Recipe.objects.create(name="bench", definition={"tasks": {"t": {"commands": ["true"]}}})
    environment = Environment.objects.create(
        name="bench", region="us-west-1", load_balancer_name="bench", public_url="http://127.0.0.1:1",
        verify_security_group_id="sg-1", ssh_key_file="/x", subnet_id="s", key_name="k", base_ami="ami-1",
        repository="r", recipe=recipe,
    )
    fill_audit(environment, person("dana", "deployer"))
    client = Client()
    client.force_login(person("vic", "viewer"))
    cookies = {"sessionid": client.cookies["sessionid"].value}

    requests.get(f"{web_server}/audit/", cookies=cookies, timeout=30).raise_for_status()  # a warm-up visit
    started = time.perf_counter()
    with requests.get(f"{web_server}/audit/?format=csv", cookies=cookies, stream=True, timeout=120) as response:
        response.raise_for_status()
        chunks = response.iter_content(chunk_size=None)
        first = next(chunks)
        first_byte = time.perf_counter() - started
        body = first + b"".join(chunks)
    total = time.perf_counter() - started

    lines = body.decode().splitlines()
    assert lines[0].startswith("at,actor,") and len(lines) == EVENTS + 1
    bench.record("audit_csv", f"{first_byte * 1000:.0f} ms / {total:.1f} s", met=first_byte < FIRST_BYTE_S,
                 first_byte_ms=round(first_byte * 1000, 1), total_s=round(total, 2), bytes=len(body))
