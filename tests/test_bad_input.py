"""Bad input at every step, and instances that die behind Greenlight's back.

One test per row of issue 9's matrix: each ends in a failed step whose error
says what is wrong, with retry and rollback offered in the API, and after the
rollback nothing is orphaned -- checked against the sandbox's AWS by the
release's tags, not by what the release recorded.

Cheap on purpose (the whole file runs in a few minutes on a busy machine):
one shared sandbox, fleets of one, short limits on the environment, recipes
with only the task under test, and, where a test concerns one step, the steps
before it run in-process with the release kept out of the worker's way.
"""

from __future__ import annotations

import os
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from deployer import aws
from deployer.sandbox.demo_recipe import RECIPE
from releases import engine, plan, services, steps, tasks
from releases.logs import LogWriter
from releases.models import Environment, Instance, LogLine, Recipe, Release, Step
from tests.helpers import free_port, processes_with, wait_for
from tests.release_helpers import api, cloud, person, revisions_behind, start, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]

# Short limits, so that a failure comes in seconds (AWS seconds; time_scale stays the sandbox's 1).
LIMITS = {"ssh_timeout": 4, "command_timeout": 60, "smoke_timeout": 60, "instance_timeout": 60, "image_timeout": 60}


@pytest.fixture
def prepan(release_sandbox, celery_worker):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    Environment.objects.filter(pk=environment.pk).update(**LIMITS)
    return Environment.objects.get(pk=environment.pk)


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


def use_recipe(environment: Environment, tasks_: dict, *, provision: tuple = (), deploy: tuple = ()) -> None:
    recipe = Recipe.objects.create(name=f"matrix-{time.monotonic_ns()}", definition={
        "tasks": tasks_, "phases": {**({"provision": list(provision)} if provision else {}), **({"deploy": list(deploy)} if deploy else {})}})
    Environment.objects.filter(pk=environment.pk).update(recipe=recipe)


def fails_at(release_id: int, key: str, user) -> str:
    """The release failed at `key`, and a person is offered retry and rollback; the step's error."""
    release = wait_status(release_id, Release.Status.FAILED, timeout=90)
    detail = api(user).get(f"/api/releases/{release_id}/").json()
    failed = [s for s in detail["steps"] if s["status"] == "failed"]
    assert [s["key"] for s in failed] == [key], detail["steps"]
    assert {"retry", "rollback"} <= set(detail["actions"]), detail["actions"]
    assert release.error == f"{key}: {failed[0]['error']}"
    return failed[0]["error"]


def roll_back(release_id: int, user) -> Release:
    response = api(user).post(f"/api/releases/{release_id}/rollback")
    assert response.status_code == 200, response.json()
    return wait_status(release_id, Release.Status.ROLLED_BACK, timeout=90)


def assert_nothing_orphaned(environment: Environment, release: Release, old: set[str]) -> None:
    """By the release's tags in AWS: none of its instances runs, no verification
    rule is open, and the load balancer has exactly the old fleet, all running."""
    c = cloud(environment)
    mine = c.instances(tags={aws.TAG_RELEASE: str(release.uuid)})
    assert [(i.id, i.state) for i in mine if i.state not in ("stopped", "terminated")] == []
    group = c.ec2.describe_security_groups(GroupIds=[environment.verify_security_group_id])["SecurityGroups"][0]
    assert group["IpPermissions"] == []
    registered = c.registered()
    assert set(registered) == old
    assert {i.state for i in c.instances(ids=registered)} == {"running"}


# -- the matrix: AWS --------------------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", [
    ("base_ami", "ami-0000000000000dead", "the image ami-0000000000000dead does not exist"),
    ("security_group_ids", ["sg-0000000000000dead"], "the security group sg-0000000000000dead does not exist"),
    ("key_name", "nobodys-key", "the key pair nobodys-key does not exist"),
    ("load_balancer_name", "prepan-gone", "the load balancer prepan-gone does not exist"),
], ids=["unknown base AMI", "missing security group", "wrong key pair", "missing load balancer"])
def test_an_aws_resource_that_does_not_exist_fails_launch_saying_which(prepan, dana, field, value, expected):
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"t": {"commands": ["true"]}}, provision=("t",))
    Environment.objects.filter(pk=prepan.pk).update(**{field: value})

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "launch", dana)
    assert expected in error
    Environment.objects.filter(pk=prepan.pk).update(**{field: getattr(prepan, field)})
    release = roll_back(release_id, dana)
    assert_nothing_orphaned(prepan, release, old)


