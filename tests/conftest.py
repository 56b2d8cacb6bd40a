import os
import secrets
import string
import subprocess
import sys

import pytest
from django.conf import settings

from tests.helpers import ROOT, SandboxProcess, child_environ, free_port, wait_for

# The sandbox's repository is a file:// URL: allowed here, as `make demo` does,
# for this process (settings are loaded already) and the workers, web servers
# and sandboxes the tests start. Tests of the refusal turn it off.
os.environ["ALLOW_FILE_REPOSITORIES"] = "true"
settings.ALLOW_FILE_REPOSITORIES = True

# Starting a release runs its preflight first (on a worker, against real AWS or
# the sandbox); most tests start releases of environments that are not all
# there (an endpoint nobody answers, a key file that is not written), to test
# something else. Off here and in the processes the tests start; the tests of
# preflight itself (tests/test_preflight*.py) turn it on.
os.environ["PREFLIGHT_BEFORE_RELEASE"] = "false"
settings.PREFLIGHT_BEFORE_RELEASE = False

# Secrets of the workers' own, for the redaction tests (tests/test_redaction.py):
# a sensitive setting, and credentials an environment refers to as "env:GLREDACT".
# Every process the tests start inherits them.
os.environ.setdefault("GREENLIGHT_TEST_API_TOKEN", secrets.token_urlsafe(24))
os.environ.setdefault("GLREDACT_ACCESS_KEY_ID", "AKIA" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(16)))
os.environ.setdefault("GLREDACT_SECRET_ACCESS_KEY", secrets.token_urlsafe(30))


def _flush_through_deadlocks():
    """A transactional test ends by truncating every table, while the session's worker may be
    sweeping (reading releases and steps in a transaction): PostgreSQL can then find the two
    deadlocked and abort the truncate, which fails the test's teardown and leaves its rows for the
    next test. A truncate is safe to run again: it is, after a short pause, up to five times."""
    import time

    from django.db import OperationalError
    from django.db.backends.base.operations import BaseDatabaseOperations

    flush = BaseDatabaseOperations.execute_sql_flush

    def execute_sql_flush(self, sql_list):
        for attempt in range(5):
            try:
                return flush(self, sql_list)
            except OperationalError as exc:
                if getattr(exc.__cause__, "sqlstate", None) != "40P01" or attempt == 4:  # deadlock_detected
                    raise
                time.sleep(0.2 * (attempt + 1))

    BaseDatabaseOperations.execute_sql_flush = execute_sql_flush


_flush_through_deadlocks()

# Notifications (tests/test_notifications.py): the workers and web servers the
# tests start send mail to an SMTP server that test runs on this port, and try
# a failed delivery again soon, three times in all. (This process's own mail
# goes to pytest-django's outbox.)
os.environ.setdefault("EMAIL_URL", f"smtp://127.0.0.1:{free_port()}")
os.environ.setdefault("NOTIFY_RETRY_SECONDS", "0.3")
os.environ.setdefault("NOTIFY_ATTEMPTS", "3")


_db_blocker = None


@pytest.fixture(scope="session", autouse=True)
def _remember_the_db_blocker(django_db_blocker):
    global _db_blocker
    _db_blocker = django_db_blocker


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """The four role groups are data a migration made, and a transactional
    test's flush empties every table: made again once its fixtures are torn
    down, for whichever test comes next (two test processes run the files in
    no fixed order, so a test of the roles may come after a flush)."""
    yield
    marker = item.get_closest_marker("django_db")
    transactional = (marker and marker.kwargs.get("transaction")) or "transactional_db" in getattr(item, "fixturenames", ())
    if transactional and nextitem is not None and _db_blocker is not None:
        from django.contrib.auth.models import Group
        from django.db import connection

        from releases import roles

        with _db_blocker.unblock():
            Group.objects.bulk_create([Group(name=name) for name in roles.ALL], ignore_conflicts=True)
            connection.close()


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    """One seeded sandbox for the sandbox tests, stopped (and checked) at the end."""
    with SandboxProcess(tmp_path_factory.mktemp("sandbox")) as process:
        yield process


@pytest.fixture(scope="session")
def release_sandbox(tmp_path_factory):
    """A sandbox of its own for the release tests, which change what it serves."""
    with SandboxProcess(tmp_path_factory.mktemp("release-sandbox"), draining_timeout=1) as process:
        yield process


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker, tmp_path_factory):
    """A real worker (with beat) on the test database and the test broker."""
    from deployer.celery import app

    db = settings.DATABASES["default"]
    url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "deployer", "worker", "--beat", "--concurrency", "2",
         "-n", f"release-tests-{os.getpid()}@%h", "--loglevel", "info",
         "--schedule", str(log.parent / "beat-schedule")],
        cwd=ROOT,
        # the same key as the tests: every process that records appends to one audit chain
        # every AWS call it makes, as IAM actions, for tests/test_iam_policy.py (deployer/aws.py RECORD_CALLS)
        env={**child_environ(), "DATABASE_URL": url, "SWEEP_SECONDS": "1", "GREENLIGHT_VAR_DIR": str(log.parent),
             "SECRET_KEY": settings.SECRET_KEY, "GREENLIGHT_RECORD_AWS_CALLS": str(log.parent / "aws-calls.txt")},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: app.control.ping(timeout=0.5, destination=[f"release-tests-{os.getpid()}@{os.uname().nodename}"]), 60,
             message="the release worker")
    yield log
    process.terminate()
    process.wait(60)


@pytest.fixture(scope="session")
def web_server(celery_worker, tmp_path_factory):
    """The ASGI server (daphne) on the test database, as `make demo` runs it."""
    from tests.helpers import free_port

    db = settings.DATABASES["default"]
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "web.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "deployer.asgi:application"],
        cwd=ROOT,
        env={**child_environ(), "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
             "GREENLIGHT_VAR_DIR": str(log.parent), "SECRET_KEY": settings.SECRET_KEY},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    import requests

    def up():
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        except requests.Timeout:  # /healthz waits up to 2 s on each of the database and Redis: a busy machine
            return False
        except requests.ConnectionError:
            assert process.poll() is None, log.read_text()[-2000:]

    try:
        wait_for(up, 120, 0.2, "the web server")
    except BaseException:  # never leave it running behind a failed start
        process.terminate()
        process.wait(30)
        raise
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright; never a downloaded browser.

    Module-scoped: Playwright's sync API keeps an event loop running in this
    thread, which async tests elsewhere must not find."""
    from playwright.sync_api import sync_playwright

    # the test's own database calls are sync; Django would refuse them with that loop running
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
                headless=True,
                args=["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update", "--disable-sync"],
            )
            yield browser
            browser.close()
    finally:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
