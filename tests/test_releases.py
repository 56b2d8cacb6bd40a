"""Whole releases on the sandbox, driven through the API, run by a real worker."""

import time

import pytest
import requests

from deployer import aws
from releases import audit, services
from releases.models import AuditEvent, Environment, LogLine, Release
from tests.release_helpers import LoadLoop, api, cloud, person, revisions_behind, start, wait_gate, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def prepan(release_sandbox, celery_worker):
    return services.environment_import_sandbox(info=release_sandbox.info)


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


@pytest.fixture
def ravi():
    return person("ravi", "approver")


def approve(user, release_id: int, key: str) -> None:
    response = api(user).post(f"/api/releases/{release_id}/gates/{key}/approve", {"comment": "looks good"}, format="json")
    assert response.status_code == 200, response.json()


def serving(environment: Environment) -> str:
    [revision] = revisions_behind(environment.public_url)
    return revision


def assert_nothing_left(environment: Environment, release: Release) -> None:
    c = cloud(environment)
    new = list(release.instances.filter(role__in=("canary", "clone")).values_list("instance_id", flat=True))
    assert not set(new) & set(c.registered())
    assert all(i.state == "stopped" for i in c.instances(ids=new)) if new else True
    assert not c.port_open(environment.verify_security_group_id, environment.app_port, environment.verify_cidr)


def test_a_bake_release_and_then_a_release_from_its_image(prepan, dana, ravi):
    before = serving(prepan)
    target = "v2" if before == "v1" else "v1"
    old = set(cloud(prepan).registered())

    with LoadLoop(prepan.public_url) as load:
        release_id = start(dana, target)
        release = wait_gate(release_id, "verify_directly")
        card = api(ravi).get(f"/api/releases/{release_id}/").json()["gates"][0]["card"]
        direct = requests.get(card["url"], timeout=5)
        assert direct.headers["X-Revision"] == target
        assert any("200" in check for check in card["checks"])
        approve(ravi, release_id, "verify_directly")

        wait_gate(release_id, "swap_elb")
        card = api(ravi).get(f"/api/releases/{release_id}/").json()["gates"][1]["card"]
        assert {i["instance"] for i in card["old"]} == old
        assert len(card["new"]) == prepan.desired_count
        approve(ravi, release_id, "swap_elb")

        release = wait_status(release_id, Release.Status.SUCCEEDED)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 50 and load.revisions == {before, target}

    assert revisions_behind(prepan.public_url) == {target}
    c = cloud(prepan)
    assert {i.state for i in c.instances(ids=list(old))} == {"stopped"}
    assert set(c.registered()).isdisjoint(old)
    assert not c.port_open(prepan.verify_security_group_id, prepan.app_port, prepan.verify_cidr)

    actions = set(AuditEvent.objects.filter(release=release).values_list("action", flat=True))
    assert {"release.create", "gate.approve", "aws:RunInstances", "aws:CreateImage", "aws:RegisterInstancesWithLoadBalancer",
            "aws:DeregisterInstancesFromLoadBalancer", "aws:StopInstances", "aws:AuthorizeSecurityGroupIngress",
            "aws:RevokeSecurityGroupIngress"} <= actions
    approvals = AuditEvent.objects.filter(release=release, action="gate.approve")
    assert [a.actor_name for a in approvals] == ["ravi", "ravi"]
    assert all(e.details["request_id"] for e in AuditEvent.objects.filter(release=release, action__startswith="aws:"))
    assert audit.verify().ok, audit.verify()  # the worker and the web process appended to one chain
    seqs = list(LogLine.objects.filter(release=release).values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))

    prepan.refresh_from_db()
    assert prepan.last_baked_ami == release.state["image"]

    # a day-to-day release: from that image, no provisioning
    second = start(dana, before, strategy="deploy_from_image")
    release = wait_gate(second, "verify_directly")
    assert "provision" not in [s.key for s in release.steps.all()]
    canary = cloud(prepan).instances(ids=[release.instances.get(slot="canary").instance_id])[0]
    assert cloud(prepan).ec2.describe_instances(InstanceIds=[canary.id])["Reservations"][0]["Instances"][0]["ImageId"] == prepan.last_baked_ami
    approve(ravi, second, "verify_directly")
    wait_gate(second, "swap_elb")
    approve(ravi, second, "swap_elb")
    wait_status(second, Release.Status.SUCCEEDED)
    assert revisions_behind(prepan.public_url) == {before}


