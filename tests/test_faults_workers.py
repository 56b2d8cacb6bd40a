"""Greenlight's own machinery failing under a release (issue 9): workers
killed inside each kind of step, PostgreSQL and the web server restarted.

The whole stack is the test's own: a PostgreSQL cluster (initdb on a free
port), a Redis, a sandbox, beat, a web server, and one worker at a time, each
in a process group of its own. Nothing else in the suite shares them, so a
kill or a restart here touches no other test, and no other test's worker
can pick up this module's releases. The test drives the stack as a script
would: the API over HTTP, and reads of the database and of AWS.

A worker is killed at an exact point through a failpoint
(`deployer/failpoints.py`): started with `GREENLIGHT_FAILPOINTS=aws:CreateImage`,
it stops dead right after AWS accepted the call and before anything recorded
it, and the test kills its whole process group there. Every test ends by
checking AWS, by the release's tags, not by what the release recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import requests

from deployer import aws
from tests.faults import Child, PostgresServer, RedisServer, answers_ping
from tests.helpers import ROOT, SandboxProcess, free_port, wait_for

pytestmark = pytest.mark.sandbox

LEASE_SECONDS = 5  # renewed every 1.7 s: short, with room for a busy machine's pauses
SWEEP_SECONDS = 1
SECRET_KEY = "faults-secret-key-of-this-module-only"  # the audit chain's key for every process here
PROVISION_SLEEP = 4  # the window in which provision's command is killed

SETUP = """
import json
from django.contrib.auth.models import Group, User
from deployer import sandbox
from deployer.sandbox.demo_recipe import RECIPE
from releases import services, tokens
from releases.models import Environment, Recipe

environment = services.environment_import_sandbox(info=sandbox.load({file!r}))
definition = {{**RECIPE, "tasks": {{**RECIPE["tasks"], "provision:slow": {{"run": "remote", "commands": [
    "echo provisioning slowly; sleep {sleep}; echo provisioned"]}}}}}}
definition["phases"] = {{**RECIPE["phases"], "provision": [*RECIPE["phases"]["provision"], "provision:slow"]}}
recipe = Recipe.objects.create(name="faults", definition=definition)
Environment.objects.filter(pk=environment.pk).update(
    recipe=recipe, retention=3600, ssh_timeout=60, instance_timeout=120, image_timeout=120, smoke_timeout=60)
keys = {{}}
for name, roles in (("dana", ("deployer", "approver")), ("ravi", ("approver",))):
    user = User.objects.create_user(name, password="a-long-passphrase")
    user.groups.add(*Group.objects.filter(name__in=roles))
    keys[name] = tokens.token_rotate(user=user, actor=user)
