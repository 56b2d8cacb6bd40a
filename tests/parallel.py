"""Loaded before Django's settings (`-p tests.parallel` in pyproject.toml's
addopts), so that test processes run side by side (`make test` runs two,
with pytest-xdist) never share what one of them must own:

- Redis: each process's REDIS_URL database is two below the one before
  (15 and 13 for two processes), and a demo under test takes the database
  below its process's own (tests/helpers.own_redis_url): 14 and 12. A worker
  on a shared broker would take the other process's tasks, for releases in
  a database it cannot see.
- The sandboxes' loopback networks: each process picks among its own share
  of 127.100-249.x.x (tests/helpers.SandboxProcess).
- The test database: pytest-django names it after the process already
  (test_greenlight_gw0, ...).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
INDEX = int(WORKER[2:]) if WORKER.startswith("gw") and WORKER[2:].isdigit() else 0
COUNT = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), 1)

if INDEX:
    _parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))
    _db = int(_parts.path.strip("/") or 0)
    os.environ["REDIS_URL"] = urlunsplit(_parts._replace(path=f"/{(_db - 2 * INDEX) % 16}"))
    os.environ.pop("CELERY_BROKER_URL", None)  # follows REDIS_URL


def network_share() -> range:
    """The second octets of 127.x.0.0/16 this process's sandboxes may use."""
    width = 150 // COUNT
    return range(100 + INDEX * width, 100 + (INDEX + 1) * width)
