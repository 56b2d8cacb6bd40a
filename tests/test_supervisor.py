"""The supervisor under `make demo`: restarts what dies, gives up on what keeps dying, orphans nothing."""

import os
import signal
import sys
import time

from deployer.supervisor import Child, Supervisor, describe_exit
from tests.helpers import running, wait_for


def supervisor(lines: list[str], **options) -> Supervisor:
    return Supervisor(write=lines.append, **options)


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and running(entry):
                    members.append(int(entry))
            except (ProcessLookupError, FileNotFoundError):
                pass
    return members


def test_it_names_how_a_child_ended():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"


def test_it_restarts_a_killed_child_in_a_group_of_its_own_and_says_so():
    lines: list[str] = []
    boss = supervisor(lines, backoff=(0.2,))
    child = boss.start(Child("sleeper", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(300)"]))
    try:
        first = child.pid
        assert os.getpgid(first) == first != os.getpgid(0)  # its own group: Ctrl-C in the terminal reaches only us
        os.killpg(first, signal.SIGKILL)

        def restarted():
            boss.check()
            return child.pid != first and child.alive()

        wait_for(restarted, 10, 0.05, "the child to be restarted")
        said = "".join(lines)
        assert f"sleeper (pid {first}) stopped: killed by SIGKILL" in said
        assert f"sleeper restarted (pid {child.pid}, start 2)" in said
        wait_for(lambda: "sleeper | up" in "".join(lines).split("restarted")[-1], 10, 0.05, "the new child's output")
    finally:
        boss.stop()
    assert not running(child.pid)


def test_it_gives_up_on_a_child_that_keeps_dying_quickly_and_keeps_the_others():
    lines: list[str] = []
    boss = supervisor(lines, backoff=(0.1, 0.2), quick=5, give_up_after=3)
    failing = boss.start(Child("failing", [sys.executable, "-c", "import sys; sys.exit(3)"]))
    steady = boss.start(Child("steady", [sys.executable, "-c", "import time; time.sleep(300)"]))
    try:
        def gave_up():
            boss.check()
            return failing.given_up

        wait_for(gave_up, 15, 0.05, "the supervisor to give up")
        said = "".join(lines)
        assert said.count("failing (pid") == 3 and "exit code 3" in said
        assert "restarting it in 0.1 s" in said and "restarting it in 0.2 s" in said
        assert "times in a row: giving up on it" in said
        assert failing.starts == 3 and boss.given_up() == ["failing"]
        time.sleep(0.5)
        boss.check()
        assert failing.starts == 3  # no more tries
        assert steady.alive() and steady.starts == 1
    finally:
        boss.stop()


def test_stopping_ends_the_whole_group_even_what_the_child_left_running():
    lines: list[str] = []
    boss = supervisor(lines)
    # a shell that ignores SIGTERM's polite request for its background children
    child = boss.start(Child("shell", ["sh", "-c", "sleep 300 & sleep 300 & echo started; wait"], stop_timeout=2))
    wait_for(lambda: "started" in "".join(lines), 10, 0.05, "the shell to start")
    wait_for(lambda: len(group_members(child.pid)) == 3, 10, 0.05, "the shell's two children")
    boss.stop()
    assert group_members(child.pid) == []


def test_a_dead_childs_leftovers_are_ended_before_it_is_restarted():
    lines: list[str] = []
    boss = supervisor(lines, backoff=(0.2,))
    child = boss.start(Child("parent", ["sh", "-c", "sleep 300 & echo started; wait"]))
    try:
        wait_for(lambda: len(group_members(child.pid)) == 2, 10, 0.05, "the grandchild")
        first = child.pid
        os.kill(first, signal.SIGKILL)  # only the leader: its child would be orphaned
        wait_for(lambda: (boss.check(), child.pid != first)[1], 10, 0.05, "the restart")
        assert group_members(first) == []
    finally:
        boss.stop()
