"""`make bench`: how a release's time grows with its fleet.

Releases from a baked image, fleets of 2 and of 16, on the sandbox playing
AWS's timings at 1/50, through a real worker with two slots. Prints each
step's duration; asserts only that every release succeeded. Clones are
launched, checked and waited on at once, so 16 should take about as long
as 2.
"""

import time

import pytest

from releases import services
from releases.models import Environment, Release
from tests.helpers import SandboxProcess
from tests.release_helpers import api, person, wait_gate, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]
SCALE = 0.02
STEPS = ("launch", "deploy", "launch_clones", "smoke_clones", "register_new", "deregister_old", "stop_old")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    process = SandboxProcess(tmp_path_factory.mktemp("bench-fleet"), timings="aws", time_scale=SCALE)
    process.start(timeout=240)
    yield process
    process.stop()


def release(environment: Environment, dana, ravi, revision: str, **extra) -> Release:
    response = api(dana).post("/api/releases/", {"environment": environment.name, "revision": revision, **extra}, format="json")
    assert response.status_code == 201, response.json()
    release_id = response.json()["id"]
    for gate in ("verify_directly", "swap_elb"):
        wait_gate(release_id, gate, timeout=600)
        api(ravi).post(f"/api/releases/{release_id}/gates/{gate}/approve")
    return wait_status(release_id, Release.Status.SUCCEEDED, timeout=600)


def test_release_time_by_fleet_size(sandbox, celery_worker):
    environment = services.environment_import_sandbox(info=sandbox.info)
    dana, ravi = person("dana", "deployer"), person("ravi", "approver")
    baked = release(environment, dana, ravi, "v2", clone_count=1)
    Environment.objects.filter(pk=environment.pk).update(last_baked_ami=baked.state["image"])

    rows = []
    for fleet, revision in ((2, "v1"), (16, "v2")):
        started = time.monotonic()
        done = release(environment, dana, ravi, revision, strategy="deploy_from_image", clone_count=fleet)
        took = {s.key: (s.finished_at - s.started_at).total_seconds() for s in done.steps.all() if s.finished_at and s.started_at}
        rows.append((fleet, [took.get(key, 0.0) for key in STEPS], time.monotonic() - started))

    print(f"\n\nRelease from an image, sandbox at AWS's timings x{SCALE} (seconds; the gates were approved at once)\n")
    print(f"| fleet | {' | '.join(STEPS)} | whole release |")
    print(f"|---:|{'---:|' * len(STEPS)}---:|")
    for fleet, durations, whole in rows:
        print(f"| {fleet} | {' | '.join(f'{d:.1f}' for d in durations)} | {whole:.1f} |")
    two, sixteen = rows[0][2], rows[1][2]
    print(f"\na fleet of 16 took {sixteen / two:.2f}x a fleet of 2\n")
