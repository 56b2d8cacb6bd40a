"""Keep a handful of child processes running: what `make demo` stands on.

Each child runs in a process group of its own, so that ending it ends what it
started too (a worker's pool, a shell's children), and a Ctrl-C in the
terminal reaches only the supervisor, which stops the children in order.
When a child dies the supervisor says which and how, and starts it again
after a backoff; a child that keeps dying soon after it starts is given up
on, saying so, while the others keep running (a dead worker must not take
the load balancer down with it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .local import group_alive


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def end_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when nothing is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # the number now names someone else's group
        return False


class Child:
    """One supervised command."""

    def __init__(self, name: str, args: list[str], *, cwd: Path | str | None = None, env: dict | None = None,
                 before_start: Callable[[], None] | None = None, stop_timeout: float = 20):
        self.name, self.args, self.cwd, self.env = name, args, cwd, env
        self.before_start = before_start  # e.g. remove what a killed run left behind
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.starts = 0
        self.quick_deaths = 0  # in a row
        self.restart_at: float | None = None
        self.given_up = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, write: Callable[[str], None]) -> None:
        if self.before_start:
            self.before_start()
        self.process = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env={**os.environ, **(self.env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: we end all of it, and Ctrl-C reaches only us
        )
        self.started_at = time.monotonic()
        self.starts += 1
        self.restart_at = None
        threading.Thread(target=self._relay, args=(self.process, write), name=f"relay-{self.name}", daemon=True).start()

    def _relay(self, process: subprocess.Popen, write: Callable[[str], None]) -> None:
        for line in iter(process.stdout.readline, b""):
            write(f"{self.name:>8} | {line.decode(errors='replace')}")
        process.stdout.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the child itself (it stops its own children in order),
        SIGKILL to its whole group after `stop_timeout`, and SIGKILL to
        whatever of the group outlived it either way."""
        if self.process is None:
            return
        if self.alive():
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                end_group(self.process.pid)
                self.process.wait()
        end_group(self.process.pid)
        self._wait_group_gone(self.process.pid)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 5) -> None:
        # zombies do not count: an orphan that PID 1 never reaps (a container) would hold us the whole timeout
        deadline = time.monotonic() + timeout
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)


class Supervisor:
    """Starts children, restarts the ones that die, stops them all on request."""

    def __init__(self, *, write: Callable[[str], None] | None = None, backoff: tuple[float, ...] = (1, 2, 4, 8, 16, 30),
                 quick: float = 15, give_up_after: int = 5, on_restart: Callable[[Child], None] | None = None):
        self.children: list[Child] = []
        self.backoff = backoff
        self.quick = quick  # a run shorter than this counts as dying quickly
        self.give_up_after = give_up_after  # quick deaths in a row
        self.on_restart = on_restart
        self._lock = threading.Lock()
        self._write = write or self._stdout

    @staticmethod
    def _stdout(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def write(self, text: str) -> None:
        with self._lock:  # whole lines, never two children's interleaved
            self._write(text)

    def say(self, message: str) -> None:
        self.write(f"{'demo':>8} | {message}\n")

    def start(self, child: Child) -> Child:
        self.children.append(child)
        child.start(self.write)
        return child

    def check(self) -> None:
        """Notice deaths, and restart what is due. Call it every half second or so."""
        now = time.monotonic()
        for child in self.children:
            if child.given_up or child.process is None:
                continue
            if child.restart_at is None and not child.alive():
                ran = now - child.started_at
                end_group(child.process.pid)  # what it started dies with it: no orphaned beat or pool
                child.quick_deaths = child.quick_deaths + 1 if ran < self.quick else 1
                how = describe_exit(child.process.returncode)
                if child.quick_deaths >= self.give_up_after:
                    child.given_up = True
                    self.say(f"{child.name} (pid {child.pid}) stopped: {how}, after {ran:.0f} s. It died within "
                             f"{self.quick:.0f} s of starting {child.quick_deaths} times in a row: giving up on it "
                             f"(see its output above); the rest keep running. Ctrl-C stops the demo.")
                    continue
                delay = self.backoff[min(child.quick_deaths - 1, len(self.backoff) - 1)]
                child.restart_at = now + delay
                self.say(f"{child.name} (pid {child.pid}) stopped: {how}, after {ran:.0f} s; restarting it in {delay:g} s")
            elif child.restart_at is not None and now >= child.restart_at:
                child.start(self.write)
                self.say(f"{child.name} restarted (pid {child.pid}, start {child.starts})")
                if self.on_restart:
                    self.on_restart(child)

    def given_up(self) -> list[str]:
        return [c.name for c in self.children if c.given_up]

    def stop(self) -> None:
        """Stop every child, last started first, and wait for each whole group."""
        for child in reversed(self.children):
            child.stop()
