"""Run a recipe's *local* commands on the worker, streaming their output.

A command (`knife solo cook ...`, say) starts processes of its own, so it
runs in a session of its own: one process group that can be ended as a
whole. Killing only the shell would leave its children running, and a child
that still holds the output pipes would keep the readers waiting forever.

Whatever happens -- the command exits, times out, is cancelled, or the line
callback raises -- `run` returns only once no process of the group is left
(what the command left running in the background is ended too), and it
never waits on pipes that an escaped process still holds open.
"""

from __future__ import annotations

import os
import pwd
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

from .errors import AdapterError, Cancelled
from .ssh import ConfigHost, LineCallback, Target, _LineSplitter, openssh_config

POLL_SECONDS = 0.2  # how often a quiet command's deadline and cancel are checked
GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL, to let tools clean up
KILL_WAIT_SECONDS = 5.0  # for the kernel to take SIGKILLed processes away


DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def task_user(name: str) -> pwd.struct_passwd | None:
    """The account a recipe's local commands run as: `name`'s, or None for the
    worker's own (`name` empty). Raises AdapterError when the worker cannot
    run them as `name`: a task never falls back to the worker's user."""
    if not name:
        return None
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        raise AdapterError(f"local tasks are to run as {name!r} (LOCAL_TASK_USER), which is not a user on this worker") from None
    if account.pw_uid == 0:
        raise AdapterError(f"local tasks are to run as {name!r} (LOCAL_TASK_USER), which is root: name an unprivileged user")
    if os.geteuid() not in (0, account.pw_uid):
        me = pwd.getpwuid(os.geteuid()).pw_name
        raise AdapterError(f"local tasks are to run as {name!r} (LOCAL_TASK_USER), but the worker runs as {me!r}, "
                           "not root, so it cannot switch to that user")
    return account


def scratch_environment(scratch: str, user: pwd.struct_passwd | None = None) -> dict[str, str]:
    """All a recipe's local command gets of the worker's environment: no
    SECRET_KEY, no database, Redis or Celery URL, no AWS credentials."""
    name = user.pw_name if user else pwd.getpwuid(os.getuid()).pw_name
    return {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "HOME": scratch, "LANG": os.environ.get("LANG") or "C.UTF-8",
            "USER": name, "LOGNAME": name}


class SSHKit:
    """What a local task needs to reach one host over SSH the way the worker
    does, and nothing it could use to reach another way: a copy of the key
    (and the bastion's), an ssh_config naming the host (by its Name tag and
    its address), the bastion as ProxyJump, and a known_hosts of the pinned
    keys only, with StrictHostKeyChecking. All of it in a directory of its
    own, 0700, the files 0600, owned by the task's user (LOCAL_TASK_USER), so
    that user reads the key only while the kit exists and nobody else ever
    does; `remove` deletes it. The original key stays unreadable to that user."""

    def __init__(self, *, target: Target, name: str, instance_id: str, user: str = ""):
        account = task_user(user)
        self.directory = tempfile.mkdtemp(prefix="greenlight-ssh-")  # 0700
        try:
            self._owner = (account.pw_uid, account.pw_gid) if account and account.pw_uid != os.geteuid() else None
            if self._owner:
                os.chown(self.directory, *self._owner)
            self.key_file = self._write("id_key", target.private_key)
            jump_key = self._write("bastion_key", target.jump.private_key) if target.jump else ""
            self.known_hosts = os.path.join(self.directory, "known_hosts")
            config, known = openssh_config(
                [ConfigHost(name=name, address=target.host, host_key=target.host_key, instance_id=instance_id)],
                user=target.user, port=target.port, key_file=self.key_file, known_hosts=self.known_hosts,
                jump=target.jump, jump_key_file=jump_key, match_address=True, batch=True,
                heading=f"{name} ({instance_id}) as Greenlight's workers reach it; removed when the task's phase ends")
            self._write("known_hosts", known)
            self.config = self._write("ssh_config", config)
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, text: str) -> str:
        path = os.path.join(self.directory, name)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text if text.endswith("\n") or not text else text + "\n")
        if self._owner:
            os.chown(path, *self._owner)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def run_in_scratch(command: str, *, user: str = "", extra_env: dict[str, str] | None = None, **options) -> int:
    """`run` a recipe's command in a fresh directory outside the project
    (removed after), with `scratch_environment` plus `extra_env`: a recipe is
    data a person typed, and the worker's directory holds var/secret_key and
    its environment every other secret. With `user` (LOCAL_TASK_USER) the
    command runs as that user and its primary group only, and the directory
    is that user's."""
    account = task_user(user)
    scratch = tempfile.mkdtemp(prefix="greenlight-task-")  # mode 0700: only its owner enters
    try:
        switch = {}
        if account and account.pw_uid != os.geteuid():
            os.chown(scratch, account.pw_uid, account.pw_gid)
            switch = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env = {**scratch_environment(scratch, account), **(extra_env or {})}
        return run(command, cwd=scratch, env=env, **switch, **options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(
    command: str,
    *,
    timeout: float,
    on_line: LineCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    cwd: str | None = None,
    env: dict | None = None,
    user: int | None = None,
    group: int | None = None,
    extra_groups: list[int] | None = None,
) -> int:
    """Run `/bin/sh -c command` on the worker; return its exit status.

    Streams stdout and stderr lines to `on_line(stream, text)` as they come.
    Raises AdapterError when it outlives `timeout` seconds and Cancelled when
    `cancelled()` turns true (a person cancelled, or the caller lost its
    lease on the step), each only after the whole group has ended, and
    Cancelled without starting anything when it is true already; a non-zero
    exit is a status, not an error, so the caller decides.
    `user`, `group` and `extra_groups` (ids) switch the command's identity
    before it starts, which takes a root worker.
    """
    if cancelled and cancelled():
        raise Cancelled("command cancelled on the worker before it started")
    process = subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,  # a command that asks a question gets EOF, not the worker's stdin
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so it can be ended as a whole
        cwd=cwd,
        env=env,
        user=user,
        group=group,
        extra_groups=extra_groups,
    )
    pipes = _Pipes(process, on_line)
    try:
        stopped = _watch(process, pipes, timeout, cancelled)
    finally:  # also on KeyboardInterrupt or SystemExit: nothing the command started may outlive it
        _end_group(process, pipes)
        pipes.close()
    if stopped or pipes.failure:
        raise stopped or pipes.failure
    return process.returncode