# -- the matrix: SSH --------------------------------------------------------------------


def test_ssh_that_never_answers_fails_provision_saying_where_it_waited(prepan, dana):
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"t": {"commands": ["true"]}}, provision=("t",))
    port = free_port()
    Environment.objects.filter(pk=prepan.pk).update(ssh_port=port)

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "provision", dana)
    canary = Release.objects.get(pk=release_id).instances.get(slot="canary")
    assert error.startswith(f"gave up after 4s waiting for SSH on {canary.name} at {canary.address}:{port}")
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


def test_a_wrong_ssh_key_fails_provision_saying_the_key_was_refused(prepan, dana, tmp_path):
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"t": {"commands": ["true"]}}, provision=("t",))
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    (tmp_path / "wrong_key").write_bytes(key)
    os.chmod(tmp_path / "wrong_key", 0o600)
    Environment.objects.filter(pk=prepan.pk).update(ssh_key_file=str(tmp_path / "wrong_key"))

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "provision", dana)
    assert "ec2-user@" in error and "refused our SSH key" in error
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


def assert_nothing_orphaned_after_rollback(environment, release_id, user, old):
    release = roll_back(release_id, user)
    assert [s.key for s in release.steps.filter(kind="rollback")] == ["stop_new"]
    assert_nothing_orphaned(environment, release, old)


# -- the matrix: commands and their output -------------------------------------------------


def test_a_command_that_exits_non_zero_fails_deploy_with_its_last_error_line(prepan, dana):
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"deploy:broken": {"commands": ["echo going", "echo 'cannot find the thing' >&2; exit 3"]}},
               deploy=("deploy:broken",))

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "deploy", dana)
    canary = Release.objects.get(pk=release_id).instances.get(slot="canary")
    assert error == f"deploy:broken failed on {canary.name} (exit 3): cannot find the thing"
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


def test_a_command_that_hangs_past_its_timeout_fails_deploy_and_is_ended(prepan, dana):
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"deploy:hang": {"timeout": 2, "commands": ["echo hanging; sleep 313"]}}, deploy=("deploy:hang",))

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "deploy", dana)
    canary = Release.objects.get(pk=release_id).instances.get(slot="canary")
    assert error == f"deploy:hang failed on {canary.name}: command timed out after 2s on {canary.address}"
    # ended by a kill of its process group over SSH, before any rollback stops the instance
    # (closing the session would not: sshd sends no signal without a terminal, nor does the sandbox)
    wait_for(lambda: not processes_with(b"sleep\x00313"), 10, 0.2, "the hung command to be ended")
    assert Release.objects.get(pk=release_id).status == Release.Status.FAILED
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


def test_ten_megabytes_on_one_line_are_cut_in_the_log_and_the_error(prepan, dana):
    old = set(cloud(prepan).registered())
    flood = "head -c 10485760 /dev/zero | tr '\\0' x"
    use_recipe(prepan, {"deploy:flood": {"commands": [f"{flood}; echo", f"{flood} >&2; exit 1"]}}, deploy=("deploy:flood",))

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "deploy", dana)
    assert error.startswith("deploy:flood failed on ") and "(exit 1): xxxx" in error
    assert len(error) < 1000 and error.endswith(" more characters cut]")
    lines = LogLine.objects.filter(release_id=release_id, step="deploy", stream__in=("stdout", "stderr")).exclude(host="")
    assert [line.text for line in lines] == ["x" * 65536 + f" [{10485760 - 65536} more bytes cut]"] * 2
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