print("KEYS" + json.dumps(keys))
"""


class Stack:
    """PostgreSQL, Redis, a sandbox, beat and a web server of this module's own; workers on demand."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.postgres = PostgresServer()
        self.redis = RedisServer(self._dir("redis"))
        self.sandbox = SandboxProcess(self._dir("sandbox"), draining_timeout=1)
        self.database_url = self.postgres.url("greenlight")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys: dict[str, str] = {}
        self.workers: list[Child] = []
        self.beat = self._child("beat", "-m", "celery", "-A", "deployer", "beat", "--loglevel", "info",
                                "--schedule", str(self.directory / "beat" / "schedule"))
        self.web = self._child("web", "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "deployer.asgi:application")

    def _dir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _child(self, name: str, *args: str) -> Child:
        return Child([sys.executable, *args], self._dir(name), self.redis.url, self.database_url, SECRET_KEY,
                     LEASE_SECONDS=str(LEASE_SECONDS), SWEEP_SECONDS=str(SWEEP_SECONDS))

    def start(self) -> None:
        self.postgres.start()
        self.postgres.create_database("greenlight")
        self.redis.start()
        self.sandbox.start()
        env = {**self.web.env}
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True,
                       timeout=300)
        setup = subprocess.run([sys.executable, "manage.py", "shell", "-c",
                                SETUP.format(file=str(self.sandbox.file), sleep=PROVISION_SLEEP)],
                               cwd=ROOT, env=env, check=True, timeout=120, capture_output=True, text=True)
        self.keys = json.loads(setup.stdout.split("KEYS", 1)[1])
        self.beat.start()
        self.start_web()

    def start_web(self) -> None:
        self.web.start()
        wait_for(lambda: self.healthz() == 200, 60, 0.2, "our web server")

    def healthz(self) -> int:
        try:
            return requests.get(f"{self.url}/healthz", timeout=5).status_code
        except requests.ConnectionError:
            assert self.web.process.poll() is None, self.web.output()[-3000:]
            return 0

    def worker(self, failpoints: str = "") -> Child:
        """A new worker (concurrency 2, as the demo's), stopping at `failpoints`."""
        n = len(self.workers) + 1
        name = f"faults-{n}@{self.sandbox.network}"
        child = self._child(f"worker-{n}", "-m", "celery", "-A", "deployer", "worker", "--concurrency", "2",
                            "-n", name, "--loglevel", "info")
        child.start(GREENLIGHT_FAILPOINTS=failpoints)
        self.workers.append(child)
        wait_for(lambda: answers_ping(self.redis.url, name), 60, 0.2, f"worker {n}")
        return child

    def stop(self) -> None:
        for child in (*self.workers, self.web, self.beat):
            if child.process is not None:
                child.stop()
        self.sandbox.stop()
        self.redis.kill()
        self.postgres.remove()

    # -- as a script would: the API, the database, AWS ------------------------------------

    def call(self, person: str, method: str, path: str, body: dict | None = None) -> dict:
        response = requests.request(method, f"{self.url}/api/{path}", json=body, timeout=30,
                                    headers={"Authorization": f"Token {self.keys[person]}"})
        assert response.status_code in (200, 201), (response.status_code, response.text)
        return response.json()

    def query(self, sql: str, *args) -> list[tuple]:
        with psycopg.connect(self.database_url, connect_timeout=5) as connection:
            return connection.execute(sql, args).fetchall()

    def running_step(self, release_id: int) -> str | None:
        rows = self.query("SELECT key FROM releases_step WHERE release_id = %s AND status = 'running'", release_id)
        return rows[0][0] if rows else None

    def steps(self, release_id: int) -> dict[str, tuple[str, int]]:
        return {key: (status, attempts) for key, status, attempts in self.query(
            "SELECT key, status, attempts FROM releases_step WHERE release_id = %s", release_id)}

    def log(self, release_id: int) -> list[str]:
        return [text for (text,) in self.query("SELECT text FROM releases_logline WHERE release_id = %s ORDER BY seq",
                                               release_id)]

    def status(self, release_id: int) -> str:
        try:
            return self.query("SELECT status FROM releases_release WHERE id = %s", release_id)[0][0]
        except psycopg.OperationalError:
            return "(the database does not answer)"

    def wait_status(self, release_id: int, *statuses: str, timeout: float = 180) -> None:
        try:
            wait_for(lambda: self.status(release_id) in statuses, timeout, 0.2, f"release {release_id} to be {statuses}")
        except AssertionError:
            raise AssertionError(f"release {release_id} is {self.status(release_id)}; steps: {self.steps(release_id)}; "
                                 f"log: {self.log(release_id)[-15:]}") from None

    def uuid(self, release_id: int) -> str:
        return str(self.query("SELECT uuid FROM releases_release WHERE id = %s", release_id)[0][0])

    def cloud(self) -> aws.Cloud:
        [(name, arn)] = self.query("SELECT load_balancer_name, target_group_arn FROM releases_environment")
        return aws.Cloud(self.sandbox.account(), load_balancer_name=name, target_group_arn=arn)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("faults"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def kill_at_failpoint(stack: Stack, worker: Child, failpoint: str, release_id: int, step: str) -> None:
    """Wait for `worker` to stop at `failpoint` inside `step`, kill its whole process group."""
    worker.wait_to_say(f"failpoint {failpoint.rstrip('*')}", 180)
    assert stack.running_step(release_id) == step, stack.steps(release_id)
    worker.kill()


def taken_back(stack: Stack, release_id: int, step: str) -> None:
    """The sweep noticed the dead worker through its lease, not Redis's visibility timeout (an hour)."""
    line = f"{step}: its worker ("
    wait_for(lambda: any(text.startswith(line) and text.endswith("stopped renewing its lease; running it again")
                         for text in stack.log(release_id)), LEASE_SECONDS + SWEEP_SECONDS + 20, 0.2,
             f"the sweep to take {step} back")


def approve(stack: Stack, release_id: int, gate: str) -> None:
    wait_for(lambda: stack.steps(release_id).get(gate, ("",))[0] == "awaiting_approval", 180, 0.2, f"the {gate} gate")
    stack.call("ravi", "POST", f"releases/{release_id}/gates/{gate}/approve", {"comment": "fine"})


def assert_aws_holds(stack: Stack, release_id: int, *, running: int, images: int, registered: set[str] | None = None):
    """By the release's tags in AWS: how many of its instances run (none in
    another state but stopped), how many images it has, no verification rule
    open, and no instance registered with the load balancer that is not running."""
    cloud = stack.cloud()
    mine = cloud.instances(tags={aws.TAG_RELEASE: stack.uuid(release_id)})
    states = sorted(i.state for i in mine)
    assert states.count("running") == running and set(states) <= {"running", "stopped"}, states
    found = cloud.ec2.describe_images(Owners=["self"], Filters=[
        {"Name": f"tag:{aws.TAG_RELEASE}", "Values": [stack.uuid(release_id)]}])["Images"]
    assert len(found) == images, [i["ImageId"] for i in found]
    env = stack.query("SELECT verify_security_group_id FROM releases_environment WHERE name = 'prepan'")[0][0]
    assert cloud.ec2.describe_security_groups(GroupIds=[env])["SecurityGroups"][0]["IpPermissions"] == []
    now_registered = cloud.registered()
    assert {i.state for i in cloud.instances(ids=now_registered)} == {"running"}
    if registered is not None:
        assert set(now_registered) == registered


def assert_each_step_succeeded_once(stack: Stack, release_id: int, keys: list[str]) -> None:
    log = stack.log(release_id)
    for key in keys:
        assert log.count(f"{key} succeeded") == 1, (key, [line for line in log if line.startswith(key)])


def test_a_worker_killed_inside_each_kind_of_step_is_replaced_and_the_release_ends_as_it_would_have(stack):
    old = set(stack.cloud().registered())
    release_id = stack.call("dana", "POST", "releases/", {"environment": "prepan", "revision": "v2", "clone_count": 3})["id"]

    # launch: RunInstances made the canary; nothing has recorded it yet
    worker = stack.worker("aws:RunInstances")
    kill_at_failpoint(stack, worker, "aws:RunInstances", release_id, "launch")
    worker = stack.worker()
    taken_back(stack, release_id, "launch")

    # provision: inside a command on the canary
    wait_for(lambda: "provisioning slowly" in stack.log(release_id), 120, 0.1, "provision's slow command")
    assert stack.running_step(release_id) == "provision"
    worker.kill()
    worker = stack.worker("aws:CreateImage")
    taken_back(stack, release_id, "provision")
    approve(stack, release_id, "verify_directly")

    # bake_image: CreateImage made the image; its id is not saved yet
    kill_at_failpoint(stack, worker, "aws:CreateImage", release_id, "bake_image")
    worker = stack.worker("aws:RunInstances")
    taken_back(stack, release_id, "bake_image")

    # launch_clones: the first clone is made, the second is not
    kill_at_failpoint(stack, worker, "aws:RunInstances", release_id, "launch_clones")
    worker = stack.worker("aws:Register*")
    taken_back(stack, release_id, "launch_clones")
    approve(stack, release_id, "swap_elb")

    # register_new: the new fleet is registered, the wait for in-service not begun
    kill_at_failpoint(stack, worker, "aws:Register*", release_id, "register_new")
    worker = stack.worker("aws:Deregister*")
    taken_back(stack, release_id, "register_new")

    # deregister_old: the old fleet is taken out, the draining not waited for
    kill_at_failpoint(stack, worker, "aws:Deregister*", release_id, "deregister_old")
    worker = stack.worker()
    taken_back(stack, release_id, "deregister_old")

    stack.wait_status(release_id, "succeeded")
    steps = stack.steps(release_id)
    assert {key: status for key, (status, _) in steps.items()} == dict.fromkeys(steps, "succeeded")
    killed = ("launch", "provision", "bake_image", "launch_clones", "register_new", "deregister_old")
    assert {key: steps[key][1] for key in killed} == dict.fromkeys(killed, 2)
    new = {i for (i,) in stack.query("SELECT instance_id FROM releases_instance WHERE release_id = %s AND role != 'old'",
                                     release_id)}
    assert len(new) == 3
    assert_aws_holds(stack, release_id, running=3, images=1, registered=new)
    assert_each_step_succeeded_once(stack, release_id, [k for k in steps if k not in ("verify_directly", "swap_elb")])
    assert not old & set(stack.cloud().registered())

    # the rollback: restore_old has started the old fleet again; nothing has recorded it
    worker.stop()
    worker = stack.worker("aws:StartInstances")
    stack.call("dana", "POST", f"releases/{release_id}/rollback")
    kill_at_failpoint(stack, worker, "aws:StartInstances", release_id, "restore_old")
    worker = stack.worker()
    taken_back(stack, release_id, "restore_old")

    stack.wait_status(release_id, "rolled_back")
    assert_aws_holds(stack, release_id, running=0, images=0, registered=old)
    assert stack.steps(release_id)["restore_old"] == ("succeeded", 2)
    assert_each_step_succeeded_once(stack, release_id, ["restore_old", "retire_new", "stop_new", "remove_image", "revoke_access"])
    worker.stop()


def test_postgresql_restarted_under_a_running_step_then_the_web_server_restarted_at_a_gate(stack):
    old = set(stack.cloud().registered())
    worker = stack.worker()
    release_id = stack.call("dana", "POST", "releases/", {"environment": "prepan", "revision": "v2", "clone_count": 1})["id"]
    wait_for(lambda: "provisioning slowly" in stack.log(release_id), 120, 0.1, "provision's slow command")

    stack.postgres.restart()  # every connection cut, mid-command; the server recovers from its WAL

    # the step is handed back by its own worker, saying why, and run again: never a
    # step left running with nothing running it, nor one failed for the database's fault
    stack.wait_status(release_id, "awaiting_approval", "failed", timeout=120)
    assert stack.steps(release_id)["provision"] == ("succeeded", 2)
    log = stack.log(release_id)
    assert "provision: the connection to the database was lost (OperationalError); running it again" in log
    assert log.count("provision succeeded") == 1 and "provisioned" in log
    seqs = [seq for (seq,) in stack.query("SELECT seq FROM releases_logline WHERE release_id = %s ORDER BY seq", release_id)]
    assert seqs == list(range(1, len(seqs) + 1))  # each line stored once, none skipped
    assert worker.process.poll() is None

    # the web server killed at the gate, and started again: the gate is still there to approve
    stack.web.kill()
    stack.start_web()
    approve(stack, release_id, "verify_directly")
    wait_for(lambda: stack.steps(release_id)["swap_elb"][0] == "awaiting_approval", 120, 0.2, "the swap gate")
    stack.call("ravi", "POST", f"releases/{release_id}/gates/swap_elb/reject", {"comment": "no"})
    stack.wait_status(release_id, "rolled_back")
    assert_aws_holds(stack, release_id, running=0, images=0, registered=old)
    worker.stop()
