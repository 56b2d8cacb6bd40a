"""Six environments release at once on a worker with two slots, at AWS's
timings: a wait holds no slot, so no release's waiting delays another's steps."""

import threading

import pytest

from releases import services
from releases.models import Release, Step
from tests.helpers import SandboxProcess, wait_for
from tests.release_helpers import api, person, revisions_behind, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]
NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
WORKER_SLOTS = 2  # tests/conftest.py's celery_worker runs with --concurrency 2


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    process = SandboxProcess(tmp_path_factory.mktemp("six"), timings="aws", time_scale=0.02, environments=NAMES, seed_count=1)
    process.start(timeout=240)
    yield process
    assert process.stop() == 0


class Watch:
    """Samples, a few times a second, how many of the releases are in the
    middle of a step at once (at work on a worker, or waiting on AWS)."""

    def __init__(self, release_ids):
        self.release_ids, self.most, self.most_waiting = release_ids, 0, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from django.db import connection

        try:
            while not self.stopping.wait(0.1):
                running = Step.objects.filter(release_id__in=self.release_ids, status="running")
                self.most = max(self.most, running.values("release_id").distinct().count())
                self.most_waiting = max(self.most_waiting, running.filter(lease_owner="").count())
        finally:
            connection.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(5)


@pytest.mark.timeout(600)  # six whole releases: about two minutes on a quiet machine
def test_six_environments_release_at_once_and_a_wait_holds_no_worker(six, celery_worker):
    entries = six.info["environments"]
    assert [e["environment"] for e in entries] == NAMES
    environments = [services.environment_import_sandbox(info=entry) for entry in entries]
    dana, ravi = person("dana", "deployer"), person("ravi", "approver")
    before = {e.name: revisions_behind(e.public_url, 4) for e in environments}
    ids = []
    for environment in environments:
        response = api(dana).post("/api/releases/", {"environment": environment.name, "revision": "v2", "clone_count": 1},
                                  format="json")
        assert response.status_code == 201, response.json()
        ids.append(response.json()["id"])

    with Watch(ids) as watch:
        for key in ("verify_directly", "swap_elb"):
            pending = set(ids)
            while pending:  # approve each gate as it opens, in whatever order they come
                opened = wait_for(lambda: [i for i in pending if Release.objects.get(pk=i).steps.filter(
                    key=key, status="awaiting_approval").exists()] or _failed(pending), 300, 0.2, f"a {key} gate")
                for release_id in opened:
                    assert api(ravi).post(f"/api/releases/{release_id}/gates/{key}/approve").status_code == 200
                    pending.discard(release_id)
        for release_id in ids:
            wait_status(release_id, Release.Status.SUCCEEDED, timeout=300)

    assert all(before[e.name] == {"v1"} for e in environments)
    assert all(revisions_behind(e.public_url, 4) == {"v2"} for e in environments)
    # more releases were mid-step at once than the worker has slots: the waiting ones held none
    assert watch.most_waiting > WORKER_SLOTS, (watch.most, watch.most_waiting)
    assert watch.most > WORKER_SLOTS


def _failed(release_ids):
    failed = Release.objects.filter(pk__in=release_ids, status__in=("failed", "rolled_back", "cancelled")).first()
    if failed:
        raise AssertionError(f"release {failed.pk} is {failed.status}: {failed.error}")
    return []
