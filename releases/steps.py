"""What each step of a release does, through the AWS and SSH adapters.

Every action may run twice (a worker can die between doing something and
recording it), so each one first looks for what an earlier run made: the
instances by their release and slot tags, the image by its name derived
from the release id, the rule by its exact shape.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deployer import aws, recipe, ssh
from deployer.errors import AdapterError

from .logs import LogWriter
from .models import Instance, Release, Step

SSH_WORKERS = 8
COMMAND_TIMEOUT = 600


class StepFailed(Exception):
    """The step cannot succeed; the message says why, for the person reading it."""


class Cancelled(Exception):
    pass


@dataclass
class Context:
    release: Release
    step: Step | None
    cloud: aws.Cloud
    log: LogWriter
    _cancel_checked: float = field(default=0.0)
    _cancelled: bool = field(default=False)

    @property
    def env(self) -> dict:
        return self.release.plan["environment"]

    @property
    def state(self) -> dict:
        return self.release.state

    @property
    def key(self) -> str:
        return self.step.key if self.step else "rollback"

    def info(self, text: str, host: str = "") -> None:
        self.log.write(self.key, text, host=host)

    def save(self, **values) -> None:
        self.release.state.update(values)
        Release.objects.filter(pk=self.release.pk).update(state=self.release.state)

    def cancelled(self) -> bool:
        if self.step is None:
            return False  # a rollback is not itself cancellable
        if not self._cancelled and time.monotonic() - self._cancel_checked > 1:
            self._cancel_checked = time.monotonic()
            self._cancelled = Release.objects.filter(pk=self.release.pk, cancel_requested=True).exists()
        return self._cancelled

    def check_cancel(self) -> None:
        if self.cancelled():
            raise Cancelled()

    # -- instances ------------------------------------------------------------

    def record(self, info: aws.InstanceInfo, role: str) -> Instance:
        row, _ = Instance.objects.update_or_create(
            release=self.release,
            instance_id=info.id,
            defaults={"name": info.name, "role": role, "state": info.state, "address": info.address(self.env["address"])},
        )
        return row

    def new_ids(self) -> list[str]:
        return [i for i in [self.state.get("canary"), *self.state.get("clones", [])] if i]

    def url(self, instance: Instance | aws.InstanceInfo, path: str = "/") -> str:
        address = instance.address if isinstance(instance, Instance) else instance.address(self.env["address"])
        return f"http://{address}:{self.env['app_port']}{path}"


# -- helpers --------------------------------------------------------------------


def next_names(ctx: Context, count: int) -> list[str]:
    prefix = ctx.env["name_prefix"]
    taken = set()
    for info in ctx.cloud.instances(states=("pending", "running", "stopping", "stopped")):
        suffix = info.name[len(prefix):] if info.name.startswith(prefix) else ""
        if suffix.isdigit():
            taken.add(int(suffix))
    start = max(taken, default=0) + 1
    return [f"{prefix}{start + i}" for i in range(count)]


def launch_one(ctx: Context, *, slot: str, name: str, image: str, role: str) -> aws.InstanceInfo:
    info = ctx.cloud.launch(
        tags={"Name": name, aws.TAG_ENVIRONMENT: ctx.env["name"], aws.TAG_REVISION: ctx.release.revision},
        identity={aws.TAG_RELEASE: str(ctx.release.pk), aws.TAG_SLOT: slot},
        image_id=image,
        instance_type=ctx.env["instance_type"],
        key_name=ctx.env["key_name"],
        subnet_id=ctx.env["subnet_id"],
        security_group_ids=[*ctx.env["security_group_ids"], ctx.env["verify_security_group_id"]],
        client_token=f"greenlight-{ctx.release.pk}-{slot}",
    )
    ctx.record(info, role)
    return info


def target(ctx: Context, row: Instance) -> ssh.Target:
    try:
        key = Path(ctx.env["ssh_key_file"]).read_text()
    except OSError as exc:
        raise StepFailed(f"cannot read the SSH key file {ctx.env['ssh_key_file']}: {exc.strerror}") from None
    return ssh.Target(host=row.address, port=ctx.env["ssh_port"], user=ctx.env["ssh_user"], private_key=key, host_key=row.host_key)


def wait_for_ssh(ctx: Context, row: Instance, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    if not row.host_key:
        # pin before the first contact when the console shows the key; else trust on first use
        keys = ctx.cloud.console_host_keys(row.instance_id)
        preferred = [k for k in keys if k.startswith("ssh-ed25519")] or keys
        if preferred:
            Instance.objects.filter(pk=row.pk).update(host_key=preferred[0])
            row.host_key = preferred[0]
            ctx.info(f"pinned {row.name}'s host key from its console output", host=row.name)
    while True:
        try:
            result = ssh.run(target(ctx, row), "true", timeout=30)
            if not row.host_key:
                Instance.objects.filter(pk=row.pk).update(host_key=result.host_key)
                row.host_key = result.host_key
                ctx.info(f"pinned host key {result.host_key.split()[0]} for {row.name}", host=row.name)
            return
        except AdapterError as exc:
            if "host key" in str(exc) or time.monotonic() > deadline:
                raise
            ctx.check_cancel()
            time.sleep(1)


def run_phase(ctx: Context, phase: str, rows: list[Instance]) -> None:
    """Run a recipe phase on every host at once; each host's commands in order."""
    definition = ctx.release.plan["recipe"]
    if not definition.get("phases", {}).get(phase):
        ctx.info(f"the recipe has no {phase} tasks")
        return

    def on_host(row: Instance) -> None:
        values = {
            "host": row.address,
            "instance_id": row.instance_id,
            "name": row.name,
            "ssh_user": ctx.env["ssh_user"],
            "ssh_port": ctx.env["ssh_port"],
            "ssh_key_file": ctx.env["ssh_key_file"],
            "revision": ctx.release.revision,
            "repository": ctx.env["repository"],
            "app_port": ctx.env["app_port"],
            "environment": ctx.env["name"],
        }
        for command in recipe.render(definition, phase, values, role=row.role):
            ctx.check_cancel()
            ctx.log.write(ctx.key, f"$ {command.text}", host=row.name, stream="info")
            stderr: list[str] = []

            def on_line(stream: str, text: str) -> None:
                if stream == "stderr":
                    stderr.append(text)
                ctx.log.write(ctx.key, text, host=row.name, stream=stream)

            if command.run == "local":
                status = run_local(command.text, on_line, ctx.cancelled)
            else:
                status = ssh.run(target(ctx, row), command.text, timeout=COMMAND_TIMEOUT, on_line=on_line, cancelled=ctx.cancelled).exit_status
            if ctx.cancelled():
                raise Cancelled()
            if status != 0:
                last = ctx.log.redact(stderr[-1]) if stderr else "no output on stderr"
                raise StepFailed(f"{command.task} failed on {row.name} (exit {status}): {last}")

    with ThreadPoolExecutor(max_workers=min(SSH_WORKERS, len(rows)) or 1) as pool:
        futures = [pool.submit(on_host, row) for row in rows]
        errors = [f.exception() for f in futures if f.exception()]
    for error in errors:
        raise error


