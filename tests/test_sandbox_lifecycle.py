"""Starting, stopping and restarting the sandbox as a whole."""

import signal
import socket
from urllib.parse import urlsplit

import pytest

from deployer.sandbox.hosts import processes_marked
from tests.helpers import SandboxProcess
from tests.test_sandbox import served_by

pytestmark = pytest.mark.sandbox


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _endpoints(info: dict) -> list[tuple[str, int]]:
    urls = [info["aws_endpoint_url"], info["load_balancer_url"], *(i["url"] for i in info["instances"])]
    parts = [urlsplit(url) for url in urls]
    ssh = [(i["private_ip"], info["ssh_port"]) for i in info["instances"]]
    return [(p.hostname, p.port) for p in parts] + ssh


def test_a_stopped_sandbox_leaves_nothing_running_and_a_restart_changes_nothing(tmp_path):
    sandbox = SandboxProcess(tmp_path)
    first = sandbox.start()
    seeded = sorted(i["id"] for i in first["instances"])
    assert len(seeded) == 2
    app1 = next(i for i in first["instances"] if i["name"] == "app-1")
    ec2_app1 = {"PrivateIpAddress": app1["private_ip"], "InstanceId": app1["id"]}
    sandbox.run(ec2_app1, "setsid sleep 600 > /dev/null 2>&1 < /dev/null &")
    endpoints = _endpoints(first)
    assert all(_listening(*endpoint) for endpoint in endpoints)

    assert sandbox.stop() == 0

    assert processes_marked(tmp_path / "state") == []
    assert not any(_listening(*endpoint) for endpoint in endpoints)
    assert not sandbox.file.exists(), "a stopped sandbox must not advertise dead endpoints"

    second = sandbox.start()
    assert sorted(i["id"] for i in second["instances"]) == seeded
    named = sandbox.client("ec2").describe_instances(Filters=[{"Name": "tag:Name", "Values": ["app-*"]}])
    assert len([i for r in named["Reservations"] for i in r["Instances"]]) == 2
    answers = served_by(second["load_balancer_url"])
    assert {(status, revision) for status, revision, _ in answers} == {(200, "v1")}
    assert {instance for _, _, instance in answers} == set(seeded)

    sandbox.process.send_signal(signal.SIGINT)
    assert sandbox.process.wait(30) == 0
    assert processes_marked(tmp_path / "state") == []
