"""Starting real processes for tests: the sandbox, and polling helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from deployer import aws, ssh
from tests import parallel

ROOT = Path(__file__).resolve().parent.parent
_started = iter(range(1_000_000))


def child_environ() -> dict[str, str]:
    """This process's environment, for a process a test starts: without what
    only this process needs (the browser tests let their own sync database
    calls run beside Playwright's event loop; a web server or worker given
    that would run its own async code unsafely)."""
    return {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}


def free_port() -> int:
    """A port nothing listens on (the moment it is asked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 30, interval: float = 0.1, message: str = "condition"):
    """Poll until predicate() returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class SandboxProcess:
    """`manage.py sandbox` as a child process, on ports and addresses of its own."""

    def __init__(
        self,
        directory: Path,
        *,
        seed: bool = True,
        network: str | None = None,
        draining_timeout: int = 5,
        timings: str | None = None,
        time_scale: float | None = None,
        timing: dict[str, float] | None = None,
        load_balancer: str | None = None,
        environments: list[str] | None = None,
        seed_count: int | None = None,
        bastion: bool = False,
    ):
        """Options left at None are not passed: the command's defaults apply
        (the fast profile, one classic ELB, prepan with two instances)."""
        self.draining_timeout = draining_timeout
        self.options: list[str] = []
        for flag, value in (("--timings", timings), ("--time-scale", time_scale), ("--load-balancer", load_balancer),
                            ("--environments", ",".join(environments) if environments else None), ("--seed-count", seed_count)):
            if value is not None:
                self.options += [flag, str(value)]
        for name, seconds in (timing or {}).items():
            self.options += ["--timing", f"{name}={seconds}"]
        if bastion:
            self.options.append("--bastion")
        self.directory = directory
        self.file = directory / "sandbox.json"
        # a /16 of its own, away from a demo's 127.77.0.0/16 and other test runs
        share = parallel.network_share()  # this test process's own, beside others run in parallel
        self.network = network or f"127.{share[(os.getpid() * 7 + next(_started)) % len(share)]}.0.0/16"
        self.seed = seed
        self.process: subprocess.Popen | None = None
        self.log = directory / "sandbox.log"

    def start(self, timeout: float = 120) -> dict:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, str(ROOT / "manage.py"), "sandbox",
            "--directory", str(self.directory / "state"),
            "--file", str(self.file),
            "--aws-port", "0", "--lb-port", "0", "--smtp-port", "0", "--inbox-port", "0",
            "--network", self.network,
            "--health-interval", "0.2",
            "--draining-timeout", str(self.draining_timeout),
            *self.options,
        ]
        if not self.seed:
            args.append("--no-seed")
        env = {**child_environ(), "GREENLIGHT_VAR_DIR": str(self.directory), "SECRET_KEY": "sandbox-test"}
        self.process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.file.exists() or self.process.poll() is not None, timeout, message="the sandbox to be ready")
        if self.process.poll() is not None:
            raise AssertionError(f"the sandbox exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        return self.info

    @property
    def info(self) -> dict:
        return json.loads(self.file.read_text())

    def __enter__(self) -> SandboxProcess:
        self.start()
        return self

    def __exit__(self, kind, *_) -> None:
        code = self.stop()
        if kind is None:
            assert code == 0, f"the sandbox exited with {code}:\n{self.log.read_text()[-3000:]}"

    def stop(self, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    # -- clients, as the product will build them -----------------------------

    def account(self) -> aws.Account:
        info = self.info
        return aws.Account(
            region=info["region"],
            endpoint_url=info["aws_endpoint_url"],
            access_key_id=info["aws_access_key_id"],
            secret_access_key=info["aws_secret_access_key"],
        )

    def client(self, service: str):
        return aws.client(self.account(), service)

    def target(self, instance: dict, **overrides) -> ssh.Target:
        info = self.info
        fields = dict(
            host=instance["PrivateIpAddress"],
            port=info["ssh_port"],
            user=info["ssh_user"],
            private_key=Path(info["ssh_key_file"]).read_text(),
            jump=self.jump(),
        )
        return ssh.Target(**{**fields, **overrides})

    def jump(self) -> ssh.Target | None:
        """The sandbox's bastion as a jump target, if it runs one."""
        if not (bastion := self.info.get("bastion")):
            return None
        return ssh.Target(host=bastion["host"], port=bastion["port"], user=bastion["user"],
                          private_key=Path(bastion["key_file"]).read_text(), host_key=bastion["host_key"])

    def launch(self, *, image_id: str | None = None, name: str = "test") -> dict:
        info = self.info
        instance = self.client("ec2").run_instances(
            ImageId=image_id or info["base_ami"],
            InstanceType=info["instance_type"],
            KeyName=info["key_name"],
            SubnetId=info["subnet_id"],
            SecurityGroupIds=[info["app_security_group_id"]],
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}],
        )["Instances"][0]
        self.wait_for_ssh(instance)
        return instance

    def wait_for_ssh(self, instance: dict, timeout: float = 30) -> ssh.Result:
        target = self.target(instance)

        def reachable():
            try:
                return ssh.run(target, "true", timeout=5)
            except ssh.AdapterError:
                return None

        return wait_for(reachable, timeout, 0.1, f"SSH on {instance['InstanceId']}")

    def run(self, instance: dict, command: str, **kwargs) -> tuple[ssh.Result, list[tuple[str, str]]]:
        lines: list[tuple[str, str]] = []
        result = ssh.run(self.target(instance), command, on_line=lambda s, t: lines.append((s, t)), **kwargs)
        return result, lines


def own_redis_url(url: str) -> str:
    """A Redis database beside `url`'s, emptied: for a stack the tests start
    (a demo), so that its worker and the tests' own never take each other's
    tasks. The database before `url`'s, wrapping at 0."""
    import redis
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    own = urlunsplit(parts._replace(path=f"/{(db - 1) % 16}"))
    redis.Redis.from_url(own).flushdb()
    return own


def processes_with(needle: bytes) -> list[str]:
    """The pids of the processes whose command line holds `needle` (arguments joined by NUL)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if needle in cmdline.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def running(pid: int | str) -> bool:
    """Whether the process exists and is not a zombie (PID 1 here may never reap one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