def run_local(command: str, on_line, cancelled) -> int:
    process = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def pump(stream, name):
        for raw in iter(stream.readline, b""):
            on_line(name, raw.rstrip(b"\n").decode(errors="replace"))

    with ThreadPoolExecutor(max_workers=2) as pool:
        pool.submit(pump, process.stdout, "stdout")
        pool.submit(pump, process.stderr, "stderr")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while process.poll() is None:
            if cancelled() or time.monotonic() > deadline:
                process.kill()
            time.sleep(0.1)
    return process.returncode


def http_check(url: str, expect: str = "") -> tuple[bool, str]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read(65536).decode(errors="replace")
            status = response.status
    except urllib.error.HTTPError as exc:
        status, body = exc.code, ""
    except OSError as exc:
        return False, f"GET {url}: {getattr(exc, 'reason', exc)}"
    took = int((time.monotonic() - started) * 1000)
    if status != 200:
        return False, f"GET {url} {status} ({took} ms)"
    if expect and expect not in body:
        return False, f"GET {url} 200 but {expect!r} is not in the page ({took} ms)"
    return True, f"GET {url} 200{f' {expect!r}' if expect else ''} ({took} ms)"


def smoke(ctx: Context, base: str, timeout: float = 60) -> list[str]:
    """Retry both checks until they pass or `timeout`; the last results either way."""
    expect = ctx.env["expected_text"].replace("{revision}", ctx.release.revision)
    deadline = time.monotonic() + timeout
    while True:
        results = [http_check(base + "/", expect), http_check(base + ctx.env["health_path"])]
        if all(ok for ok, _ in results):
            for _, line in results:
                ctx.info(line)
            return [line for _, line in results]
        if time.monotonic() > deadline:
            raise StepFailed("; ".join(line for ok, line in results if not ok))
        ctx.check_cancel()
        time.sleep(1)


def instance_rows(ctx: Context, ids: list[str]) -> list[Instance]:
    rows = {r.instance_id: r for r in Instance.objects.filter(release=ctx.release, instance_id__in=ids)}
    return [rows[i] for i in ids if i in rows]


# -- the steps -------------------------------------------------------------------