def _watch(process: subprocess.Popen, pipes: _Pipes, timeout: float, cancelled) -> Exception | None:
    """Stream output until the shell exits; the error to raise if it must be stopped first."""
    deadline = time.monotonic() + timeout
    next_cancel_check = 0.0
    while process.poll() is None:
        pipes.read(POLL_SECONDS)
        if pipes.failure:
            return pipes.failure
        now = time.monotonic()
        if now > deadline:
            return AdapterError(f"command timed out after {timeout:g}s on the worker")
        if cancelled and now >= next_cancel_check:  # a busy command must not ask on every chunk
            next_cancel_check = now + POLL_SECONDS
            if cancelled():
                return Cancelled("command cancelled on the worker")
    return None


def _end_group(process: subprocess.Popen, pipes: _Pipes) -> None:
    """SIGTERM the group, a grace, then SIGKILL; read output meanwhile so no one blocks on a full pipe."""
    group = process.pid  # start_new_session: the shell leads a group of its own id
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, KILL_WAIT_SECONDS)):
        process.poll()  # reap the shell, so it does not count as left as a zombie
        if not group_alive(group):
            break
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while group_alive(group) and time.monotonic() < deadline:
            pipes.read(0.05)
            process.poll()
    process.wait()
    pipes.drain()


def group_alive(group: int) -> bool:
    """Whether a process of the group still runs (zombies do not: they hold no pipes and run nothing).

    Orphaned members are reaped by whatever PID 1 is, which in a container
    may never happen, so asking kill(0) would wait on zombies forever.
    """
    try:
        entries = os.scandir("/proc")
    except FileNotFoundError:  # not Linux: kill(0) is the best there is
        try:
            os.killpg(group, 0)
            return True
        except ProcessLookupError:
            return False
    with entries:
        for entry in entries:
            if entry.name.isdigit() and _running_in(entry.name, group):
                return True
    return False


def _running_in(pid: str, group: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False  # it went away while we looked
    return int(fields[2]) == group and fields[0] not in (b"Z", b"X")


class _Pipes:
    """The command's stdout and stderr, read as data arrives, split into lines."""

    def __init__(self, process: subprocess.Popen, on_line: LineCallback | None):
        # the first exception on_line raised; kept, not raised, so the group is still ended
        self.failure: Exception | None = None
        self.selector = selectors.DefaultSelector()
        for pipe, name in ((process.stdout, "stdout"), (process.stderr, "stderr")):
            os.set_blocking(pipe.fileno(), False)
            self.selector.register(pipe, selectors.EVENT_READ, _LineSplitter(name, on_line))

    def read(self, wait: float) -> bool:
        """Read what arrives within `wait` seconds; whether anything did."""
        if not self.selector.get_map():
            time.sleep(wait)  # both closed while the command runs on
            return False
        got = False
        for key, _ in self.selector.select(wait):
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                self._feed(key.data, data)
                got = True
            else:  # every writer closed it
                self._finish(key)
        return got

    def drain(self) -> None:
        """Read what is left without waiting: a process that escaped the group may hold a pipe forever."""
        while self.selector.get_map() and self.read(0):
            pass
        # pipes that hit EOF during the last read are finished; the rest are given up on
        for key in list(self.selector.get_map().values()):
            self._finish(key)

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            self._finish(key)
        self.selector.close()

    def _feed(self, lines: _LineSplitter, data: bytes) -> None:
        try:
            lines.feed(data)
        except Exception as exc:
            self._mute(exc)

    def _mute(self, exc: Exception) -> None:
        """Drop the output from now on: the callback that failed would fail again."""
        self.failure = self.failure or exc
        for key in self.selector.get_map().values():
            key.data.on_line = None

    def _finish(self, key: selectors.SelectorKey) -> None:
        self.selector.unregister(key.fileobj)
        try:
            key.data.flush()
        except Exception as exc:
            self._mute(exc)
        key.fileobj.close()
