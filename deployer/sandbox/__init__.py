"""The sandbox: everything a release needs, on loopback, with no AWS account.

`python manage.py sandbox` runs it; it writes its endpoints to
`var/sandbox.json` (see `load`). An instance is reached exactly as on AWS
from inside the VPC: at its PrivateIpAddress (an address in 127.77.0.0/16),
SSH on `ssh_port`, the app on `app_port`; `addresses` spells that out.
"""

from __future__ import annotations

import json
from pathlib import Path


def load(path: Path) -> dict:
    """The sandbox's endpoints file, or FileNotFoundError if it is not running."""
    return json.loads(Path(path).read_text())


def addresses(sandbox: dict, private_ip: str) -> dict:
    """How to reach one instance: its SSH (host, port) and its direct URL."""
    return {
        "ssh": (private_ip, sandbox["ssh_port"]),
        "url": f"http://{private_ip}:{sandbox['app_port']}/",
    }