def launch(ctx: Context) -> dict:
    if "old" not in ctx.state:
        old = ctx.cloud.registered()
        ctx.save(old=old)
        for info in ctx.cloud.instances(ids=old) if old else []:
            ctx.record(info, Instance.Role.OLD)
    name = ctx.state.get("canary_name") or next_names(ctx, 1)[0]
    ctx.save(canary_name=name)
    info = launch_one(ctx, slot="canary", name=name, image=ctx.env["image"], role=Instance.Role.CANARY)
    ctx.save(canary=info.id)
    info = ctx.cloud.wait_for_state([info.id], "running")[0]
    ctx.record(info, Instance.Role.CANARY)
    ctx.info(f"{name} is {info.id}, running at {info.address(ctx.env['address'])} from {ctx.env['image']}")
    return {"instance": info.id, "name": name}


def provision(ctx: Context) -> dict:
    [row] = instance_rows(ctx, [ctx.state["canary"]])
    wait_for_ssh(ctx, row)
    run_phase(ctx, "provision", [row])
    return {}


def deploy(ctx: Context) -> dict:
    [row] = instance_rows(ctx, [ctx.state["canary"]])
    wait_for_ssh(ctx, row)
    run_phase(ctx, "deploy", [row])
    return {"revision": ctx.release.revision}


def open_access(ctx: Context) -> dict:
    env = ctx.env
    ctx.save(access={"group": env["verify_security_group_id"], "port": env["app_port"], "cidr": env["verify_cidr"]})
    ctx.cloud.open_port(env["verify_security_group_id"], env["app_port"], env["verify_cidr"], f"greenlight release {ctx.release.pk} verification")
    ctx.info(f"opened tcp/{env['app_port']} to {env['verify_cidr']} in {env['verify_security_group_id']}")
    return {}


def smoke_direct(ctx: Context) -> dict:
    [row] = instance_rows(ctx, [ctx.state["canary"]])
    return {"url": ctx.url(row), "checks": smoke(ctx, ctx.url(row, "").rstrip("/"))}


def close_access(ctx: Context) -> dict:
    revoke_access(ctx)
    return {}


def revoke_access(ctx: Context) -> None:
    if access := ctx.state.get("access"):
        ctx.cloud.close_port(access["group"], access["port"], access["cidr"])
        ctx.info(f"closed tcp/{access['port']} to {access['cidr']} in {access['group']}")


def bake_image(ctx: Context) -> dict:
    canary = ctx.state["canary"]
    ctx.cloud.stop([canary])
    ctx.info(f"stopped {ctx.state['canary_name']} to bake it")
    name = f"greenlight-{ctx.env['name']}-release-{ctx.release.pk}"
    image = ctx.cloud.bake(canary, name, {aws.TAG_RELEASE: str(ctx.release.pk), aws.TAG_ENVIRONMENT: ctx.env["name"], "revision": ctx.release.revision})
    ctx.save(image=image)
    ctx.info(f"image {image} ({name}) is available")
    return {"image": image}


def launch_clones(ctx: Context) -> dict:
    canary = ctx.state["canary"]
    ctx.cloud.start([canary])
    ctx.record(ctx.cloud.instances(ids=[canary])[0], Instance.Role.CANARY)
    count = ctx.release.fleet_size - 1
    names = ctx.state.get("clone_names") or next_names(ctx, count)
    ctx.save(clone_names=names)
    clones = [launch_one(ctx, slot=f"clone-{n}", name=name, image=ctx.state["image"], role=Instance.Role.CLONE).id for n, name in enumerate(names, 1)]
    ctx.save(clones=clones)
    for info in ctx.cloud.wait_for_state(clones, "running") if clones else []:
        ctx.record(info, Instance.Role.CLONE)
        ctx.info(f"{info.name} is {info.id}, running at {info.address(ctx.env['address'])}")
    return {"clones": clones}


def smoke_clones(ctx: Context) -> dict:
    checks = {}
    for row in instance_rows(ctx, ctx.new_ids()):
        ctx.check_cancel()
        checks[row.name] = smoke(ctx, ctx.url(row, "").rstrip("/"), timeout=180)
    return {"checks": checks}


def register_new(ctx: Context) -> dict:
    new = ctx.new_ids()
    ctx.cloud.register(new)
    ctx.info(f"registered {', '.join(new)}; waiting until every one is in service")
    ctx.cloud.wait_in_service(new, cancelled=ctx.cancelled)
    ctx.info("every new instance is in service")
    return {}


