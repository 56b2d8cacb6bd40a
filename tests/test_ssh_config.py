"""The seed's `ec2ssh`: an OpenSSH config of an environment's instances by
Name tag with their pinned keys, from `manage.py ssh_config` and as a download
on the environment page; used here with the system's OpenSSH client."""

import io
import subprocess
import zipfile

import pytest
from django.core.management import call_command
from django.test import Client

from deployer import ssh
from deployer.errors import AdapterError
from releases import services
from releases.models import AuditEvent
from tests.release_helpers import cloud, person

OPENSSH = "/usr/bin/ssh"


def ssh_to(config: str, name: str, command: str = "echo $INSTANCE_ID") -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSH, "-F", config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", name, command],
                          capture_output=True, text=True, timeout=60)


def test_a_name_tag_that_is_not_a_plain_word_never_reaches_the_config_as_a_directive():
    hosts = [ssh.ConfigHost(name="app-3\n    ProxyCommand touch /tmp/pwned", address="10.0.1.5", host_key="", instance_id="i-0abc"),
             ssh.ConfigHost(name="app-4", address="10.0.1.6", host_key="ssh-ed25519 AAAAC3Nza", instance_id="i-0def")]
    config, known = ssh.openssh_config(hosts, user="ec2-user", port=22, key_file="/srv/keys/prod.pem", known_hosts="/k")

    assert "ProxyCommand" not in config
    assert "Host i-0abc\n" in config and "Host app-4\n" in config
    assert "# no host key is pinned for this host yet" in config
    assert known == "10.0.1.6 ssh-ed25519 AAAAC3Nza\n"
    with pytest.raises(AdapterError, match="cannot be written into an ssh config"):
        ssh.openssh_config(hosts, user="ec2-user\nProxyCommand x", port=22, key_file="/k", known_hosts="/k")


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
def test_manage_py_ssh_config_writes_a_config_that_openssh_uses_by_name_tag(release_sandbox, tmp_path):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    running = cloud(environment).instances(tags={"greenlight:environment": environment.name}, states=("running",))
    call_command("ssh_config", environment.name, "--directory", str(tmp_path))
    config = (tmp_path / "ssh_config").read_text()
    assert f"UserKnownHostsFile {tmp_path / 'known_hosts'}" in config
    assert f"IdentityFile {environment.ssh_key_file}" in config and "ProxyJump" not in config
    assert len((tmp_path / "known_hosts").read_text().splitlines()) == len(running)

    for instance in running:
        done = ssh_to(str(tmp_path / "ssh_config"), instance.name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == instance.id

    # another key for the host than the pinned one: OpenSSH refuses it
    (tmp_path / "known_hosts").write_text("\n".join(
        line.replace(line.split()[2], "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
        for line in (tmp_path / "known_hosts").read_text().splitlines()) + "\n")
    refused = ssh_to(str(tmp_path / "ssh_config"), running[0].name)
    assert refused.returncode == 255 and "host key" in refused.stderr.lower(), refused.stderr


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
def test_the_environment_page_offers_the_ssh_config_to_deployers_and_records_who_took_it(release_sandbox):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    deployer, viewer = Client(), Client()
    deployer.force_login(person("dana", "deployer"))
    viewer.force_login(person("vic", "viewer"))
    url = f"/environments/{environment.name}/ssh-config.zip"

    assert url in deployer.get(f"/environments/{environment.name}/").content.decode()
    assert url not in viewer.get(f"/environments/{environment.name}/").content.decode()
    assert viewer.get(url).status_code == 403

    response = deployer.get(url)
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == ["greenlight-prepan/known_hosts", "greenlight-prepan/ssh_config"]
    config = archive.read("greenlight-prepan/ssh_config").decode()
    assert "UserKnownHostsFile ~/.ssh/greenlight-prepan/known_hosts" in config and "StrictHostKeyChecking yes" in config
    assert "PRIVATE KEY" not in config and archive.read("greenlight-prepan/known_hosts").decode().startswith("[")
    event = AuditEvent.objects.get(action="environment.ssh_config")
    assert event.actor_name == "dana" and event.target == environment.name
