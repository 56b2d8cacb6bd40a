"""`make bench`: a release's log, from a command on an instance to a browser.

A command on a sandbox instance prints lines over SSH; they go the way a
step's output goes (ssh.run's on_line -> LogWriter: redact, number, store,
broadcast) to the release's group, and from the web server (daphne) to a
websocket client in a process of its own. Asserts that every line arrived
exactly once; the table shows the speeds.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time

import pytest
from django.test import Client

from deployer import ssh
from releases.logs import LogWriter
from releases.models import Environment, Recipe, Release
from tests.helpers import ROOT
from tests.release_helpers import person

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]
LINES = 200_000
LATENCY_LINES, LATENCY_RATE = 5_000, 1_000


@pytest.fixture
def release():
    recipe = Recipe.objects.create(name="bench", definition={"tasks": {"t": {"commands": ["true"]}}})
    environment = Environment.objects.create(
        name="bench", region="us-west-1", load_balancer_name="bench", public_url="http://127.0.0.1:1",
        verify_security_group_id="sg-1", ssh_key_file="/x", subnet_id="s", key_name="k", base_ami="ami-1",
        repository="r", recipe=recipe,
    )
    # cancelled: the worker's sweep leaves it alone
    return Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan={},
                                  requested_by=person("bench", "viewer"), status="cancelled")


@pytest.fixture(scope="module")
def instance(release_sandbox):
    return release_sandbox.launch(name="bench-logs")


class Watcher:
    """benchmarks/ws_client.py, connected to the release's feed."""

    def __init__(self, web_server: str, release: Release, lines: int, timeout: float):
        client = Client()
        client.force_login(release.requested_by)
        url = web_server.replace("http://", "ws://") + f"/ws/releases/{release.pk}/"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ws_client", url, f"sessionid={client.cookies['sessionid'].value}",
             web_server, str(lines), str(timeout)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout.readline().strip() == "ready"

    def result(self) -> dict:
        out, _ = self.process.communicate(timeout=600)
        return json.loads(out)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:  # the run failed before the client had its lines
            self.process.kill()
            self.process.wait()


def stream(release_sandbox, instance, release: Release, command: str) -> tuple[float, float]:
    """Run `command` on the instance as a step would; the wall-clock times it
    started and its last line was stored."""
    writer = LogWriter(release.pk)
    started = time.time()
    with writer:
        result = ssh.run(release_sandbox.target(instance), command, timeout=300,
                         on_line=lambda stream, text: writer.write("deploy", text, host="bench-logs", stream=stream))
    assert result.exit_status == 0
    return started, time.time()


def test_a_remote_commands_lines_reach_a_browser(release_sandbox, instance, web_server, release, bench):
    with Watcher(web_server, release, LINES, timeout=300) as watcher:
        started, stored = stream(release_sandbox, instance, release, f"seq -f 'line %.0f of a deploy that prints a lot' {LINES}")
        got = watcher.result()

    assert (got["received"], got["duplicates"]) == (LINES, 0)
    rate = LINES / (got["last_at"] - started)
    bench.record("log_throughput", f"{rate:,.0f} lines/s (stored: {LINES / (stored - started):,.0f})", met=rate >= 20_000,
                 seconds=round(got["last_at"] - started, 2), stored_seconds=round(stored - started, 2))


def test_lines_arrive_soon_after_they_are_printed(release_sandbox, instance, web_server, release, bench):
    printer = (f"import time\nstart = time.time()\nfor n in range({LATENCY_LINES}):\n"
               f"    time.sleep(max(0, start + n / {LATENCY_RATE} - time.time()))\n"
               f"    print(f'{{time.time():.6f}}', flush=True)\n")
    with Watcher(web_server, release, LATENCY_LINES, timeout=120) as watcher:
        stream(release_sandbox, instance, release, f"python3 -c {shlex.quote(printer)}")
        got = watcher.result()

    assert (got["received"], got["duplicates"], len(got["latencies"])) == (LATENCY_LINES, 0, LATENCY_LINES)
    cuts = statistics.quantiles([s * 1000 for s in got["latencies"]], n=100, method="inclusive")
    p50, p99 = cuts[49], cuts[98]
    bench.record("log_latency", f"{p50:.0f} ms / {p99:.0f} ms", met=p50 <= 50 and p99 <= 250,
                 anchor=f"{LATENCY_LINES:,} lines at {LATENCY_RATE:,}/s over SSH from a sandbox instance")
