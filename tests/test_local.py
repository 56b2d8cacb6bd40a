"""Local commands: streamed output, and nothing they start outlives them."""

import os
import threading
import time

import pytest

from deployer import local
from deployer.errors import AdapterError, Cancelled


class Lines:
    """Collects what a command prints, and the pids it announces as `pid <n>`."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []
        self.started = threading.Event()

    def __call__(self, stream: str, text: str) -> None:
        self.lines.append((stream, text))
        if text.startswith("pid "):
            self.started.set()

    @property
    def pids(self) -> list[int]:
        return [int(text.split()[1]) for _, text in self.lines if text.startswith("pid ")]


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (PID 1 here may never reap one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


# the shell and a grandchild it does not wait for, both announced, then a long wait
SLEEPERS = "echo pid $$; sleep 300 & echo pid $!; sleep 300; echo never"


def test_it_streams_both_streams_in_order():
    lines = Lines()

    status = local.run("echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three; printf 'no newline'",
                       timeout=10, on_line=lines)

    assert status == 0
    assert lines.lines == [("stdout", "one"), ("stderr", "two"), ("stdout", "three"), ("stdout", "no newline")]


def test_it_returns_the_exit_status():
    assert local.run("exit 3", timeout=10) == 3


def test_it_decodes_bad_bytes_with_a_replacement_character():
    lines = Lines()

    local.run(r"printf 'caf\351\n'", timeout=10, on_line=lines)

    assert lines.lines == [("stdout", "caf\ufffd")]


def test_a_timeout_ends_the_command_and_the_grandchild_it_started():
    lines = Lines()
    started = time.monotonic()

    with pytest.raises(AdapterError, match=r"command timed out after 0.5s on the worker") as raised:
        local.run(SLEEPERS, timeout=0.5, on_line=lines)

    assert not isinstance(raised.value, Cancelled)
    assert len(lines.pids) == 2
    assert not [pid for pid in lines.pids if running(pid)]
    assert time.monotonic() - started < 5  # sleep obeys SIGTERM: no need to wait for SIGKILL


def test_a_cancel_ends_the_command_and_the_grandchild_it_started():
    lines = Lines()

    with pytest.raises(Cancelled, match="command cancelled on the worker"):
        local.run(SLEEPERS, timeout=60, on_line=lines, cancelled=lines.started.is_set)

    assert len(lines.pids) == 2
    assert not [pid for pid in lines.pids if running(pid)]


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace():
    lines = Lines()
    started = time.monotonic()

    with pytest.raises(AdapterError, match="timed out"):
        local.run("trap '' TERM; echo pid $$; while :; do sleep 0.1; done", timeout=0.5, on_line=lines)

    assert not [pid for pid in lines.pids if running(pid)]
    assert local.GRACE_SECONDS <= time.monotonic() - started < local.GRACE_SECONDS + 5


def test_a_child_holding_stdout_open_does_not_hang_the_call():
    lines = Lines()
    started = time.monotonic()

    status = local.run("sleep 300 & echo pid $!; echo done", timeout=60, on_line=lines)

    assert status == 0
    assert ("stdout", "done") in lines.lines
    assert time.monotonic() - started < 5
    assert not [pid for pid in lines.pids if running(pid)]


def test_a_process_that_escaped_the_group_does_not_hang_the_call():
    lines = Lines()

    # setsid puts the sleeper in a session of its own, out of reach, still holding stdout
    status = local.run("setsid sleep 3 & echo done", timeout=60, on_line=lines)

    assert status == 0
    assert lines.lines == [("stdout", "done")]


def test_a_failing_line_callback_still_ends_the_command():
    pids = []

    def on_line(stream, text):
        pids.append(int(text.split()[1]))
        raise RuntimeError("the log is down")

    with pytest.raises(RuntimeError, match="the log is down"):
        local.run("echo pid $$; sleep 300", timeout=60, on_line=on_line)

    assert pids and not running(pids[0])


def test_it_runs_in_the_given_directory_with_the_given_environment(tmp_path):
    lines = Lines()

    local.run('pwd; echo "$GREETING"', timeout=10, on_line=lines, cwd=str(tmp_path), env={"GREETING": "hello"})

    assert lines.lines == [("stdout", str(tmp_path)), ("stdout", "hello")]


def test_a_command_reading_stdin_gets_end_of_file_at_once():
    assert local.run("read answer", timeout=10) == 1


@pytest.fixture(autouse=True)
def every_shell_is_reaped():
    before = _children()  # a test session also has its worker, web server and sandboxes as children
    yield
    assert not _children() - before


def _children() -> set[str]:
    return {pid for pid in os.listdir("/proc") if pid.isdigit() and _child_of_us(pid)}


def _child_of_us(pid: str) -> bool:
    """Running or a zombie: a shell left unreaped is a leak too."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1]) == os.getpid()
    except FileNotFoundError:
        return False


def test_a_recipe_s_local_task_sees_no_secret_and_runs_outside_the_project(monkeypatch):
    from django.conf import settings

    secrets = {"SECRET_KEY": "s3cret-django-key", "DATABASE_URL": "postgres://gl:pw-db@db/gl", "REDIS_URL": "redis://:pw-redis@r/0",
               "CELERY_BROKER_URL": "redis://:pw-celery@r/1", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE00",
               "AWS_SECRET_ACCESS_KEY": "aws-secret-value-0123", "PROD_SECRET_ACCESS_KEY": "prefixed-secret-value"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    project = settings.BASE_DIR
    secret_key = (project / "var" / "secret_key")
    key = secret_key.read_text().strip() if secret_key.exists() else None
    lines = Lines()

    status = local.run_in_scratch("echo pwd=$(pwd); env; ls -a; cat var/secret_key ../var/secret_key", timeout=30, on_line=lines)

    output = "\n".join(text for _, text in lines.lines)
    cwd = next(text for _, text in lines.lines if text.startswith("pwd="))[4:]
    names = {text.split("=", 1)[0] for stream, text in lines.lines if stream == "stdout" and "=" in text and not text.startswith("pwd=")}
    assert status != 0  # cat found no var/secret_key
    assert not any(value in output for value in secrets.values())
    assert key is None or key not in output
    assert names <= {"PATH", "HOME", "LANG", "USER", "LOGNAME", "PWD", "SHLVL", "_"}, names
    assert f"HOME={cwd}" in output
    assert not cwd.startswith(str(project)) and not os.path.exists(cwd), "the scratch directory is removed after"
