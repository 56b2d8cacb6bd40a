"""Servers and processes of a fault test's own, to kill and start again.

Each is a real process on loopback: a Redis, a PostgreSQL cluster, a worker,
beat or web server. A test that kills one touches nothing the rest of the
suite uses.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis
from celery import Celery

from tests.helpers import ROOT, child_environ, free_port, wait_for


class RedisServer:
    """A Redis of the test's own, to kill and start again on the same port."""

    def __init__(self, directory: Path):
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=(self.directory / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        wait_for(self.answers, 10, 0.05, "our redis-server")

    def answers(self) -> bool:
        try:
            return redis.Redis.from_url(self.url, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")
    return found[-1]


class PostgresServer:
    """A PostgreSQL cluster of the test's own (initdb, a free port, trust
    auth), to restart under a running release. As root, it runs as the
    `postgres` user, as PostgreSQL requires."""

    def __init__(self):
        # not under pytest's tmp_path: its parents are closed to the postgres user
        self.directory = Path(tempfile.mkdtemp(prefix="greenlight-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.log = self.directory / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [*(["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []), *args]
        subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _ctl(self, *args: str) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.directory} "
                   "-c fsync=off -c full_page_writes=off")
        self._run(_postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", *args)

    def start(self) -> None:
        if not self.data.exists():
            self._run(_postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                      "--encoding", "UTF8", "--locale", "C")
        self._ctl("start")

    def restart(self) -> None:
        """As a crash and a restart look: `immediate` ends every backend
        without a checkpoint, and the server recovers from its WAL."""
        self._ctl("-m", "immediate", "restart")

    def stop(self) -> None:
        self._ctl("-m", "immediate", "stop")

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)


class Child:
    """A worker, beat or web server of the test's own, in a process group of its own."""

    def __init__(self, args: list[str], directory: Path, redis_url: str, database_url: str, secret_key: str, **env):
        self.args, self.log = args, directory / "out.log"
        self.env = {**child_environ(), "DATABASE_URL": database_url, "REDIS_URL": redis_url, "CELERY_BROKER_URL": redis_url,
                    "GREENLIGHT_VAR_DIR": str(directory), "SECRET_KEY": secret_key, **env}
        self.process: subprocess.Popen | None = None

    def start(self, **env) -> None:
        self.process = subprocess.Popen(self.args, cwd=ROOT, env={**self.env, **env}, stdout=self.log.open("ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL its whole process group, as the OOM killer or a lost machine would end it."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_to_say(self, text: str, timeout: float, since: int = 0) -> None:
        wait_for(lambda: text in self.output()[since:] or self.process.poll() is not None, timeout, 0.05,
                 f"{text!r} in {self.log}")
        assert text in self.output()[since:], self.output()[-3000:]


# The tests' own Celery apps are never the current app: the project's tasks
# would follow one to a Redis that is gone once the test ends.
def answers_ping(redis_url: str, name: str) -> bool:
    app = Celery(broker=redis_url, set_as_current=False)
    try:
        return bool(app.control.ping(timeout=0.5, destination=[name]))
    except Exception:
        return False
    finally:
        app.close()


def send_to(redis_url: str, release_id: int, **options) -> str:
    """Queue a nudge on that broker; its task id."""
    app = Celery(broker=redis_url, set_as_current=False)
    try:
        return app.send_task("releases.tasks.advance_release", (release_id,), **options).id
    finally:
        app.close()
