"""How long the sandbox's AWS takes to do things, in one table.

Two profiles: `fast` (the default, for the demo and most tests: moto's
instant answers, the sandbox balancer's own quick health checks) and `aws`
(AWS's own behaviour and durations). Every duration is in seconds as AWS
takes it; the sandbox multiplies it by the time scale, so a test can play the
`aws` profile at 0.02 and see a 300 s drain in 6 s. Any entry can be
overridden on its own (`--timing not_found=100`, `SANDBOX_TIMING_NOT_FOUND=100`,
unscaled seconds), so a test can make one behaviour long enough to watch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PROFILES = ("fast", "aws")


@dataclass(frozen=True)
class Timings:
    # -- the sandbox's EC2 --------------------------------------------------
    # RunInstances/StartInstances to `running`. EC2 User Guide, "Instance
    # state changes": pending until the instance is ready; ~30 s is typical
    # for an EBS-backed Linux instance (no documented figure).
    instance_pending: float = 0
    # StopInstances to `stopped`. EC2 User Guide, "Stop and start": the
    # instance is `stopping` while it shuts down; ~30 s typical.
    instance_stopping: float = 0
    # `running` to sshd and the boot script up (cloud-init's init and config
    # stages run after the state turns running); ~15 s typical.
    boot: float = 0
    # `running` to GetConsoleOutput carrying the boot's output (host keys).
    # EC2 User Guide, "Instance console output": buffered and posted shortly
    # after boot; ~1 min typical, often after SSH already answers.
    console_output: float = 0
    # CreateImage to `available`. EC2 User Guide, "Create an EBS-backed AMI":
    # `pending` while the snapshots are taken; minutes for an 8 GiB root.
    image_pending: float = 0
    # RunInstances to the id being visible to other calls. EC2 API Reference,
    # "Eventual consistency": InvalidInstanceID.NotFound right after a create.
    not_found: float = 0
    # -- what the seeded load balancer is configured with -------------------
    # Classic ELB health check defaults. ELB User Guide (Classic), "Health
    # checks for your Classic Load Balancer": interval 30 s, timeout 5 s,
    # healthy threshold 10, unhealthy threshold 2. The fast profile seeds
    # the API's minimums (5 s, 2 s) and its balancer checks faster on its own.
    elb_health_interval: float = 5
    elb_health_timeout: float = 2
    elb_healthy_threshold: int = 2  # a count, not scaled
    elb_unhealthy_threshold: int = 2  # a count, not scaled
    # Classic ELB connection draining. ELB User Guide (Classic), "Configure
    # connection draining": enabled by default from the console, 300 s.
    connection_draining: float = 5
    # Target group health check defaults for HTTP. ELB User Guide
    # (Application), "Health checks for your target groups": interval 30 s,
    # timeout 5 s, healthy threshold 5, unhealthy threshold 2.
    target_health_interval: float = 5
    target_health_timeout: float = 2
    target_healthy_threshold: int = 2  # a count, not scaled
    target_unhealthy_threshold: int = 2  # a count, not scaled
    # Target group attribute deregistration_delay.timeout_seconds. ELB User
    # Guide (Application), "Deregistration delay": 300 s by default.
    deregistration_delay: float = 5

    def override(self, values: Mapping[str, str | float]) -> Timings:
        """A copy with some entries replaced (unscaled seconds, or counts)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for name, value in values.items():
            field = fields.get(name)
            if field is None:
                raise ValueError(f"no sandbox timing named {name!r}; known: {', '.join(fields)}")
            number = float(value)
            if number < 0:
                raise ValueError(f"sandbox timing {name} must not be negative")
            changes[name] = int(number) if field.type in ("int", int) else number
        return dataclasses.replace(self, **changes)

    def items(self) -> list[tuple[str, float]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]


FAST = Timings()
AWS = Timings(
    instance_pending=30,
    instance_stopping=30,
    boot=15,
    console_output=60,
    image_pending=180,
    not_found=5,
    elb_health_interval=30,
    elb_health_timeout=5,
    elb_healthy_threshold=10,
    elb_unhealthy_threshold=2,
    connection_draining=300,
    target_health_interval=30,
    target_health_timeout=5,
    target_healthy_threshold=5,
    target_unhealthy_threshold=2,
    deregistration_delay=300,
)


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """`name=seconds` pairs, as `--timing` takes them."""
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--timing takes NAME=SECONDS, not {pair!r}")
        overrides[name.strip().lower()] = value.strip()
    return overrides


def from_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """SANDBOX_TIMING_<NAME>=seconds overrides."""
    prefix = "SANDBOX_TIMING_"
    return {key[len(prefix):].lower(): value for key, value in environ.items() if key.startswith(prefix)}


def profile(name: str, *, draining_timeout: float | None = None, overrides: Mapping[str, str | float] = ()) -> Timings:
    """The table for a profile; in `fast`, `--draining-timeout` sets both drains
    (as it did before there were profiles); overrides win over both."""
    if name not in PROFILES:
        raise ValueError(f"unknown sandbox timings profile {name!r}; known: {', '.join(PROFILES)}")
    table = AWS if name == "aws" else FAST
    if name == "fast" and draining_timeout is not None:
        table = dataclasses.replace(table, connection_draining=draining_timeout, deregistration_delay=draining_timeout)
    return table.override(dict(overrides))
