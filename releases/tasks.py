"""Celery entry points: ids in, the engine does the work, and a release that
waits on AWS is queued again with a countdown rather than held by a worker."""

import json
import logging
import re
import time
import uuid

import redis
from celery import shared_task
from django.conf import settings
from kombu.exceptions import OperationalError

from deployer import git
from deployer.errors import AdapterError

from . import cleanup, engine, notifications, preflight
from .models import Environment

log = logging.getLogger(__name__)


def nudge(release_id: int, *, countdown: float | None = None) -> bool:
    """Queue `advance_release`; False when the broker cannot take it now.

    A message is a nudge, not the work: the release is in the database, and
    the sweep nudges every release that is due (a wait whose time has come, a
    queued release, a step whose worker died) once Redis answers again. So a
    broker that is down costs a delay, never a crashed task or a failed request.
    """
    try:
        if countdown is None:
            advance_release.delay(release_id)
        else:
            advance_release.apply_async((release_id,), countdown=countdown)
    except OperationalError as exc:
        log.warning("could not queue release %s (the sweep will nudge it when the broker is back): %s",
                    release_id, type(exc).__name__)
        return False
    return True


@shared_task(acks_late=True)
def advance_release(release_id: int) -> None:
    delay = engine.advance(release_id)
    if delay is not None:
        nudge(release_id, countdown=delay)


@shared_task(acks_late=True)
def rollback_release(release_id: int) -> None:
    """Kept only for messages that an older Greenlight queued under this name.

    A rollback used to be a task of its own; it is now the release's undo
    steps, run by `advance_release` like any other. A message still waiting
    in Redis (a countdown, or a queue not yet drained when the workers were
    upgraded) names this task: without it a worker would log "unregistered
    task" and drop the message, and that rollback would wait for the sweep.
    Nothing queues it any more; it can go once no worker from before may
    have left such a message behind."""
    advance_release(release_id)


@shared_task
def sweep() -> dict:
    result = engine.sweep()
    for release_id in result["nudge"]:
        nudge(release_id)
    for delivery_id in result["deliver"]:
        queue_delivery(delivery_id)
    return {**result, "nudge": len(result["nudge"]), "deliver": len(result["deliver"])}


def queue_delivery(delivery_id: int, *, countdown: float | None = None) -> bool:
    """Queue `deliver`; False when the broker cannot take it now (the sweep queues it again once it can)."""
    try:
        if countdown is None:
            deliver.delay(delivery_id)
        else:
            deliver.apply_async((delivery_id,), countdown=countdown)
    except OperationalError as exc:
        log.warning("could not queue delivery %s (the sweep will when the broker is back): %s", delivery_id,
                    type(exc).__name__)
        return False
    return True


@shared_task(acks_late=True)
def deliver(delivery_id: int) -> None:
    """Send one notification to one channel (releases/notifications.py); a failure comes back after its backoff."""
    delay = notifications.deliver(delivery_id)
    if delay is not None:
        queue_delivery(delivery_id, countdown=delay)


PREFLIGHT_REPLY = "greenlight:preflight:"  # + a random id: the list a worker pushes its answer to


@shared_task(acks_late=True)
def run_preflight(environment_id: int, reply_to: str, revision: str = "", strategy: str = "") -> None:
    environment = Environment.objects.select_related("recipe").filter(pk=environment_id).first()
    if environment is None:
        checks = [preflight.Check("environment", preflight.FAILED, "it was deleted a moment ago")]
    else:
        checks = preflight.run(environment, revision=revision, strategy=strategy)
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.rpush(reply_to, json.dumps([c.as_dict() for c in checks]))
        client.expire(reply_to, int(settings.PREFLIGHT_TIMEOUT) + 60)  # nobody may be waiting any more
    finally:
        client.close()


