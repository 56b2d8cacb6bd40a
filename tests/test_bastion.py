"""SSH through a bastion (jump host), against a sandbox whose instances
accept SSH only from its bastion: the adapter, OpenSSH's own client with the
generated config, and a whole release run by a real worker."""

import subprocess

import asyncssh
import pytest
import requests
from django.core.management import call_command

from deployer import aws, ssh
from deployer.errors import AdapterError
from releases import services
from releases.models import Environment, LogLine, Release
from tests.helpers import SandboxProcess, processes_with, wait_for
from tests.release_helpers import api, person, revisions_behind, start, wait_gate, wait_status

pytestmark = [pytest.mark.sandbox]


@pytest.fixture(scope="module")
def bastion_sandbox(tmp_path_factory):
    with SandboxProcess(tmp_path_factory.mktemp("bastion-sandbox"), bastion=True, draining_timeout=1) as process:
        yield process


def seeded(sandbox: SandboxProcess) -> dict:
    """An instance of the environment that runs now, as AWS says: the release test (which may
    come first) stops the seeded ones, so the sandbox file's list is not enough."""
    seeded_ids = [i["id"] for i in sandbox.info["environments"][0]["instances"]]
    answer = sandbox.client("ec2").describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
    running = [i for r in answer["Reservations"] for i in r["Instances"]]
    tags = lambda i: {t["Key"]: t["Value"] for t in i.get("Tags", [])}  # noqa: E731
    environment = sandbox.info["environments"][0]["environment"]
    instance = next((i for i in running if i["InstanceId"] in seeded_ids), None) or \
        next(i for i in running if tags(i).get(aws.TAG_ENVIRONMENT) == environment)
    name = next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == "Name"), "")
    return {"PrivateIpAddress": instance["PrivateIpAddress"], "InstanceId": instance["InstanceId"], "Name": name}


def test_the_instances_answer_ssh_through_the_bastion_and_only_through_it(bastion_sandbox):
    instance = seeded(bastion_sandbox)
    info = bastion_sandbox.info
    # seeded and running, its sshd may still be starting on a busy machine
    wait_for(lambda: ssh.listening(instance["PrivateIpAddress"], info["ssh_port"], jump=bastion_sandbox.jump()), 60, 0.5,
             "the seeded instance's SSH through the bastion")
    result, lines = bastion_sandbox.run(instance, "echo through the bastion")
    assert result.ok and lines == [("stdout", "through the bastion")]

    with pytest.raises(AdapterError, match="cannot reach"):
        ssh.run(bastion_sandbox.target(instance, jump=None), "true", timeout=10)
    assert ssh.listening(instance["PrivateIpAddress"], info["ssh_port"], jump=bastion_sandbox.jump())
    # an address nothing listens on, asked through the bastion
    assert not ssh.listening(info["bastion"]["host"].rsplit(".", 1)[0] + ".9", info["ssh_port"], jump=bastion_sandbox.jump())


def test_a_bastion_that_shows_another_key_is_refused_and_so_is_one_with_no_pinned_key(bastion_sandbox):
    instance = seeded(bastion_sandbox)
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    jump = bastion_sandbox.jump()
    with pytest.raises(AdapterError, match=r"host key of the bastion .* changed"):
        ssh.run(bastion_sandbox.target(instance, jump=ssh.Target(**{**jump.__dict__, "host_key": impostor})), "true")
    with pytest.raises(AdapterError, match="bastion .* has no pinned host key"):
        ssh.run(bastion_sandbox.target(instance, jump=ssh.Target(**{**jump.__dict__, "host_key": ""})), "true")
    with pytest.raises(AdapterError, match=r"\(the bastion\) refused our SSH key"):
        ssh.run(bastion_sandbox.target(instance, jump=ssh.Target(**{**jump.__dict__, "user": "root"})), "true")


def test_a_command_given_up_on_through_the_bastion_is_ended_on_the_instance(bastion_sandbox):
    instance = seeded(bastion_sandbox)
    with pytest.raises(AdapterError, match="timed out"):
        ssh.run(bastion_sandbox.target(instance), "sleep 373", timeout=2)
    wait_for(lambda: not processes_with(b"sleep\x00373"), 20, 0.2, "the command to be ended")


