"""Redis going away under a running release, an idle page, and a browser watching (issue 9).

Each test runs its own Redis (a `redis-server` on a free port, no persistence,
as a restarted Redis is: empty) with a worker and a web server of its own on
it, so that killing that Redis touches nothing else; the database is the test
database, as for every other process the tests start.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from unittest import mock

import pytest
import requests
from django.conf import settings
from django.db import connection

from releases import services, tasks
from releases.logs import LogWriter
from releases.models import Environment, LogLine, Recipe, Release
from tests.faults import Child, RedisServer, answers_ping, send_to
from tests.helpers import free_port, wait_for
from tests.release_helpers import person, wait_gate, wait_status
from tests.test_browser import sign_in, wait_in

pytestmark = pytest.mark.sandbox


def database_url_of_tests() -> str:
    db = settings.DATABASES["default"]
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def on_test_database(args: list[str], directory, redis_url: str, **env) -> Child:
    """On its Redis and the test database."""
    return Child(args, directory, redis_url, database_url_of_tests(), settings.SECRET_KEY, **env)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def worker(own_redis, django_db_setup, django_db_blocker, tmp_path_factory):
    name = f"redis-faults-{os.getpid()}@{os.uname().nodename}"
    child = on_test_database([sys.executable, "-m", "celery", "-A", "deployer", "worker", "--beat", "--concurrency", "2",
                   "-n", name, "--loglevel", "info", "--schedule", str(tmp_path_factory.getbasetemp() / "beat-schedule")],
                  tmp_path_factory.mktemp("worker"), own_redis.url, SWEEP_SECONDS="1")
    child.name = name
    child.start()
    wait_for(lambda: answers_ping(own_redis.url, name), 60, 0.2, "our worker")
    yield child
    child.stop()


@pytest.fixture(scope="module")
def web(own_redis, worker, tmp_path_factory):
    port = free_port()
    child = on_test_database([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "deployer.asgi:application"],
                  tmp_path_factory.mktemp("web"), own_redis.url)
    child.url = f"http://127.0.0.1:{port}"
    child.start()
    wait_for(lambda: healthz(child.url)[0] == 200, 60, 0.2, "our web server")
    yield child
    child.stop()


def healthz(base: str) -> tuple[int, dict]:
    try:
        response = requests.get(f"{base}/healthz", timeout=10)
    except requests.ConnectionError:
        return 0, {}
    return response.status_code, response.json()


@pytest.fixture
def prepan(release_sandbox):
    return services.environment_import_sandbox(info=release_sandbox.info)


def ticking_recipe(environment: Environment, ticks: int, pause: float) -> None:
    """The demo recipe, with a deploy that ends in a command printing a line every `pause` seconds."""
    from deployer.sandbox.demo_recipe import RECIPE

    definition = {**RECIPE, "tasks": {**RECIPE["tasks"], "deploy:ticks": {"run": "remote", "commands": [
        f"for i in $(seq 1 {ticks}); do echo tick $i; sleep {pause}; done"]}}}
    definition["phases"] = {**RECIPE["phases"], "deploy": [*RECIPE["phases"]["deploy"], "deploy:ticks"]}
    recipe = Recipe.objects.create(name=f"ticking-{os.getpid()}-{time.monotonic_ns()}", definition=definition)
    Environment.objects.filter(pk=environment.pk).update(recipe=recipe)


@pytest.mark.django_db(transaction=True)
def test_a_worker_outlives_redis_restarting_under_a_running_step_and_the_release_reaches_its_gate(
        prepan, own_redis, worker):
    ticking_recipe(prepan, ticks=16, pause=0.25)
    dana = person("dana", "deployer", "approver")
    # the worker's sweep (every second) starts it; the test's own broker is not this Redis
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):
        release = services.release_create(environment=Environment.objects.get(pk=prepan.pk), revision="v2", actor=dana)
    wait_for(lambda: LogLine.objects.filter(release=release, text="tick 2").exists(), 90, 0.05, "the deploy to be ticking")
    # and a nudge with a countdown, as a release waiting on AWS leaves one: the
    # worker holds it unacknowledged while it goes on reading the queue
    held = send_to(own_redis.url, release.pk, countdown=60)
    wait_for(lambda: f"[{held}] received" in worker.output(), 10, 0.1, "the worker to hold the nudge")
    before = len(worker.output())

    own_redis.kill()  # in the middle of the deploy's command, the task at work
    time.sleep(3)
    own_redis.start()

    release = wait_gate(release.pk, "verify_directly", timeout=90)
    deploy = release.steps.get(key="deploy")
    assert deploy.status == "succeeded" and deploy.attempts == 1  # finished by the worker it was at, not re-run
    ticks = list(LogLine.objects.filter(release=release, text__startswith="tick ").values_list("text", flat=True))
    assert ticks == [f"tick {n}" for n in range(1, 17)]  # stored while Redis was away, in order
    assert worker.process.poll() is None, worker.output()[-3000:]
    after = worker.output()[before:]
    assert "Connection to broker lost" in after  # the fault did reach the worker
    assert "Unrecoverable error" not in after, after[-3000:]
    wait_for(lambda: answers_ping(own_redis.url, worker.name), 30, 0.2, "the worker to consume again")

    # and it still runs what it is sent: the cancel's rollback
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):
        services.release_cancel(release=release, actor=dana)
    assert wait_status(release.pk, "cancelled", timeout=90).status == "cancelled"


@pytest.mark.django_db(transaction=True)
def test_an_idle_release_page_keeps_its_websocket(prepan, web, browser):
    viewer = person("vic", "viewer")
    release = Release.objects.create(environment=prepan, revision="v2", fleet_size=1, plan={"environment": {"four_eyes": True}},
                                     requested_by=viewer, status="cancelled")
    page = sign_in(browser, web.url, "vic")
    before = len(web.output())

    page.goto(f"{web.url}/releases/{release.pk}/")
    wait_in(page, "document.getElementById('log-state').textContent === 'live'", 30)
    page.evaluate("""() => { window.closes = [];
        greenlightLog.socket.addEventListener('close', e => window.closes.push(e.code)); }""")
    time.sleep(15)  # three of the old 5 s blocking pops against a 5 s socket timeout

    assert page.evaluate("window.closes") == []
    assert page.evaluate("greenlightLog.socket.readyState") == 1  # OPEN
    assert len([url for url in page.websockets if "/ws/releases/" in url]) == 1  # (the dashboard before it had its own)
    log = web.output()[before:]
    assert "Exception inside application" not in log and "Traceback" not in log, log[-3000:]
    page.context.close()


@pytest.mark.django_db(transaction=True)
def test_the_page_reconnects_and_back_fills_through_redis_and_the_web_server_restarting(
        prepan, own_redis, web, browser, settings):
    # the lines this test writes are broadcast through our Redis, as the worker's would be
    settings.CHANNEL_LAYERS = {"default": {**settings.CHANNEL_LAYERS["default"], "CONFIG": {"hosts": [
        {**settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0], "address": own_redis.url}]}}}
    viewer = person("vic", "viewer")
    release = Release.objects.create(environment=prepan, revision="v2", fleet_size=1, plan={"environment": {"four_eyes": True}},
                                     requested_by=viewer, status="cancelled")
    page = sign_in(browser, web.url, "vic")
    page.goto(f"{web.url}/releases/{release.pk}/")
    wait_in(page, "document.getElementById('log-state').textContent === 'live'", 30)

    stop = threading.Event()
    written = []

    def write():
        try:
            with LogWriter(release.pk) as writer:
                n = 0
                while not stop.is_set():
                    n += 1
                    writer.write("deploy", f"line {n}", host="app-3", stream="stdout")
                    written.append(n)
                    time.sleep(0.02)
        finally:
            connection.close()  # this thread's own

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_in(page, "greenlightLog.lastSeq >= 20", 30)  # live lines arrive

        own_redis.kill()
        status, body = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(healthz(web.url)), 20, 0.2, "/healthz to say 503")
        assert body == {"status": "unavailable", "down": {"redis": body["down"]["redis"]}}
        wait_in(page, "document.getElementById('log-state').textContent === 'reconnecting…'", 30)
        time.sleep(2)
        own_redis.start()
        wait_for(lambda: healthz(web.url)[0] == 200, 20, 0.2, "/healthz to say 200 again")
        wait_in(page, "document.getElementById('log-state').textContent === 'live'", 30)
        seen = len(written)
        wait_in(page, f"greenlightLog.lastSeq >= {seen + 20}", 30)  # live again, past what was written meanwhile

        web.stop()  # and the web server, the same way
        time.sleep(2)
        web.start()
        wait_for(lambda: healthz(web.url)[0] == 200, 60, 0.2, "our web server again")
        wait_in(page, "document.getElementById('log-state').textContent === 'live'", 30)
        seen = len(written)
        wait_in(page, f"greenlightLog.lastSeq >= {seen + 20}", 30)
    finally:
        stop.set()
        writer.join(30)

    last = Release.objects.get(pk=release.pk).log_seq
    assert last == len(written) > 100
    wait_in(page, f"greenlightLog.lastSeq === {last}", 30)
    seqs = page.evaluate("greenlightLog.lines.map(l => l.seq)")
    assert seqs == list(range(1, last + 1))  # every number, each once, in order
    texts = page.evaluate("greenlightLog.lines.map(l => l.text)")
    assert texts == [f"line {n}" for n in range(1, last + 1)]
    page.context.close()


@pytest.fixture
def broker_down():
    """This process's Celery app, sending to a port nothing listens on."""
    from deployer.celery import app

    def reset():
        from kombu import pools

        if app._pool is not None:
            app._pool.force_close_all()
        app._pool, app.amqp._producer_pool = None, None
        pools.reset()  # kombu's own registry would hand the closed pool back to the next task sent (for the same URL)

    before = app.conf.broker_url
    app.conf.broker_url = f"redis://127.0.0.1:{free_port()}/0"
    reset()
    yield
    app.conf.broker_url = before
    reset()


def test_queueing_a_release_while_the_broker_is_down_is_a_warning_for_the_sweep_to_mend(broker_down, caplog):
    release_id = 12345

    assert tasks.nudge(release_id) is False
    assert tasks.nudge(release_id, countdown=5) is False

    warnings = [r.getMessage() for r in caplog.records if r.name == "releases.tasks"]
    assert warnings == [f"could not queue release {release_id} (the sweep will nudge it when the broker is back): OperationalError"] * 2
