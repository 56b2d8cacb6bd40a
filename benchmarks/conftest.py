"""`make bench`: one table, printed at the end and written to var/bench.json.

Each benchmark records its row through the `bench` fixture; a row whose
benchmark did not finish is shown as "not measured", with the reason.
Benchmarks reuse the tests' fixtures (a test database, a worker, sandboxes).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field

import pytest
from django.conf import settings
from django.utils import timezone

from tests.conftest import *  # noqa: F401,F403


@dataclass
class Row:
    figure: str
    target: str
    anchor: str
    value: str = "not measured"
    met: bool | None = None
    details: dict = field(default_factory=dict)


# The rows in the order the table shows them (issue 9's list).
ROWS: dict[str, Row] = {
    "lb_failures": Row("failed requests through the load balancer during a whole `bake` release", "0",
                       "the sandbox's load balancer at AWS's timings x0.02, >= 100 req/s from 8 clients"),
    "engine_gap": Row("engine overhead: median gap between one step ending and the next starting", "< 50 ms",
                      "the releases of this bench, gates approved at once"),
    "fan_out": Row("fan-out: release wall time, fleet of 16 / fleet of 2", "<= 1.5",
                   "deploy_from_image, AWS's timings x0.02, gates approved at once"),
    "log_throughput": Row("log pipeline end to end: 200,000 lines printed by a remote command -> stored -> websocket client",
                          ">= 20,000 lines/s", "AWX: about 1,100 events/s per 4-CPU node"),
    "log_latency": Row("log latency at 1,000 lines/s, printed on the instance -> websocket client, p50 / p99",
                       "<= 50 ms / <= 250 ms", "5,000 lines over SSH from a sandbox instance"),
    "page_dashboard": Row("dashboard, 10,000 releases: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "page_environments": Row("environments list, 10,000 releases: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "page_environment": Row("environment page, 10,000 releases: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "page_release": Row("release page, 100,000-line log: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "page_audit": Row("audit page, 100,000 events: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "audit_csv": Row("audit CSV export, 50,000 events, from daphne: first byte / last byte", "first byte < 1 s",
                     "streamed in batches of 500 lines"),
    "page_api_release": Row("API release detail: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "page_api_environments": Row("API environments list: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "page_api_audit": Row("API audit list, 100,000 events: server time p50 / p95 (queries)", "<= 150 ms, constant queries", ""),
    "page_api_logs": Row("API log lines, a page of 5,000 from a 100,000-line log: server time p50 / p95 (queries)",
                         "<= 150 ms, constant queries", ""),
    "worker_memory": Row("worker memory growth across 20 consecutive releases", "< 50 MB",
                         "RSS of the worker and its pool processes, fleet of 1, the fast sandbox"),
}


class Bench:
    def record(self, key: str, value: str, *, met: bool | None, anchor: str | None = None, **details) -> None:
        row = ROWS[key]
        row.value, row.met, row.details = value, met, details
        if anchor is not None:
            row.anchor = anchor

    def not_measured(self, key: str, reason: str) -> None:
        ROWS[key].value = f"not measured: {reason}"


@pytest.fixture(scope="session")
def bench() -> Bench:
    return Bench()


def table() -> str:
    header = ("figure", "measured", "target", "met", "anchor")
    lines = [f"| {' | '.join(header)} |", "|---|---:|---|---|---|"]
    for row in ROWS.values():
        met = {True: "yes", False: "NO", None: "-"}[row.met]
        lines.append(f"| {row.figure} | {row.value} | {row.target} | {met} | {row.anchor} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not any(row.value != "not measured" for row in ROWS.values()):
        return  # nothing ran (a collection error, say): keep the last table
    terminalreporter.write_line("")
    terminalreporter.write_line(f"make bench, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}")
    terminalreporter.write_line("")
    for line in table().splitlines():
        terminalreporter.write_line(line)
    path = settings.VAR_DIR / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "measured_at": timezone.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "rows": [{"key": key, **asdict(row)} for key, row in ROWS.items()],
    }, indent=2) + "\n")
    terminalreporter.write_line(f"\nwritten to {path}")
