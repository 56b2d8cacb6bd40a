"""Provisioning from the operator's side: a recipe's local tasks reach their
host over SSH with the files the worker makes for them ({ssh_config},
{known_hosts}, a copy of the key), the way `knife solo cook` does; and the
demo's cookbook recipe provisions a whole release that way."""

import os
import sys

import asyncssh
import pytest

from deployer import recipe
from releases import engine, plan, services, steps
from releases.models import Environment, Instance, LogLine, Recipe, Release
from tests.release_helpers import api, cloud, person, revisions_behind, start, wait_gate, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]
AS_NOBODY = os.geteuid() == 0  # a root worker runs them as LOCAL_TASK_USER; anyone else as itself


@pytest.fixture
def prepan(release_sandbox):
    return services.environment_import_sandbox(info=release_sandbox.info)


def running_instance(environment: Environment):
    return next(i for i in cloud(environment).instances(tags={"greenlight:environment": environment.name}, states=("running",)))


def run_provision(environment, tasks: dict, *, host_key: str | None = None) -> list[LogLine]:
    """The provision phase made of `tasks` on a running instance of the
    environment, as the engine runs a step; the lines it logged."""
    info = running_instance(environment)
    keys = cloud(environment).console_host_keys(info.id)
    frozen = plan.freeze(environment, strategy="bake", revision="v2", fleet_size=1)
    frozen["recipe"] = {"params": {"python": sys.executable}, "tasks": tasks, "phases": {"provision": list(tasks)}}
    release = Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan=frozen,
                                     requested_by=person("dana", "deployer"), status=Release.Status.CANCELLED)
    step = release.steps.create(position=0, key="provision", kind="action")
    row = Instance.objects.create(release=release, instance_id=info.id, name=info.name, role="canary",
                                  address=info.private_ip, host_key=keys[0] if host_key is None else host_key)
    with engine.writer_for(release) as log:
        context = steps.Context(release=release, step=step, cloud=engine.release_cloud(release), log=log)
        steps.run_phase(context, "provision", [row])
    return list(LogLine.objects.filter(release=release).order_by("seq"))


def stdout(lines):
    return [line.text for line in lines if line.stream == "stdout"]


@pytest.fixture
def task_user(settings):
    settings.LOCAL_TASK_USER = "nobody" if AS_NOBODY else ""
    return settings.LOCAL_TASK_USER


def test_a_local_task_reaches_its_host_by_address_and_by_name_with_the_config_the_worker_makes(prepan, task_user):
    info = running_instance(prepan)
    lines = run_provision(prepan, {"provision:ssh": {"run": "local", "commands": [
        "ssh -F {ssh_config} {host} 'echo on $INSTANCE_ID'",
        "ssh -F {ssh_config} {name} 'echo by name'",
        "stat -c '%u %a' {ssh_key_file} {ssh_config} {known_hosts}",
        "echo {ssh_key_file}",
        "grep -c . {known_hosts}",
    ]}})

    out = stdout(lines)
    assert out[:2] == [f"on {info.id}", "by name"]
    owner = str(65534 if AS_NOBODY else os.geteuid())
    assert out[2:5] == [f"{owner} 600"] * 3  # the task's user's, and only theirs
    key_copy = out[5]
    assert key_copy != prepan.ssh_key_file and not os.path.exists(key_copy)  # a copy, gone once the phase ended
    assert out[6] == "1"  # the host's pinned key, nothing else
    assert "PRIVATE KEY" not in "\n".join(line.text for line in lines)


def test_a_local_task_cannot_reach_a_host_whose_key_is_not_the_pinned_one(prepan, task_user):
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    with pytest.raises(steps.StepFailed, match=r"provision:ssh failed on .* \(exit 255\): .*(Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED)"):
        run_provision(prepan, {"provision:ssh": {"run": "local", "commands": ["ssh -F {ssh_config} {host} true"]}},
                      host_key=impostor)


def test_a_local_task_that_uses_no_ssh_file_needs_no_pinned_key(prepan, task_user):
    lines = run_provision(prepan, {"provision:echo": {"run": "local", "commands": ["echo {name} {host}"]}}, host_key="")
    assert len(stdout(lines)) == 1


def test_ssh_config_and_known_hosts_are_refused_in_a_remote_task():
    for name in ("ssh_config", "known_hosts"):
        with pytest.raises(recipe.RecipeError, match=f"task t: {name} is for local tasks"):
            recipe.validate({"tasks": {"t": {"run": "remote", "commands": [f"cat {{{name}}}"]}}})
    recipe.validate({"tasks": {"t": {"run": "local", "commands": ["ssh -F {ssh_config} -o UserKnownHostsFile={known_hosts} {host}"]}}})


def test_a_release_with_the_cookbook_recipe_provisions_from_the_worker_and_streams_the_cookbook_s_output(
        prepan, release_sandbox, celery_worker):
    cookbook = Recipe.objects.get(name="prepan-cookbook")
    Environment.objects.filter(pk=prepan.pk).update(recipe=cookbook)
    dana, ravi = person("dana", "deployer"), person("ravi", "approver")
    [before] = revisions_behind(prepan.public_url)
    target = "v2" if before == "v1" else "v1"

    release_id = start(dana, target, clone_count=1)
    wait_gate(release_id, "verify_directly", timeout=180)
    release = Release.objects.get(pk=release_id)
    canary = release.instances.get(slot="canary")
    provision = list(LogLine.objects.filter(release=release, step="provision").order_by("seq"))
    said = [(line.host, line.stream, line.text) for line in provision]
    assert (canary.name, "stdout", "cookbook: running recipe 10-directories") in said
    assert (canary.name, "stdout", "cookbook: running recipe 20-boot-script") in said
    assert (canary.name, "stdout", "cookbook: done") in said
    assert any(text.startswith("$ tar -C ") for _, _, text in said)
    assert api(ravi).post(f"/api/releases/{release_id}/gates/verify_directly/approve").status_code == 200
    wait_gate(release_id, "swap_elb", timeout=180)
    assert api(ravi).post(f"/api/releases/{release_id}/gates/swap_elb/approve").status_code == 200
    wait_status(release_id, Release.Status.SUCCEEDED, timeout=180)
    assert revisions_behind(prepan.public_url) == {target}