def test_output_that_is_not_utf8_is_stored_with_replacement_characters(prepan, dana):
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"deploy:latin1": {"commands": [
        "printf 'caf\\351 \\000nul\\n'", "printf 'd\\351j\\340 \\377\\376 vu\\n' >&2; exit 2"]}}, deploy=("deploy:latin1",))

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "deploy", dana)
    assert error.endswith("(exit 2): d\ufffdj\ufffd \ufffd\ufffd vu")
    out = LogLine.objects.filter(release_id=release_id, step="deploy", stream="stdout").values_list("text", flat=True)
    assert list(out) == ["caf\ufffd \ufffdnul"]  # NUL too: no text column of PostgreSQL's holds it
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


def test_two_hundred_thousand_lines_reach_the_log_before_the_step_fails(prepan, dana):
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"deploy:chatty": {"commands": ["seq 200000; echo 'gave up at the end' >&2; exit 1"]}},
               deploy=("deploy:chatty",))

    release_id = start(dana, "v2", clone_count=1)

    error = fails_at(release_id, "deploy", dana)
    assert error.endswith("(exit 1): gave up at the end")
    out = LogLine.objects.filter(release_id=release_id, step="deploy", stream="stdout")
    assert out.count() == 200_000
    assert out.order_by("-seq").values_list("text", flat=True).first() == "200000"
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


def test_a_revision_that_does_not_exist_fails_deploy_naming_it(prepan, dana):
    old = set(cloud(prepan).registered())
    definition = {"params": RECIPE["params"], "tasks": RECIPE["tasks"],
                  "phases": {"deploy": ["deploy:setup:dir", "deploy:update"]}}
    Recipe.objects.filter(environment=prepan).update(definition=definition)

    # the API refuses a revision the repository lacks (tests/test_revisions.py): the service below it does not ask
    release_id = services.release_create(environment=Environment.objects.select_related("recipe").get(pk=prepan.pk),
                                         revision="v404", fleet_size=1, actor=dana).pk

    error = fails_at(release_id, "deploy", dana)
    assert error.startswith("deploy:update failed on ") and "v404" in error
    assert_nothing_orphaned_after_rollback(prepan, release_id, dana, old)


# -- an instance dies behind Greenlight's back -----------------------------------------------


def held_release(environment: Environment, user, revision: str = "v2") -> Release:
    """A release the worker leaves alone (cancelled, as far as the sweep can
    tell) while the test runs its first steps here; `hand_over` gives it back."""
    frozen = plan.freeze(environment, strategy="bake", revision=revision, fleet_size=1)
    release = Release.objects.create(environment=environment, revision=revision, fleet_size=1, plan=frozen,
                                     requested_by=user, status=Release.Status.CANCELLED)
    for n, step in enumerate(frozen["steps"]):
        release.steps.create(position=n, key=step["key"], kind=step["kind"])
    return release


