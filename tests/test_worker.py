"""A real Celery worker connects to Redis and answers."""

import os
import subprocess
import sys

import pytest
from celery import Celery

from deployer.celery import app
from tests.helpers import ROOT, child_environ, wait_for


@pytest.fixture
def worker(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "deployer", "worker", "--pool", "solo", "-n", f"test-worker-{os.getpid()}@%h", "--loglevel", "warning"],
        cwd=ROOT,
        env={**child_environ(), "GREENLIGHT_VAR_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield process
    process.terminate()
    process.wait(30)


def test_a_worker_comes_up_on_the_redis_broker(worker):
    name = f"test-worker-{os.getpid()}@{os.uname().nodename}"

    # a Celery app of the test's own: the process's shared one may have been pointed elsewhere by an earlier test
    pinger = Celery("ping", broker=app.conf.broker_url, set_as_current=False)
    try:
        replies = wait_for(lambda: pinger.control.ping(timeout=0.5, destination=[name]), timeout=60,
                           message="the worker to answer ping")
    finally:
        pinger.close()

    assert replies == [{name: {"ok": "pong"}}]