def reject(user, release_id: int, key: str) -> None:
    response = api(user).post(f"/api/releases/{release_id}/gates/{key}/reject", {"comment": "not right"}, format="json")
    assert response.status_code == 200, response.json()


def test_rejecting_the_direct_check_rolls_back(prepan, dana, ravi):
    before = serving(prepan)
    release_id = start(dana, "v2" if before == "v1" else "v1")
    wait_gate(release_id, "verify_directly")

    reject(ravi, release_id, "verify_directly")

    release = wait_status(release_id, Release.Status.ROLLED_BACK)
    assert release.steps.get(key="verify_directly").error == "rejected by ravi: not right"
    assert revisions_behind(prepan.public_url) == {before}
    assert_nothing_left(prepan, release)


def test_rejecting_the_swap_rolls_back_with_no_failed_request(prepan, dana, ravi):
    before = serving(prepan)
    with LoadLoop(prepan.public_url) as load:
        release_id = start(dana, "v2" if before == "v1" else "v1")
        wait_gate(release_id, "verify_directly")
        approve(ravi, release_id, "verify_directly")
        wait_gate(release_id, "swap_elb")
        reject(ravi, release_id, "swap_elb")
        release = wait_status(release_id, Release.Status.ROLLED_BACK)
    assert load.failures == []
    assert revisions_behind(prepan.public_url) == {before}
    assert_nothing_left(prepan, release)


def test_a_gate_nobody_decides_rejects_itself_at_its_deadline(prepan, dana):
    Environment.objects.filter(pk=prepan.pk).update(gate_timeout=2)
    before = serving(prepan)
    release_id = start(dana, "v2" if before == "v1" else "v1")

    release = wait_status(release_id, Release.Status.ROLLED_BACK)

    assert release.steps.get(key="verify_directly").error == "nobody decided before the gate's deadline"
    assert AuditEvent.objects.filter(release=release, action="gate.expire").exists()
    assert revisions_behind(prepan.public_url) == {before}
    assert_nothing_left(prepan, release)


def test_cancelling_during_the_deploy_stops_and_cleans_up(prepan, dana):
    before = serving(prepan)
    release_id = start(dana, "v2" if before == "v1" else "v1")
    wait_for_step(release_id, "deploy", "running")

    response = api(dana).post(f"/api/releases/{release_id}/cancel")

    assert response.status_code == 200
    release = wait_status(release_id, Release.Status.CANCELLED)
    assert release.steps.get(key="deploy").status in ("failed", "succeeded")
    assert release.steps.get(key="verify_directly").status == "pending"
    assert revisions_behind(prepan.public_url) == {before}
    assert_nothing_left(prepan, release)


def wait_for_step(release_id: int, key: str, status: str, timeout: float = 60):
    from tests.helpers import wait_for

    return wait_for(lambda: Release.objects.get(pk=release_id).steps.filter(key=key, status=status).first(), timeout, 0.05,
                    f"{key} to be {status}")


def test_rolling_back_a_finished_release_brings_the_old_fleet_back(prepan, dana, ravi):
    before = serving(prepan)
    old = set(cloud(prepan).registered())
    baked_before = Environment.objects.get(pk=prepan.pk).last_baked_ami
    release_id = start(dana, "v2" if before == "v1" else "v1", clone_count=1)
    wait_gate(release_id, "verify_directly")
    approve(ravi, release_id, "verify_directly")
    wait_gate(release_id, "swap_elb")
    approve(ravi, release_id, "swap_elb")
    image = wait_status(release_id, Release.Status.SUCCEEDED).state["image"]
    assert Environment.objects.get(pk=prepan.pk).last_baked_ami == image

    with LoadLoop(prepan.public_url) as load:
        response = api(dana).post(f"/api/releases/{release_id}/rollback")
        assert response.status_code == 200, response.json()
        release = wait_status(release_id, Release.Status.ROLLED_BACK)

    assert load.failures == []
    assert revisions_behind(prepan.public_url) == {before}
    assert set(cloud(prepan).registered()) == old
    assert_nothing_left(prepan, release)
    # its image is undone too, and the environment bakes from the one it had before
    assert cloud(prepan).image(image) is None
    assert Environment.objects.get(pk=prepan.pk).last_baked_ami == baked_before


