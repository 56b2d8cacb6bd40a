"""`manage.py demo` (what `make demo` runs) brings the whole product up and down."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import requests
from django.conf import settings

from deployer.sandbox.hosts import processes_marked
from tests.helpers import ROOT, child_environ, free_port, own_redis_url, wait_for

pytestmark = pytest.mark.sandbox


def test_the_demo_serves_a_login_and_the_seeded_environment_then_stops_cleanly(tmp_path):
    port = free_port()
    env = {
        **child_environ(),
        "GREENLIGHT_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",  # the zero-setup default
        "REDIS_URL": own_redis_url(settings.REDIS_URL),  # the tests' worker must not take the demo's tasks
        "DEMO_ADMIN_PASSWORD": "demo-password-for-tests",
        "DEMO_REVIEWER_PASSWORD": "reviewer-password-for-tests",
        "SANDBOX_AWS_PORT": "0",
        "SANDBOX_LB_PORT": "0",
        "SANDBOX_SMTP_PORT": "0",
        "SANDBOX_INBOX_PORT": "0",
        "SANDBOX_NETWORK": "127.99.0.0/16",
    }
    env.pop("ALLOW_FILE_REPOSITORIES", None)  # the demo allows its sandbox's file:// repository itself
    env.pop("EMAIL_URL", None)  # the demo points its processes' mail at the sandbox's inbox
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen([sys.executable, "manage.py", "demo", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def login_page():
            try:
                return requests.get(f"{base}/accounts/login/", timeout=5)
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy starting on a loaded machine
                assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]

        page = wait_for(login_page, 120, 0.5, "the login page")
        assert page.status_code == 200 and "Sign in" in page.text

        for username, password in (("admin", "demo-password-for-tests"), ("reviewer", "reviewer-password-for-tests")):
            session = requests.Session()
            session.get(f"{base}/accounts/login/")
            signed_in = session.post(
                f"{base}/accounts/login/",
                data={"username": username, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                headers={"Referer": f"{base}/accounts/login/"},
            )
            assert signed_in.status_code == 200 and "Dashboard" in signed_in.text, username
        environments = session.get(f"{base}/environments/")
        assert "prepan" in environments.text  # the sandbox's environment, stored for releases

        info = json.loads((tmp_path / "sandbox.json").read_text())
        revisions = {requests.get(info["load_balancer_url"], timeout=5).headers["X-Revision"] for _ in range(4)}
        assert revisions == {"v1"}
        assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}

        # notifications: prepan's channels point at the sandbox's inbox, the web server and the
        # worker mail through its catcher, and the demo says where to read them
        inbox = info["inbox"]
        assert f"Notifications the demo sends: {inbox['url']}" in (tmp_path / "demo.log").read_text()
        assert requests.get(inbox["url"], timeout=5).status_code == 200
        with sqlite3.connect(tmp_path / "demo.sqlite3") as db:
            channels = dict(db.execute("SELECT c.kind, c.url FROM releases_notificationchannel c "
                                       "JOIN releases_environment e ON e.id = c.environment_id WHERE e.name = 'prepan'").fetchall())
        assert channels == {"email": "", "slack": f"{inbox['url']}slack/prepan", "webhook": f"{inbox['url']}hooks/prepan"}
        for word in ("daphne", "worker"):
            [pid] = [pid for pid, cmd in processes_under(tmp_path).items() if word in cmd.split() and os.getpgid(pid) == pid]
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            assert f"EMAIL_URL={inbox['email_url']}".encode() in environ, word
    finally:
        demo.send_signal(signal.SIGINT)
        status = demo.wait(60)
    assert status == 0
    assert processes_marked(tmp_path / "sandbox") == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


# -- the supervisor: what survives what ----------------------------------------


def processes_under(directory) -> dict[int, str]:
    """Every process (but this one) with `directory` in its command line or environment: pid -> command line."""
    mark = str(directory).encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            environ = open(f"/proc/{entry}/environ", "rb").read()
            state = open(f"/proc/{entry}/stat", "rb").read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and (mark in cmdline or mark in environ):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


class Demo:
    """`manage.py demo` on ports, addresses, a var directory and a SQLite file of its own."""

    def __init__(self, directory):
        self.directory = directory
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lb = f"http://127.0.0.1:{free_port()}/"
        self.env = {
            **child_environ(),
            "GREENLIGHT_VAR_DIR": str(directory),
            "DATABASE_URL": f"sqlite:///{directory / 'demo.sqlite3'}",
            "REDIS_URL": own_redis_url(settings.REDIS_URL),  # the tests' worker must not take the demo's tasks
            "DEMO_ADMIN_PASSWORD": "demo-password-for-tests",
            "DEMO_REVIEWER_PASSWORD": "reviewer-password-for-tests",
            # fixed ports, so that a restarted sandbox answers where the first one did
            "SANDBOX_AWS_PORT": str(free_port()),
            "SANDBOX_LB_PORT": self.lb.rsplit(":", 1)[1].strip("/"),
            "SANDBOX_SMTP_PORT": str(free_port()),
            "SANDBOX_INBOX_PORT": str(free_port()),
            "SANDBOX_NETWORK": "127.98.0.0/16",
        }
        self.env.pop("ALLOW_FILE_REPOSITORIES", None)
        self.log = directory / "demo.log"
        self.process: subprocess.Popen | None = None
        self.tokens: dict[str, str] = {}
        subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=self.env, check=True)

    def start(self) -> None:
        self.mark = self.output().count("demo stopped")  # this run's lines start after the last run's
        self.process = subprocess.Popen([sys.executable, "manage.py", "demo", "--port", str(self.port)], cwd=ROOT, env=self.env,
                                        stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(self.healthy, 120, 0.5, "the demo to answer")
        for username in ("admin", "reviewer"):
            self.tokens[username] = subprocess.run([sys.executable, "manage.py", "create_token", username], cwd=ROOT, env=self.env,
                                                   check=True, capture_output=True, text=True).stdout.strip()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def healthy(self) -> bool:
        assert self.process.poll() is None, self.output()[-3000:]
        try:
            return requests.get(f"{self.base}/healthz", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(90)

    def group_leader(self, word: str) -> int:
        """The pid heading the child process group whose command line has `word` (worker, beat, daphne, sandbox)."""
        leaders = [pid for pid, cmd in processes_under(self.directory).items()
                   if pid != self.process.pid and word in cmd.split() and os.getpgid(pid) == pid]
        assert len(leaders) == 1, (word, leaders, processes_under(self.directory))
        return leaders[0]

    def kill_group(self, word: str) -> tuple[int, int]:
        """SIGKILL a child's whole group; wait for the supervisor to say so and start another. -> (old, new) pids."""
        old = self.group_leader(word)
        os.killpg(old, signal.SIGKILL)
        name = {"daphne": "web"}.get(word, word)
        wait_for(lambda: f"{name} (pid {old}) stopped: killed by SIGKILL" in self.output(), 20, 0.2, f"the demo to say {name} died")
        wait_for(lambda: f"{name} restarted (pid" in self.output().split(f"{name} (pid {old}) stopped")[-1], 20, 0.2, f"{name} to restart")
        new = wait_for(lambda: next(iter(p for p in [self.group_leader(word)] if p != old), None), 20, 0.2, f"a new {name}")
        return old, new

    def beats(self) -> list[int]:
        return [pid for pid, cmd in processes_under(self.directory).items() if "beat" in cmd.split() and "celery" in cmd]

    def api(self, username: str, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.base}/api/{path}", timeout=10,
                                headers={"Authorization": f"Token {self.tokens[username]}"}, **kwargs)

    def release(self, release_id: int) -> dict:
        return self.api("admin", "GET", f"releases/{release_id}/").json()

    def wait_release(self, release_id: int, done, timeout: float, what: str) -> dict:
        def reached():
            release = self.release(release_id)
            return release if done(release) else None

        try:
            return wait_for(reached, timeout, 0.5, what)
        except AssertionError:
            release = self.release(release_id)
            steps = ", ".join(f"{s['key']}={s['status']}" for s in release["steps"])
            raise AssertionError(f"{what}: release is {release['status']} ({release['error']}); steps: {steps}\n"
                                 f"{self.output()[-4000:]}") from None

    def wait_gate(self, release_id: int, key: str, timeout: float = 90) -> dict:
        return self.wait_release(release_id, lambda r: any(s["key"] == key and s["status"] == "awaiting_approval" for s in r["steps"]),
                                 timeout, f"the gate {key}")

    def approve(self, release_id: int, key: str) -> None:
        response = self.api("reviewer", "POST", f"releases/{release_id}/gates/{key}/approve", json={})
        assert response.status_code == 200, response.text


