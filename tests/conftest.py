import os
import subprocess
import sys

import pytest
from django.conf import settings

from tests.helpers import ROOT, SandboxProcess, wait_for


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    """One seeded sandbox for the sandbox tests, stopped (and checked) at the end."""
    process = SandboxProcess(tmp_path_factory.mktemp("sandbox"))
    process.start()
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="session")
def release_sandbox(tmp_path_factory):
    """A sandbox of its own for the release tests, which change what it serves."""
    process = SandboxProcess(tmp_path_factory.mktemp("release-sandbox"), draining_timeout=1)
    process.start()
    yield process
    assert process.stop() == 0


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
        env={**os.environ, "DATABASE_URL": url, "SWEEP_SECONDS": "1", "GREENLIGHT_VAR_DIR": str(log.parent)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for(lambda: app.control.ping(timeout=0.5, destination=[f"release-tests-{os.getpid()}@{os.uname().nodename}"]), 60,
             message="the release worker")
    yield log
    process.terminate()
    process.wait(60)