def test_a_failing_deploy_fails_its_step_with_the_reason_and_a_retry_after_the_fix_succeeds(prepan, dana, release_sandbox):
    # the API refuses a revision the repository lacks (tests/test_revisions.py): the service below it does not ask
    release_id = services.release_create(environment=prepan, revision="v9", actor=dana).pk

    release = wait_status(release_id, Release.Status.FAILED)

    deploy = release.steps.get(key="deploy")
    assert deploy.status == "failed"
    assert "deploy:update failed on" in deploy.error and "v9" in deploy.error
    stderr = LogLine.objects.filter(release=release, step="deploy", stream="stderr").values_list("text", flat=True)
    assert any("v9" in line for line in stderr)

    import subprocess

    repository = release_sandbox.info["repository"].removeprefix("file://")
    subprocess.run(["git", "-C", repository, "tag", "-f", "v9", "v2"], check=True, capture_output=True)
    try:
        response = api(dana).post(f"/api/releases/{release_id}/retry")
        assert response.status_code == 200, response.json()
        release = wait_gate(release_id, "verify_directly")
        assert release.steps.get(key="deploy").attempts == 2
    finally:
        subprocess.run(["git", "-C", repository, "tag", "-d", "v9"], check=True, capture_output=True)
    api(dana).post(f"/api/releases/{release_id}/cancel")
    wait_status(release_id, Release.Status.CANCELLED)


def test_a_revision_cannot_inject_a_command(prepan, dana, release_sandbox):
    release_id = services.release_create(environment=prepan, revision="v2;touch${IFS}pwned", actor=dana).pk

    release = wait_status(release_id, Release.Status.FAILED)

    assert release.steps.get(key="deploy").status == "failed"
    canary = {"PrivateIpAddress": release.instances.get(role="canary").address}
    result, lines = release_sandbox.run(canary, "find . -name pwned | wc -l")
    assert lines == [("stdout", "0")]
    api(dana).post(f"/api/releases/{release_id}/rollback")
    wait_status(release_id, Release.Status.ROLLED_BACK)


def test_a_step_run_again_after_a_crash_adopts_what_its_first_run_made(prepan, dana):
    """The worker died between the AWS call and recording its result."""
    from releases import engine, identity, plan, steps
    from releases.logs import LogWriter
    from releases.models import Instance

    frozen = plan.freeze(prepan, strategy="bake", revision="v2", fleet_size=1)
    # cancelled from the start, so the running worker leaves it alone
    release = Release.objects.create(environment=prepan, revision="v2", fleet_size=1, plan=frozen, requested_by=dana,
                                     status=Release.Status.CANCELLED)
    for n, step in enumerate(frozen["steps"]):
        release.steps.create(position=n, key=step["key"], kind=step["kind"])

    def run(key):
        with LogWriter(release.pk) as writer:
            context = steps.Context(release=release, step=release.steps.get(key=key), cloud=engine.release_cloud(release), log=writer)
            for _ in range(600):  # what the engine's timer would do, in a loop
                try:
                    return steps.ACTIONS[key](context)
                except steps.Wait:
                    time.sleep(0.1)
        raise AssertionError(f"{key} kept waiting")

    first = run("launch")
    release.state = {}  # what the crash lost
    Release.objects.filter(pk=release.pk).update(state={})
    Instance.objects.filter(release=release).delete()
    second = run("launch")

    assert second["instance"] == first["instance"]
    said = list(LogLine.objects.filter(release=release, step="launch").values_list("text", flat=True))
    assert len([t for t in said if t.startswith("launched ")]) == 1, said  # the second run says it adopted it
    assert [t for t in said if t.startswith("adopted ")] == [f"adopted {first['name']} ({first['instance']}), which an earlier run of launch launched"], said
    c = cloud(prepan)
    named = identity.of(release)
    assert not named.legacy
    assert [i.id for i in c.instances(tags={aws.TAG_RELEASE: str(release.uuid)})] == [first["instance"]]

    image = run("bake_image")["image"]
    release.state.pop("image")
    assert run("bake_image")["image"] == image
    images = c.ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [named.image_name]}])
    assert [i["ImageId"] for i in images["Images"]] == [image]
    c.terminate([first["instance"]])