@pytest.mark.django_db(transaction=True)
def test_openssh_reaches_an_instance_through_the_bastion_with_the_generated_config(bastion_sandbox, tmp_path):
    environment = services.environment_import_sandbox(info=bastion_sandbox.info)
    assert environment.bastion_host == bastion_sandbox.info["bastion"]["host"]
    call_command("ssh_config", environment.name, "--directory", str(tmp_path))
    config = (tmp_path / "ssh_config").read_text()
    assert "ProxyJump prepan-bastion" in config and "StrictHostKeyChecking yes" in config
    assert "PRIVATE KEY" not in config + (tmp_path / "known_hosts").read_text()

    def ssh_to(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(["/usr/bin/ssh", "-F", str(tmp_path / "ssh_config"), "-o", "BatchMode=yes",
                               "-o", "ConnectTimeout=20", name, "echo $INSTANCE_ID"],
                              capture_output=True, text=True, timeout=60)

    instance = seeded(bastion_sandbox)
    assert f"Host {instance['Name']}\n" in config
    done = ssh_to(instance["Name"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == instance["InstanceId"]

    # a known_hosts whose bastion key is not the bastion's: OpenSSH refuses, as the config says
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2]
    known = (tmp_path / "known_hosts").read_text().splitlines()
    (tmp_path / "known_hosts").write_text("\n".join([f"{known[0].split()[0]} {' '.join(impostor)}", *known[1:]]) + "\n")
    refused = ssh_to(instance["Name"])
    assert refused.returncode != 0 and "host key" in refused.stderr.lower(), refused.stderr


@pytest.mark.django_db(transaction=True)
def test_a_release_runs_through_the_bastion_and_shows_the_direct_url_the_template_makes(bastion_sandbox, celery_worker):
    environment = services.environment_import_sandbox(info=bastion_sandbox.info)
    Environment.objects.filter(pk=environment.pk).update(
        verify_url_template="http://{private_ip}:{port}/?seen-as={name}")
    dana, ravi = person("dana", "deployer"), person("ravi", "approver")
    [before] = revisions_behind(environment.public_url)
    target = "v2" if before == "v1" else "v1"

    release_id = start(dana, target)
    wait_gate(release_id, "verify_directly", timeout=180)
    release = Release.objects.get(pk=release_id)
    canary = release.instances.get(slot="canary")
    card = api(ravi).get(f"/api/releases/{release_id}/").json()["gates"][0]["card"]
    assert card["url"] == f"http://{canary.address}:{environment.app_port}/?seen-as={canary.name}"
    assert requests.get(card["url"], timeout=5).headers["X-Revision"] == target
    assert canary.host_key.startswith("ssh-ed25519 ")
    assert LogLine.objects.filter(release=release, step="provision", text__contains="host key from its console output").exists()
    assert api(ravi).post(f"/api/releases/{release_id}/gates/verify_directly/approve").status_code == 200
    wait_gate(release_id, "swap_elb", timeout=180)
    assert api(ravi).post(f"/api/releases/{release_id}/gates/swap_elb/approve").status_code == 200
    wait_status(release_id, Release.Status.SUCCEEDED, timeout=180)
    assert revisions_behind(environment.public_url) == {target}
    # the instances were reached through the bastion: directly, they refuse SSH
    with pytest.raises(AdapterError):
        ssh.run(ssh.Target(host=canary.address, port=environment.ssh_port, user=environment.ssh_user,
                           private_key=open(environment.ssh_key_file).read(), host_key=canary.host_key), "true", timeout=10)



@pytest.mark.django_db
def test_preflight_reaches_the_fleet_through_the_bastion_and_refuses_an_impostor_bastion(bastion_sandbox):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from releases import preflight

    environment = services.environment_import_sandbox(info=bastion_sandbox.info)

    [check] = [c for c in preflight.run(environment) if c.name == "ssh"]
    assert check.status in ("ok", "warning"), check  # warning: the seeded fleet's keys are not pinned yet

    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    Environment.objects.filter(pk=environment.pk).update(bastion_host_key=other)
    [check] = [c for c in preflight.run(Environment.objects.get(pk=environment.pk)) if c.name == "ssh"]
    assert check.status == "failed" and "host key" in check.message, check
