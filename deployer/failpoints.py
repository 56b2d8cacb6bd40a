"""Failpoints: named places in the code where a fault test can stop a process dead.

A test cannot kill a worker "between CreateImage and the moment the image
id is saved" by timing alone: that window is a millisecond wide. So the
places that matter have a name, and a process started with
`GREENLIGHT_FAILPOINTS` (names separated by commas, shell-style wildcards
allowed: `aws:CreateImage,aws:Register*`) stops at the first one it reaches:
it writes `failpoint <name> reached (pid N)` to stderr and waits there, its
other threads still going, until the test kills it. This is how etcd's gofail
and FreeBSD's fail(9) let tests crash a process at an exact point.

Unset (always, outside the fault tests), `reached` costs one attribute test.
Places with a name:
- `aws:<Action>`: after AWS accepted a change (RunInstances, CreateImage,
  RegisterInstancesWithLoadBalancer, ...), before anything recorded it.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import threading

PATTERNS = tuple(p.strip() for p in os.environ.get("GREENLIGHT_FAILPOINTS", "").split(",") if p.strip())


def reached(name: str) -> None:
    """Stop here, for good, when `name` matches GREENLIGHT_FAILPOINTS."""
    if PATTERNS and any(fnmatch.fnmatchcase(name, pattern) for pattern in PATTERNS):
        sys.stderr.write(f"failpoint {name} reached (pid {os.getpid()})\n")
        sys.stderr.flush()
        threading.Event().wait()