def preflight_on_worker(environment: Environment, *, revision: str = "", strategy: str = "") -> list[dict]:
    """Preflight as a worker sees it (its credentials, key files, network),
    for the web process: asks one and waits up to PREFLIGHT_TIMEOUT for the
    answer, a blocking pop on Redis, not a poll."""
    reply_to = f"{PREFLIGHT_REPLY}{uuid.uuid4().hex}"
    timeout = settings.PREFLIGHT_TIMEOUT
    fix = "start the workers (python -m celery -A deployer worker), or look at their logs"
    try:
        run_preflight.apply_async((environment.pk, reply_to, revision, strategy), expires=timeout)
    except OperationalError as exc:
        return [preflight.Check("workers", preflight.FAILED, f"cannot ask a worker: the broker did not take the message "
                                f"({type(exc).__name__})", fix).as_dict()]
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=timeout + 10)
    try:
        answer = client.blpop([reply_to], timeout=max(1, int(timeout)))
    except redis.RedisError as exc:
        answer, fix = None, f"Redis did not answer ({type(exc).__name__}); {fix}"
    finally:
        client.close()
    if answer is None:
        return [preflight.Check("workers", preflight.FAILED, f"no worker answered within {timeout:g}s", fix).as_dict()]
    return json.loads(answer[1])


# The revision picker's recent commits, read by a worker: a first clone of a big
# repository takes a minute, which no web request should wait for.
COMMITS = "greenlight:commits:"  # + the repository's mirror_name: {"at", "commits", "error", "asked"}
COMMITS_KEPT = 3600  # seconds Redis keeps an answer (how fresh it must be is the asker's to say)
COMMITS_ASKED_FOR = 120  # seconds one ask stands (a clone's 60 s limit, and a queue): then anyone may ask again
_ASK = re.compile(r"^[0-9a-f]{32}$")


@shared_task
def read_commits(environment_id: int, limit: int = 20, asked: str = "") -> None:
    """Fetch (or clone) this worker's bare clone of the environment's repository
    and leave its newest `limit` commits, or why they could not be read, in
    Redis, as the answer to the ask `asked`."""
    environment = Environment.objects.filter(pk=environment_id).first()
    if environment is None:
        return
    repository = environment.repository
    try:
        path = git.mirror(repository, settings.VAR_DIR / "repositories", allow_file=settings.ALLOW_FILE_REPOSITORIES)
        answer = {"commits": git.log(path, "HEAD", limit=limit), "error": ""}
    except AdapterError as exc:  # shown as is: git.py masks the repository's credentials
        answer = {"commits": [], "error": str(exc)}
    key = COMMITS + git.mirror_name(repository)
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.set(key, json.dumps({**answer, "at": time.time(), "asked": asked}), ex=COMMITS_KEPT)
        client.delete(key + ":asked")
    finally:
        client.close()


def commits_from_worker(environment: Environment, *, limit: int, fresh_for: float, asked: str = "") -> dict:
    """{"commits", "pending", "error", "asked"}: what a worker read of the
    repository's recent commits less than `fresh_for` seconds ago, or in answer
    to the ask `asked` (a page that is waiting for it: however short the window,
    the answer it waited for is shown). Else a worker is asked, once however
    many pages ask meanwhile, `pending` is True and `asked` names the ask to
    wait for. Never waits: the page shows "Fetching recent commits…" and asks again."""
    key = COMMITS + git.mirror_name(environment.repository)
    cannot = "cannot ask a worker to read the recent commits"
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    try:
        kept = client.get(key)
        answer = json.loads(kept) if kept else None
        if answer and (time.time() - answer["at"] < fresh_for or (asked and answer.get("asked") == asked)):
            return {"commits": answer["commits"][:limit], "pending": False, "error": answer["error"], "asked": ""}
        ask = uuid.uuid4().hex
        if client.set(key + ":asked", ask, nx=True, ex=COMMITS_ASKED_FOR):
            try:
                read_commits.apply_async((environment.pk, limit, ask), expires=COMMITS_ASKED_FOR)
            except OperationalError as exc:
                client.delete(key + ":asked")
                return {"commits": [], "pending": False, "asked": "",
                        "error": f"{cannot}: the broker did not take the message ({type(exc).__name__})"}
        else:  # someone asked a moment ago: wait for that answer
            ask = (client.get(key + ":asked") or b"").decode()
    except redis.RedisError as exc:
        return {"commits": [], "pending": False, "asked": "", "error": f"{cannot}: Redis did not answer ({type(exc).__name__})"}
    finally:
        client.close()
    return {"commits": [], "pending": True, "error": "", "asked": ask if _ASK.match(ask) else ""}


@shared_task
def clean_up() -> dict:
    """Baked images beyond each environment's last N, deleted with their snapshots."""
    return cleanup.clean_up()
