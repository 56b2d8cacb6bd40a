"""`make demo`: the whole product on one machine, in one foreground command.

Starts Redis if it is not running (and `redis-server` is installed), the
sandbox, a Celery worker, Celery beat and the ASGI web server, each in a
process group of its own; prefixes their output; restarts any that dies
(`deployer.supervisor`); stops them all, in order, on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand, CommandError

from deployer.sandbox.hosts import kill_marked
from deployer.supervisor import Child, Supervisor
from releases import roles, services


class Command(BaseCommand):
    help = "Run Greenlight with the sandbox, a worker, beat and the web server, restarting any that dies (Ctrl-C stops everything)."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
        parser.add_argument("--host", default="127.0.0.1")

    def handle(self, *args, **options):
        self.supervisor = Supervisor(on_restart=self._restarted)
        self._sandbox_restarted = False
        self._own_email_url: str | None = None  # EMAIL_URL as the demo found it
        stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        # the sandbox's repository is a file:// URL; the worker and web server inherit this
        os.environ["ALLOW_FILE_REPOSITORIES"] = "true"
        settings.ALLOW_FILE_REPOSITORIES = True
        python = [sys.executable]
        try:
            self._redis()
            username, password = self._admin()
            reviewer, reviewer_password = self._reviewer()
            sandbox = self._start("sandbox", [*python, "manage.py", "sandbox"], before_start=self._forget_sandbox)
            info = self._wait_for_sandbox(sandbox, stopping)
            if info is None:
                return
            environment = services.environment_import_sandbox(info=info)
            inbox = self._mail_to_inbox(info)
            self._start("worker", [*python, "-m", "celery", "-A", "deployer", "worker", "--loglevel", "info", "--concurrency", "2"])
            # beat on its own, never embedded in the worker: killing a worker must not orphan a
            # beat that a restarted worker would then double. The pidfile refuses a second beat
            # (another demo on the same var directory); a stale one (a killed beat) is removed.
            self._start("beat", [*python, "-m", "celery", "-A", "deployer", "beat", "--loglevel", "info",
                                 "--schedule", settings.CELERY_BEAT_SCHEDULE_FILENAME,
                                 "--pidfile", str(settings.VAR_DIR / "celerybeat.pid")])
            self._start("web", [*python, "-m", "daphne", "-b", options["host"], "-p", str(options["port"]), "deployer.asgi:application"])
            url = f"http://{options['host']}:{options['port']}/"
            self.stdout.write(
                "\n"
                f"  Greenlight   {url}   sign in as {username} / {password} to start a release,\n"
                f"               and as {reviewer} / {reviewer_password} (another browser) to approve it\n"
                f"  Load balancer {info['load_balancer_url']}  ({environment.name}; revisions {', '.join(info['revisions'])})\n"
                f"  AWS endpoint  {info['aws_endpoint_url']}  endpoints in {settings.SANDBOX_FILE}\n"
                f"  Notifications the demo sends: {inbox}\n"
                "  A part that stops is restarted; Ctrl-C stops everything.\n"
            )
            while not stopping.is_set():
                self.supervisor.check()
                self._import_restarted_sandbox()
                stopping.wait(0.5)
        finally:
            self.supervisor.stop()
            # an instance's processes leave the sandbox's group (daemons); a sandbox that was
            # killed, not stopped, could not end them, so they are ended by their mark
            kill_marked(settings.VAR_DIR / "sandbox")
            self.stdout.write("demo stopped")
        if given_up := self.supervisor.given_up():
            raise CommandError(f"demo stopped; it had given up on {', '.join(given_up)} (see above)")

    def _mail_to_inbox(self, info: dict) -> str:
        """The web server and the worker (started after this) mail through the
        sandbox's mail catcher, unless EMAIL_URL says otherwise. -> where to read what was sent."""
        inbox = info.get("inbox") or {}
        if not inbox:
            return "nowhere (this sandbox has no inbox)"
        if self._own_email_url is None:
            self._own_email_url = os.environ.get("EMAIL_URL", "")
        if self._own_email_url:
            return f"{inbox['url']} (Slack and webhooks; mail goes to EMAIL_URL)"
        os.environ["EMAIL_URL"] = inbox["email_url"]
        return inbox["url"]

    def _start(self, name: str, args: list[str], **options) -> Child:
        return self.supervisor.start(Child(name, args, cwd=settings.BASE_DIR, **options))

    def _forget_sandbox(self) -> None:
        # a killed sandbox leaves its file behind, pointing at dead endpoints
        settings.SANDBOX_FILE.unlink(missing_ok=True)

    def _restarted(self, child: Child) -> None:
        if child.name == "sandbox":
            self._sandbox_restarted = True

    def _import_restarted_sandbox(self) -> None:
        """A restarted sandbox may answer on other ports: store its endpoints again once it is ready."""
        if self._sandbox_restarted and settings.SANDBOX_FILE.exists():
            self._sandbox_restarted = False
            try:
                info = json.loads(settings.SANDBOX_FILE.read_text())
                services.environment_import_sandbox(info=info)
                self._mail_to_inbox(info)  # for the processes started from now on
            except Exception as exc:  # noqa: BLE001 -- say it and keep supervising
                self.supervisor.say(f"the restarted sandbox's endpoints could not be stored: {exc}")
            else:
                self.supervisor.say(f"the sandbox is back; {info['environment']} points at {info['aws_endpoint_url']}")

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