def run_here(release: Release, key: str, timeout: float = 60) -> None:
    """The step `key`, run in this process to the end, and recorded as succeeded."""
    step = release.steps.get(key=key)
    with LogWriter(release.pk) as log:
        context = steps.Context(release=release, step=step, cloud=engine.release_cloud(release), log=log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = steps.ACTIONS[key](context) or {}
                break
            except steps.Wait as wait:
                assert time.monotonic() < deadline, f"{key} still waits for {wait.text}"
                time.sleep(0.2)
    Step.objects.filter(pk=step.pk).update(status=Step.Status.SUCCEEDED, attempts=1, result=result)


def hand_over(release: Release, next_key: str) -> None:
    """To the worker, from `next_key` on; the steps before it that did not run here count as skipped."""
    position = release.steps.get(key=next_key).position
    release.steps.filter(position__lt=position, status=Step.Status.PENDING).update(status=Step.Status.SKIPPED)
    Release.objects.filter(pk=release.pk).update(status=Release.Status.RUNNING)
    tasks.advance_release.delay(release.pk)


def stop_behind_our_back(sandbox, instance: Instance) -> None:
    sandbox.client("ec2").stop_instances(InstanceIds=[instance.instance_id])


def api_state(user, release_id: int, instance: Instance) -> str:
    detail = api(user).get(f"/api/releases/{release_id}/").json()
    return next(i["state"] for i in detail["instances"] if i["id"] == instance.instance_id)


def test_an_instance_stopped_during_smoke_clones_fails_it_saying_so_and_a_rollback_keeps_the_old_fleet(
        prepan, dana, release_sandbox):
    before = revisions_behind(prepan.public_url)
    old = set(cloud(prepan).registered())
    release = held_release(prepan, dana)
    run_here(release, "launch")  # from the base image: nothing answers on it, so smoke_clones waits
    canary = release.instances.get(slot="canary")
    hand_over(release, "smoke_clones")
    wait_for(lambda: "to pass their checks" in release.steps.get(key="smoke_clones").waiting_for, 30, 0.1,
             "smoke_clones to wait")

    stop_behind_our_back(release_sandbox, canary)

    error = fails_at(release.pk, "smoke_clones", dana)
    assert error == f"the instance {canary.instance_id} ({canary.name}) stopped (state: stopped) while smoke_clones checked it"
    assert api_state(dana, release.pk, canary) == "stopped"
    release = roll_back(release.pk, dana)
    assert revisions_behind(prepan.public_url) == before
    assert_nothing_orphaned(prepan, release, old)


def test_an_instance_stopped_after_register_new_fails_the_next_step_and_a_rollback_restores_the_old_fleet(
        prepan, dana, release_sandbox):
    before = revisions_behind(prepan.public_url)
    old = set(cloud(prepan).registered())
    release = held_release(prepan, dana, "v2" if before == {"v1"} else "v1")
    for key in ("launch", "provision", "deploy", "register_new"):
        run_here(release, key)
    canary = release.instances.get(slot="canary")
    assert canary.instance_id in cloud(prepan).registered()

    stop_behind_our_back(release_sandbox, canary)
    hand_over(release, "verify_production")

    error = fails_at(release.pk, "verify_production", dana)
    assert error == (f"the instance {canary.instance_id} ({canary.name}) stopped (state: stopped) "
                     "after it was put in service; verify_production stops here")
    assert set(cloud(prepan).registered()) == old | {canary.instance_id}  # the old fleet was never taken out
    release = roll_back(release.pk, dana)
    assert [s.key for s in release.steps.filter(kind="rollback")] == [
        "restore_old", "retire_new", "stop_new", "remove_image", "revoke_access"]
    assert revisions_behind(prepan.public_url) == before
    assert_nothing_orphaned(prepan, release, old)


def test_an_instance_stopped_mid_provision_fails_it_saying_so_and_a_retry_starts_it_again(prepan, dana, release_sandbox):
    """Finding 6: it said "exit 143: no output on stderr", a retry waited 180 s for SSH,
    and the API showed the canary running throughout."""
    old = set(cloud(prepan).registered())
    use_recipe(prepan, {"provision:slow": {"commands": [
        "if test -f provisioned; then echo provisioned already; else touch provisioned; echo about to wait; sleep 307; fi"]}},
        provision=("provision:slow",))
    release_id = start(dana, "v2", clone_count=1)
    wait_for(lambda: LogLine.objects.filter(release_id=release_id, text="about to wait").exists(), 60, 0.1,
             "the long command to start")
    canary = Release.objects.get(pk=release_id).instances.get(slot="canary")

    stop_behind_our_back(release_sandbox, canary)

    error = fails_at(release_id, "provision", dana)
    assert error == f"the instance {canary.instance_id} ({canary.name}) stopped (state: stopped) while provision:slow ran on it"
    assert api_state(dana, release_id, canary) == "stopped"

    assert api(dana).post(f"/api/releases/{release_id}/retry").status_code == 200
    wait_for(lambda: Release.objects.get(pk=release_id).steps.filter(key="provision", status="succeeded").first(), 60, 0.2,
             "the retried provision to succeed")
    logged = set(LogLine.objects.filter(release_id=release_id, step="provision").values_list("text", flat=True))
    assert f"{canary.name} ({canary.instance_id}) is stopped; starting it again" in logged
    assert "provisioned already" in logged
    assert api(dana).post(f"/api/releases/{release_id}/cancel").status_code == 200
    release = wait_status(release_id, Release.Status.CANCELLED, timeout=60)
    assert_nothing_orphaned(prepan, release, old)
