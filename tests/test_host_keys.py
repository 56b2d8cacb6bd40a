"""A new instance's host key comes from its console output, waited for up to
the environment's SSH limit; an instance whose console never shows one fails
the step saying what to look at, unless an administrator opted in to trust
on first use (SSH_TRUST_FIRST_CONTACT)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from deployer import ssh
from releases import engine, plan, services, steps
from releases.models import Instance, LogLine, Release
from tests.helpers import SandboxProcess
from tests.release_helpers import cloud, person

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def keyless_sandbox(tmp_path_factory):
    """Instances whose console output never shows their host keys (an image without cloud-init's keys-to-console)."""
    with SandboxProcess(tmp_path_factory.mktemp("keyless"), timing={"instance_pending": 0.5, "console_output": 10**6}) as process:
        yield process


@pytest.fixture
def provision(keyless_sandbox):
    """A provision step of a release, on a running instance with no pinned key; (context, row)."""
    environment = services.environment_import_sandbox(info=keyless_sandbox.info)
    environment.ssh_timeout = 30
    environment.save()
    info = next(i for i in cloud(environment).instances(tags={"greenlight:environment": environment.name}, states=("running",)))
    assert cloud(environment).console_host_keys(info.id) == []
    release = Release.objects.create(environment=environment, revision="v2", fleet_size=1, requested_by=person("dana", "deployer"),
                                     plan=plan.freeze(environment, strategy="bake", revision="v2", fleet_size=1),
                                     status=Release.Status.CANCELLED)  # so no worker takes it up
    step = release.steps.create(position=0, key="provision", kind="action", status="running")
    row = Instance.objects.create(release=release, instance_id=info.id, name=info.name, role="canary", address=info.private_ip)
    with engine.writer_for(release) as log:
        yield steps.Context(release=release, step=step, cloud=engine.release_cloud(release), log=log), row


def waited(context: steps.Context, row: Instance, seconds: float) -> None:
    """As if the step had waited `seconds` for the console already."""
    context.step.wait = {"key": f"console:{row.instance_id}", "since": (timezone.now() - timedelta(seconds=seconds)).isoformat()}


def test_an_instance_whose_console_shows_no_key_is_waited_for_and_then_fails_the_step_saying_what_to_do(provision, settings):
    settings.SSH_TRUST_FIRST_CONTACT = False
    context, row = provision

    with pytest.raises(steps.Wait) as wait:
        steps.reachable(context, row)
    assert wait.value.key == f"console:{row.instance_id}" and wait.value.timeout > 30

    waited(context, row, 29)
    with pytest.raises(steps.Wait):
        steps.reachable(context, row)

    waited(context, row, 31)
    with pytest.raises(steps.StepFailed) as failed:
        steps.reachable(context, row)
    message = str(failed.value)
    assert f"{row.name} ({row.instance_id}) answers SSH, but its console output showed no SSH host key within 30s" in message
    assert f"aws ec2 get-console-output --instance-id {row.instance_id}" in message and "cloud-init" in message
    assert Instance.objects.get(pk=row.pk).host_key == ""  # nothing was trusted


def test_with_trust_on_first_use_opted_in_the_first_key_is_pinned_and_the_log_says_so(provision, settings, keyless_sandbox):
    settings.SSH_TRUST_FIRST_CONTACT = True
    context, row = provision
    with pytest.raises(steps.Wait):
        steps.reachable(context, row)  # it still waits for the console first

    waited(context, row, 31)
    steps.reachable(context, row)
    context.log.flush()

    pinned = Instance.objects.get(pk=row.pk).host_key
    presented = ssh.run(keyless_sandbox.target({"PrivateIpAddress": row.address}), "true").host_key
    assert pinned == presented
    assert LogLine.objects.filter(release=context.release, stream="stderr",
                                  text__contains="trusting ssh-ed25519 from the first contact (SSH_TRUST_FIRST_CONTACT is on)").exists()