def lb_revisions(url: str, n: int = 6) -> set[str]:
    return {requests.get(url, timeout=5).headers.get("X-Revision", "?") for _ in range(n)}


def test_the_demo_restarts_whatever_dies_and_a_release_survives_it_and_a_ctrl_c(tmp_path):
    demo = Demo(tmp_path)
    demo.start()
    try:
        # one beat, on its own: not embedded in the worker, where killing the worker orphaned it
        [beat] = demo.beats()
        assert os.getpgid(beat) == beat

        created = demo.api("admin", "POST", "releases/", json={"environment": "prepan", "revision": "v2", "clone_count": 1})
        assert created.status_code == 201, created.text
        release_id = created.json()["id"]
        demo.wait_gate(release_id, "verify_directly")

        # (a) the worker's whole group killed: said, restarted, and the release goes on to the end
        demo.kill_group("worker")
        assert demo.beats() == [beat]  # the same single beat: killing the worker neither killed nor doubled it
        demo.approve(release_id, "verify_directly")
        demo.wait_gate(release_id, "swap_elb")
        demo.approve(release_id, "swap_elb")
        done = demo.wait_release(release_id, lambda r: r["status"] not in ("queued", "running", "awaiting_approval"), 90, "the release to end")
        assert done["status"] == "succeeded", done
        assert lb_revisions(demo.lb) == {"v2"}

        # (b) the web server killed: back, and /healthz answers
        demo.kill_group("daphne")
        wait_for(demo.healthy, 30, 0.3, "/healthz after the web server's restart")
        assert demo.release(release_id)["status"] == "succeeded"

        # (c) the sandbox killed: back, with the AWS state it had (saved while it ran), and its
        # load balancer serves the released fleet again
        time.sleep(3)  # past the sandbox's next checkpoint of its state
        demo.kill_group("sandbox")
        wait_for(lambda: "the sandbox is back" in demo.output(), 90, 0.5, "the sandbox to be ready again")

        def serves_v2():
            try:
                return lb_revisions(demo.lb) == {"v2"}
            except (requests.ConnectionError, requests.Timeout):
                return False

        wait_for(serves_v2, 60, 0.3, "the load balancer to serve the released v2 again")
        assert demo.output().count("launched app-1 as") == 1  # not seeded afresh: the account survived

        # (d) still exactly one beat, after every kill and restart
        assert demo.beats() == [beat]
        assert "beat (pid" not in demo.output()  # beat itself never died

        # (e) Ctrl-C mid-release: every child's group is gone, and nothing is left with our var directory
        second = demo.api("admin", "POST", "releases/", json={"environment": "prepan", "revision": "v1", "clone_count": 1})
        assert second.status_code == 201, second.text
        second_id = second.json()["id"]
        demo.wait_release(second_id, lambda r: any(s["key"] in ("provision", "deploy") and s["status"] == "running" for s in r["steps"]),
                          60, "a step to be at work")
        groups = [demo.group_leader(word) for word in ("sandbox", "worker", "beat", "daphne")]
        assert demo.interrupt() == 0
        for group in groups:
            with pytest.raises(ProcessLookupError):
                os.killpg(group, 0)
        assert processes_under(tmp_path) == {}

        demo.start()
        [beat_again] = demo.beats()
        resumed = demo.wait_release(second_id, lambda r: r["status"] not in ("queued", "running"), 120,
                                    "the interrupted release to go on (or end) after the restart")
        assert resumed["status"] in ("awaiting_approval", "failed"), resumed
        if resumed["status"] == "failed":
            assert resumed["error"], resumed  # ends clearly, with a reason
        else:
            assert any(s["key"] == "verify_directly" and s["status"] == "awaiting_approval" for s in resumed["steps"])
    finally:
        if demo.process.poll() is None:
            assert demo.interrupt() == 0
    assert processes_under(tmp_path) == {}
