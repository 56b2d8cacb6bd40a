"""`make bench`: how fast release logs go from a command to storage and the browser.

Prints a table; asserts nothing about speed (machines differ), only that
every line arrived. Runs against the same PostgreSQL and Redis as the tests.
"""

import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from releases import logs
from releases.models import Environment, LogLine, Recipe, Release
from tests.release_helpers import api, person

pytestmark = pytest.mark.django_db(transaction=True)
LINES = 20_000
ROWS = []


@pytest.fixture
def release():
    recipe = Recipe.objects.create(name="bench", definition={"tasks": {"t": {"commands": ["true"]}}})
    environment = Environment.objects.create(
        name="bench", region="us-west-1", load_balancer_name="bench", public_url="http://127.0.0.1:1",
        verify_security_group_id="sg-1", ssh_key_file="/x", subnet_id="s", key_name="k", base_ami="ami-1",
        repository="r", recipe=recipe,
    )
    return Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan={},
                                  requested_by=person("bench", "viewer"), status="cancelled")


@pytest.mark.parametrize("batch", [1, 50, 500])
def test_log_lines_stored_and_broadcast_per_second(release, batch, monkeypatch):
    monkeypatch.setattr(logs, "BATCH_LINES", batch)
    monkeypatch.setattr(logs, "BATCH_SECONDS", 3600)
    lines = LINES if batch > 1 else LINES // 10
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(f"release-{release.pk}", channel)
    writer = logs.LogWriter(release.pk)
    started = time.perf_counter()
    for n in range(lines):
        writer.write("deploy", f"line {n} of a deploy that prints a lot", host="app-3", stream="stdout")
    writer.flush()
    took = time.perf_counter() - started
    async_to_sync(layer.group_discard)(f"release-{release.pk}", channel)
    assert LogLine.objects.filter(release=release).count() == lines
    ROWS.append((f"store + broadcast, {batch} lines/message", lines, took))


def test_log_backfill_over_http_per_second(release):
    writer = logs.LogWriter(release.pk)
    for n in range(LINES):
        writer.write("deploy", f"line {n}", host="app-3", stream="stdout")
    writer.flush()
    client = api(release.requested_by)
    started = time.perf_counter()
    after, fetched = 0, 0
    while True:
        page = client.get(f"/api/releases/{release.pk}/logs/", {"after": after}).json()
        if not page["lines"]:
            break
        fetched += len(page["lines"])
        after = page["next"]
    took = time.perf_counter() - started
    assert fetched == LINES
    ROWS.append(("back-fill via GET logs/?after=", LINES, took))


def test_zz_print_the_table():
    width = max(len(name) for name, _, _ in ROWS)
    print(f"\n{'what':<{width}}  {'lines':>8}  {'seconds':>8}  {'lines/s':>10}")
    for name, lines, took in ROWS:
        print(f"{name:<{width}}  {lines:>8}  {took:>8.2f}  {lines / took:>10,.0f}")
