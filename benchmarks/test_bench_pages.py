"""`make bench`: the pages people wait on, with a big history behind them.

10,000 releases, one of them with a 100,000-line log, and 100,000 audit
events, seeded once for every page. Server time is measured in process with
Django's test client (no network, no browser), p50 and p95 of 20 requests
after two warm-ups; the query count is compared with the same page over a
history of two releases.
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from releases import audit, chain, services, tasks
from releases.models import AuditChainHead, AuditEvent, Environment, LogLine, Release, Step
from tests.release_helpers import api, offline_environment, person

pytestmark = pytest.mark.django_db
RELEASES, LOG_LINES, EVENTS = 10_000, 100_000, 100_000
REQUESTS = 20
TARGET_MS = 150


def page_urls(release: Release) -> dict[str, str]:
    return {
        "page_dashboard": "/",
        "page_environments": "/environments/",
        # its AWS endpoint answers nothing: the page must not wait for it (its instances come after it)
        "page_environment": f"/environments/{release.environment.name}/",
        "page_release": f"/releases/{release.pk}/",
        "page_audit": "/audit/",
        "page_api_release": f"/api/releases/{release.pk}/",
        "page_api_environments": "/api/environments/",
        "page_api_audit": "/api/audit/",
        "page_api_logs": f"/api/releases/{release.pk}/logs/?after=50000",
    }


def fetch(clients: dict, key: str, url: str):
    response = clients[key].get(url)
    assert response.status_code == 200, (url, response.status_code)
    return response


def queries(clients: dict, urls: dict) -> dict[str, int]:
    counts = {}
    for key, url in urls.items():
        fetch(clients, key, url)  # a first request fills caches (sessions, permissions) as a visit would
        seen = []
        for _ in range(3):  # the fewest of three: a session saved now and then is not the page's
            with CaptureQueriesContext(connection) as captured:
                fetch(clients, key, url)
            seen.append(len(captured.captured_queries))
        counts[key] = min(seen)
    return counts


def p50_p95_ms(clients: dict, key: str, url: str) -> tuple[float, float]:
    for _ in range(2):
        fetch(clients, key, url)
    took = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        fetch(clients, key, url)
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took), statistics.quantiles(took, n=20, method="inclusive")[18]


def fill_history(environment: Environment, release: Release, dana) -> None:
    now = timezone.now()
    plan = release.plan
    old = Release.objects.bulk_create(
        (Release(environment=environment, revision=f"v{n % 7}", fleet_size=2, plan=plan, requested_by=dana,
                 status="succeeded" if n % 10 else "rolled_back", finished_at=now - timedelta(minutes=n))
         for n in range(RELEASES - 2)),
        batch_size=2000,
    )
    Step.objects.bulk_create(
        (Step(release=r, position=n, key=s["key"], kind=s["kind"], status="succeeded") for r in old for n, s in enumerate(plan["steps"])),
        batch_size=5000,
    )
    LogLine.objects.bulk_create(
        (LogLine(release=release, seq=n, step="deploy", host="app-3", stream="stdout", text=f"line {n} of a long deploy", at=now)
         for n in range(1, LOG_LINES + 1)),
        batch_size=5000,
    )
    Release.objects.filter(pk=release.pk).update(log_seq=LOG_LINES)
    head = AuditChainHead.objects.get(pk=audit.HEAD)
    seq, prev = head.seq, head.hash
    events = []
    for n in range(EVENTS):
        seq += 1
        event = AuditEvent(action="gate.approve", actor=dana, actor_name=dana.username, target=f"release {old[n % len(old)].pk}",
                           environment_id=environment.pk, release_id=old[n % len(old)].pk, details={"gate": "swap_elb"},
                           at=now - timedelta(seconds=EVENTS - n), seq=seq, prev_hash=prev)
        event.hash = prev = chain.mac(event)
        events.append(event)
    AuditEvent.objects.bulk_create(events, batch_size=5000)
    AuditChainHead.objects.filter(pk=audit.HEAD).update(seq=seq, hash=prev)


@pytest.mark.timeout(1200)  # filling the history takes minutes on a busy machine
def test_pages_with_a_big_history(bench):
    environment = offline_environment("prepan")
    dana, vic = person("dana", "deployer", "approver"), person("vic", "viewer")
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):  # no worker is to run it
        release = services.release_create(environment=environment, revision="v2", actor=dana)
    Release.objects.filter(pk=release.pk).update(status="failed", finished_at=timezone.now())  # failed: still active
    Release.objects.create(environment=environment, revision="v1", fleet_size=2, plan=release.plan, requested_by=dana,
                           status="succeeded", finished_at=timezone.now())  # and one in the history
    browser = Client()
    browser.force_login(vic)
    clients = {key: api(vic) if key.startswith("page_api") else browser for key in page_urls(release)}
    urls = page_urls(release)

    small = queries(clients, urls)
    sizes = f"releases: {Release.objects.count()}, log lines: {LogLine.objects.count()}, audit events: {AuditEvent.objects.count()}"
    started = time.monotonic()
    fill_history(environment, release, dana)
    filled = time.monotonic() - started
    big = queries(clients, urls)

    for key, url in urls.items():
        p50, p95 = p50_p95_ms(clients, key, url)
        constant = big[key] == small[key]
        bench.record(key, f"{p50:.0f} / {p95:.0f} ms ({big[key]} queries)", met=p95 <= TARGET_MS and constant,
                     anchor=f"{small[key]} queries with a small history ({sizes})", p50_ms=round(p50, 1), p95_ms=round(p95, 1),
                     queries=big[key], queries_small=small[key], history_seconds=round(filled, 1))
    assert Release.objects.count() == RELEASES
    assert LogLine.objects.filter(release=release).count() == LOG_LINES