def test_a_command_printing_100000_lines_reaches_the_log_complete_and_in_order(prepan, dana, release_sandbox):
    from releases import engine, plan, steps
    from releases.logs import LogWriter
    from releases.models import Instance

    frozen = plan.freeze(prepan, strategy="bake", revision="v2", fleet_size=1)
    frozen["recipe"] = {"tasks": {"flood": {"commands": ["seq 100000", "echo done >&2"]}}, "phases": {"deploy": ["flood"]}}
    release = Release.objects.create(environment=prepan, revision="v2", fleet_size=1, plan=frozen, requested_by=dana,
                                     status=Release.Status.CANCELLED)
    step = release.steps.create(position=0, key="deploy", kind="action")
    host = release_sandbox.launch(name="flood")
    row = Instance.objects.create(release=release, instance_id=host["InstanceId"], name="flood", role="canary", address=host["PrivateIpAddress"])
    context = steps.Context(release=release, step=step, cloud=engine.release_cloud(release), log=LogWriter(release.pk))

    steps.run_phase(context, "deploy", [row])
    context.log.flush()

    out = list(LogLine.objects.filter(release=release, stream="stdout").order_by("seq").values_list("text", flat=True))
    assert out == [str(n) for n in range(1, 100001)]
    assert LogLine.objects.filter(release=release, stream="stderr").values_list("text", flat=True).get() == "done"
    seqs = list(LogLine.objects.filter(release=release).values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    context.cloud.terminate([host["InstanceId"]])


def slow_recipe(prepan: Environment, pidfile) -> None:
    """The demo recipe with a local task in provision, and a deploy that ends in a long command."""
    from deployer.sandbox.demo_recipe import RECIPE
    from releases.models import Recipe

    definition = {
        **RECIPE,
        "params": {**RECIPE["params"], "pidfile": str(pidfile)},
        "tasks": {
            **RECIPE["tasks"],
            "provision:announce": {"run": "local", "commands": ["echo provisioning {name} at {host} as {ssh_user}"]},
            # two children in the background and one in front, each writing its pid down
            "deploy:slow-local": {"run": "local", "timeout": 600, "commands": [
                "sleep 300 & echo $! >> {pidfile}; sleep 301 & echo $! >> {pidfile}; echo about to wait; wait"]},
            "deploy:slow-remote": {"run": "remote", "commands": ["echo about to wait; sleep 302"]},
        },
    }
    definition["phases"] = {**RECIPE["phases"], "provision": [*RECIPE["phases"]["provision"], "provision:announce"]}
    recipe = Recipe.objects.create(name=f"slow-{pidfile.name}", definition=definition)
    Environment.objects.filter(pk=prepan.pk).update(recipe=recipe)
    return definition


@pytest.mark.parametrize("where", ["remote", "local"])
def test_cancelling_inside_a_long_command_ends_cancelled_with_the_old_fleet_serving_and_no_process_left(
        prepan, dana, where, tmp_path, release_sandbox):
    from releases.models import Recipe
    from tests.helpers import processes_with, running, wait_for

    pidfile = tmp_path / "pids"
    definition = slow_recipe(prepan, pidfile)
    definition["phases"]["deploy"] = ["deploy:setup:dir", f"deploy:slow-{where}"]
    Recipe.objects.filter(environment=prepan).update(definition=definition)
    before = serving(prepan)
    release_id = start(dana, "v2" if before == "v1" else "v1", clone_count=1)
    wait_for(lambda: LogLine.objects.filter(release_id=release_id, text="about to wait").exists(), 90, 0.1,
             "the long command to start")

    response = api(dana).post(f"/api/releases/{release_id}/cancel")

    assert response.status_code == 200, response.json()
    release = wait_status(release_id, Release.Status.CANCELLED, timeout=60)
    assert release.steps.get(key="deploy").error == "cancelled"
    assert [s.key for s in release.steps.filter(kind="rollback")] == ["stop_new"]
    assert api(dana).post(f"/api/releases/{release_id}/cancel").status_code == 409
    assert revisions_behind(prepan.public_url) == {before}
    assert_nothing_left(prepan, release)
    announced = LogLine.objects.filter(release=release, step="provision", text__startswith="provisioning ").get()
    canary = release.instances.get(slot="canary")
    assert announced.text == f"provisioning {canary.name} at {canary.address} as ec2-user" and announced.stream == "stdout"
    if where == "local":
        pids = [int(p) for p in pidfile.read_text().split()]
        assert len(pids) == 2 and not any(running(pid) for pid in pids)
    else:
        assert wait_for(lambda: not processes_with(b"sleep\x00302"), 10, 0.2, "the remote command to end")
