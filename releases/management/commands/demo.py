"""`make demo`: the whole product on one machine, in one foreground command.

Starts Redis if it is not running (and `redis-server` is installed), the
sandbox, a Celery worker with beat, and the ASGI web server; prefixes their
output; stops them all, in order, on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError

from releases import roles, services


class Child:
    def __init__(self, name: str, args: list[str], env: dict | None = None):
        self.name = name
        self.process = subprocess.Popen(
            args,
            cwd=settings.BASE_DIR,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop children in order
        )
        threading.Thread(target=self._relay, daemon=True).start()

    def _relay(self) -> None:
        for line in iter(self.process.stdout.readline, b""):
            sys.stdout.write(f"{self.name:>8} | {line.decode(errors='replace')}")
            sys.stdout.flush()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Command(BaseCommand):
    help = "Run Greenlight with the sandbox, a worker and the web server (Ctrl-C stops everything)."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
        parser.add_argument("--host", default="127.0.0.1")

    def handle(self, *args, **options):
        self.children: list[Child] = []
        stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        # the sandbox's repository is a file:// URL; the worker and web server inherit this
        os.environ["ALLOW_FILE_REPOSITORIES"] = "true"
        settings.ALLOW_FILE_REPOSITORIES = True
        try:
            self._redis()
            username, password = self._admin()
            reviewer, reviewer_password = self._reviewer()
            sandbox = self._start("sandbox", [sys.executable, "manage.py", "sandbox"])
            info = self._wait_for_sandbox(sandbox, stopping)
            if info is None:
                return
            environment = services.environment_import_sandbox(info=info)
            self._start("worker", [sys.executable, "-m", "celery", "-A", "deployer", "worker", "--beat", "--loglevel", "info", "--concurrency", "2"])
            self._start("web", [sys.executable, "-m", "daphne", "-b", options["host"], "-p", str(options["port"]), "deployer.asgi:application"])
            url = f"http://{options['host']}:{options['port']}/"
            self.stdout.write(
                "\n"
                f"  Greenlight   {url}   sign in as {username} / {password} to start a release,\n"
                f"               and as {reviewer} / {reviewer_password} (another browser) to approve it\n"
                f"  Load balancer {info['load_balancer_url']}  ({environment.name}; revisions {', '.join(info['revisions'])})\n"
                f"  AWS endpoint  {info['aws_endpoint_url']}  endpoints in {settings.SANDBOX_FILE}\n"
                "  Ctrl-C stops everything.\n"
            )
            while not stopping.is_set():
                if dead := [c.name for c in self.children if not c.alive()]:
                    raise CommandError(f"{', '.join(dead)} stopped unexpectedly; shutting down")
                stopping.wait(0.5)
        finally:
            for child in reversed(self.children):
                child.stop()
            self.stdout.write("demo stopped")

    def _start(self, name: str, args: list[str]) -> Child:
        child = Child(name, args)
        self.children.append(child)
        return child

    def _redis(self) -> None:
        url = urlsplit(settings.REDIS_URL)
        where = f"{url.hostname}:{url.port or 6379}"
        if self._redis_answers():
            return
        if url.hostname not in ("127.0.0.1", "localhost") or not shutil.which("redis-server"):
            raise CommandError(
                f"Redis is not reachable at {where}. Install and start it "
                "(Debian/Ubuntu: `sudo apt-get install redis-server`; macOS: `brew install redis`), "
                "or point REDIS_URL at one."
            )
        directory = settings.VAR_DIR / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        self.stdout.write(f"Redis is not running at {where}; starting one under {directory}")
        self._start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(url.port or 6379), "--dir", str(directory), "--save", "", "--appendonly", "no"])
        deadline = time.monotonic() + 15
        while not self._redis_answers():
            if time.monotonic() > deadline:
                raise CommandError(f"started redis-server but it does not answer at {where}")
            time.sleep(0.2)

    def _redis_answers(self) -> bool:
        try:
            return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1).ping()
        except redis.RedisError:
            return False

    def _admin(self) -> tuple[str, str]:
        return self._person(os.environ.get("DEMO_ADMIN_USERNAME", "admin"), "DEMO_ADMIN_PASSWORD", roles.ALL, staff=True)

    def _reviewer(self) -> tuple[str, str]:
        # four eyes: whoever starts a release cannot approve it, so a demo needs a second person
        return self._person("reviewer", "DEMO_REVIEWER_PASSWORD", (roles.VIEWER, roles.APPROVER), staff=False)

    def _person(self, username: str, password_variable: str, role_names, *, staff: bool) -> tuple[str, str]:
        password = os.environ.get(password_variable, "")
        saved = settings.VAR_DIR / f"demo-{username}-password"
        if not password:
            if not saved.exists():
                saved.touch(mode=0o600)
                saved.write_text(secrets.token_urlsafe(12))
            password = saved.read_text().strip()
        user, _ = User.objects.get_or_create(username=username)
        user.is_staff = user.is_superuser = staff
        user.set_password(password)
        user.save()
        user.groups.add(*(Group.objects.get_or_create(name=name)[0] for name in role_names))
        return username, password

    def _wait_for_sandbox(self, sandbox: Child, stopping: threading.Event) -> dict | None:
        deadline = time.monotonic() + 180
        while not stopping.is_set():
            if settings.SANDBOX_FILE.exists():
                return json.loads(settings.SANDBOX_FILE.read_text())
            if not sandbox.alive():
                raise CommandError("the sandbox stopped before it was ready (see its output above)")
            if time.monotonic() > deadline:
                raise CommandError("the sandbox was not ready within 3 minutes")
            time.sleep(0.2)
        return None