def verify_production(ctx: Context, attempts: int = 10) -> dict:
    url = ctx.env["public_url"].rstrip("/")
    expect = ctx.env["expected_text"].replace("{revision}", ctx.release.revision)
    results = [http_check(url + "/") for _ in range(attempts)]
    failed = [line for ok, line in results if not ok]
    if failed:
        raise StepFailed(f"{len(failed)} of {attempts} requests through {url} failed: {failed[0]}")
    seen = sum(1 for _ in range(attempts) if http_check(url + "/", expect)[0])
    if expect and not seen:
        raise StepFailed(f"no response through {url} contained {expect!r}")
    ctx.info(f"{attempts} requests through {url} answered 200; {seen} of {attempts} more served {ctx.release.revision}")
    return {"url": url}


def deregister_old(ctx: Context) -> dict:
    old = [i for i in ctx.state.get("old", []) if i not in ctx.new_ids()]
    registered = set(ctx.cloud.registered())
    ctx.cloud.deregister([i for i in old if i in registered])
    wait = min(ctx.cloud.draining_timeout(), 300)
    ctx.info(f"deregistered {', '.join(old) or 'nothing'}; draining for {wait:g}s")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ctx.check_cancel()
        time.sleep(min(1, max(0.0, deadline - time.monotonic())))
    return {}


def stop_old(ctx: Context) -> dict:
    old = [i for i in ctx.state.get("old", []) if i not in ctx.new_ids()]
    ctx.cloud.stop(old)
    for info in ctx.cloud.instances(ids=old) if old else []:
        ctx.record(info, Instance.Role.OLD)
    ctx.info(f"stopped {', '.join(old) or 'nothing'}; they are terminated after {ctx.env['retention']}s")
    return {"stopped": old}


ACTIONS = {
    "launch": launch,
    "provision": provision,
    "deploy": deploy,
    "open_access": open_access,
    "smoke_direct": smoke_direct,
    "close_access": close_access,
    "bake_image": bake_image,
    "launch_clones": launch_clones,
    "smoke_clones": smoke_clones,
    "register_new": register_new,
    "verify_production": verify_production,
    "deregister_old": deregister_old,
    "stop_old": stop_old,
}


# -- gates: what a person needs to see to decide ------------------------------------


def verify_card(ctx: Context) -> dict:
    [row] = instance_rows(ctx, [ctx.state["canary"]])
    smoke_step = ctx.release.steps.filter(key="smoke_direct").first()
    return {"instance": row.instance_id, "name": row.name, "url": ctx.url(row), "checks": (smoke_step.result if smoke_step else {}).get("checks", [])}


def swap_card(ctx: Context) -> dict:
    registered = ctx.cloud.health()

    def describe(ids):
        infos = {i.id: i for i in ctx.cloud.instances(ids=ids)} if ids else {}
        return [
            {"instance": i, "name": infos[i].name if i in infos else "", "state": infos[i].state if i in infos else "unknown",
             "health": registered.get(i, "not registered")}
            for i in ids
        ]

    return {"old": describe(ctx.state.get("old", [])), "new": describe(ctx.new_ids())}


GATE_CARDS = {"verify_directly": verify_card, "swap_elb": swap_card}


# -- rollback -----------------------------------------------------------------------


def roll_back(ctx: Context) -> None:
    """Old fleet running and in service first, then the new one out, then the rule."""
    old = [i for i in ctx.state.get("old", []) if i not in ctx.new_ids()]
    new = ctx.new_ids()
    ctx.info("rolling back: putting the old instances back in service")
    if old:
        stopped = [i.id for i in ctx.cloud.instances(ids=old) if i.state in ("stopped", "stopping")]
        if stopped:
            ctx.cloud.wait_for_state(stopped, "stopped")
            ctx.cloud.start(stopped)
            ctx.info(f"started {', '.join(stopped)}")
        ctx.cloud.register(old)
        ctx.cloud.wait_in_service(old)
        ctx.info(f"{', '.join(old)} in service")
    registered = set(ctx.cloud.registered())
    leaving = [i for i in new if i in registered]
    if leaving:
        ctx.cloud.deregister(leaving)
        wait = min(ctx.cloud.draining_timeout(), 300)
        ctx.info(f"deregistered {', '.join(leaving)}; draining for {wait:g}s")
        time.sleep(wait)
    running = [i.id for i in ctx.cloud.instances(ids=new, states=("pending", "running"))] if new else []
    if running:
        ctx.cloud.stop(running)
        ctx.info(f"stopped {', '.join(running)}")
    for info in ctx.cloud.instances(ids=[*old, *new]) if old or new else []:
        row = Instance.objects.filter(release=ctx.release, instance_id=info.id).first()
        if row:
            Instance.objects.filter(pk=row.pk).update(state=info.state)
    revoke_access(ctx)
    ctx.info("rolled back")


__all__ = ["ACTIONS", "GATE_CARDS", "Cancelled", "Context", "StepFailed", "roll_back"]
