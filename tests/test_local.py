"""Local commands: streamed output, and nothing they start outlives them."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from deployer import local
from deployer.errors import AdapterError, Cancelled
from tests.helpers import running


class Lines:
    """Collects what a command prints, and the pids it announces as `pid <n>`."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def __call__(self, stream: str, text: str) -> None:
        self.lines.append((stream, text))

    @property
    def pids(self) -> list[int]:
        return [int(text.split()[1]) for _, text in self.lines if text.startswith("pid ")]


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
        local.run(SLEEPERS, timeout=60, on_line=lines, cancelled=lambda: len(lines.pids) == 2)

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


# -- LOCAL_TASK_USER: another user of the machine -----------------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users takes root")


@pytest.fixture
def worker_secret_key():
    """The worker's secret key, written as settings writes it, in a directory others may enter
    (as the project's var/ may be), so only the file's own mode keeps it."""
    from deployer.settings import secret_key_file

    directory = tempfile.mkdtemp(prefix="greenlight-var-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "secret_key")
    key = secret_key_file(Path(path))
    yield path, key
    shutil.rmtree(directory)


@as_root
@pytest.mark.parametrize("user, uid, key_readable", [("nobody", 65534, False), ("", os.geteuid(), True)])
def test_a_local_task_runs_as_the_configured_user_who_cannot_read_the_worker_s_secret_key(
        worker_secret_key, user, uid, key_readable):
    path, key = worker_secret_key
    lines = Lines()

    status = local.run_in_scratch(f"id -u; id -g; id -G; echo HOME=$HOME USER=$USER; stat -c 'owner=%u mode=%a' .; cat {path}",
                                  user=user, timeout=30, on_line=lines)

    out = [text for stream, text in lines.lines if stream == "stdout"]
    err = [text for stream, text in lines.lines if stream == "stderr"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert out[0] == str(uid)
    if user:  # its primary group, and no other: not the worker's groups
        assert out[1:3] == ["65534", "65534"]
    home = out[3].split()[0][5:]
    assert home.startswith(os.path.join(os.path.realpath(tempfile.gettempdir()), "greenlight-task-"))
    assert out[3].split()[1] == f"USER={user or 'root'}"
    assert out[4] == f"owner={uid} mode=700"
    if key_readable:
        assert status == 0 and out[5] == key
    else:
        assert status != 0
        assert err == [f"cat: {path}: Permission denied"]
        assert key not in "\n".join(text for _, text in lines.lines)
    assert not os.path.exists(home), "the scratch directory is removed after, whoever owned its files"


@as_root
def test_a_timeout_ends_every_process_of_a_command_run_as_another_user():
    lines = Lines()

    with pytest.raises(AdapterError, match="timed out"):
        local.run_in_scratch(SLEEPERS, user="nobody", timeout=0.5, on_line=lines)

    assert len(lines.pids) == 2
    assert not [pid for pid in lines.pids if running(pid)]


@as_root
def test_a_cancel_ends_every_process_of_a_command_run_as_another_user():
    lines = Lines()

    with pytest.raises(Cancelled):
        local.run_in_scratch(SLEEPERS, user="nobody", timeout=60, on_line=lines, cancelled=lambda: len(lines.pids) == 2)

    assert len(lines.pids) == 2
    assert not [pid for pid in lines.pids if running(pid)]


def test_a_user_that_does_not_exist_fails_the_task_before_it_runs():
    with pytest.raises(AdapterError, match=r"local tasks are to run as 'no-such-greenlight-user' \(LOCAL_TASK_USER\), "
                                           r"which is not a user on this worker"):
        local.run_in_scratch("touch /tmp/greenlight-ran", user="no-such-greenlight-user", timeout=10)


def test_root_is_no_task_user():
    with pytest.raises(AdapterError, match="which is root: name an unprivileged user"):
        local.run_in_scratch("true", user="root", timeout=10)


@as_root
def test_a_worker_that_is_not_root_refuses_to_run_the_task_as_itself(tmp_path):
    os.chmod(tmp_path, 0o777)
    marker = tmp_path / "ran"
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the worker itself as nobody, asked to run a task as daemon
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            local.run_in_scratch(f"touch {marker}", user="daemon", timeout=10)
            os.write(write, b"it ran")
        except BaseException as exc:
            os.write(write, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        said = answer.read()
    os.waitpid(child, 0)

    assert said == ("local tasks are to run as 'daemon' (LOCAL_TASK_USER), but the worker runs as 'nobody', "
                    "not root, so it cannot switch to that user")
    assert not marker.exists()
