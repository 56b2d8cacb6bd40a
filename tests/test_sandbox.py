"""The sandbox behaves like the AWS and hosts the release engine will drive.

Everything here goes through boto3 against the moto server and paramiko
against the instances' SSH servers, the product's own adapters.
"""

import threading
import time

import asyncssh
import pytest
import requests
from botocore.exceptions import ClientError

from deployer import ssh
from deployer.errors import AdapterError
from deployer.sandbox import seed
from tests.helpers import processes_with, wait_for

pytestmark = pytest.mark.sandbox


def served_by(url: str, n: int = 12) -> list[tuple[int, str, str]]:
    """(status, revision, instance) for n requests."""
    answers = []
    for _ in range(n):
        response = requests.get(url, timeout=10)
        revision = response.headers.get("X-Revision", "")
        instance = response.text.split('id="instance">')[1].split("<")[0] if 'id="instance"' in response.text else ""
        answers.append((response.status_code, revision, instance))
    return answers


def test_the_seeded_environment_serves_v1_from_both_instances_through_the_load_balancer(sandbox):
    info = sandbox.info
    seeded = {i["id"] for i in info["instances"] if i["name"] in ("app-1", "app-2")}
    assert len(seeded) == 2

    answers = served_by(info["load_balancer_url"])

    assert {status for status, _, _ in answers} == {200}
    assert {revision for _, revision, _ in answers} == {"v1"}
    assert {instance for _, _, instance in answers} == seeded


def test_the_endpoints_file_says_how_to_reach_everything(sandbox):
    info = sandbox.info
    for key in ("aws_endpoint_url", "region", "load_balancer_url", "environment", "repository", "revisions"):
        assert info[key]
    assert info["revisions"] == ["v1", "v2"]
    app1 = next(i for i in info["instances"] if i["name"] == "app-1")
    assert requests.get(app1["url"], timeout=5).headers["X-Revision"] == "v1"
    described = sandbox.client("ec2").describe_instances(InstanceIds=[app1["id"]])["Reservations"][0]["Instances"][0]
    assert app1["ssh"] == f"{described['PrivateIpAddress']}:{info['ssh_port']}"


def test_it_runs_a_command_over_ssh_on_a_freshly_launched_instance(sandbox):
    instance = sandbox.launch()

    result, lines = sandbox.run(instance, "echo hello; echo oops >&2; pwd; exit 3")

    assert result.exit_status == 3
    assert ("stdout", "hello") in lines
    assert ("stderr", "oops") in lines
    # commands run in the instance's own directory, not the sandbox's
    cwd = next(text for stream, text in lines if stream == "stdout" and text.startswith("/"))
    assert instance["InstanceId"] in cwd


def test_a_command_printing_100000_lines_arrives_complete_and_in_order(sandbox):
    instance = sandbox.launch()

    result, lines = sandbox.run(instance, "seq 100000")

    assert result.ok
    assert [int(text) for _, text in lines] == list(range(1, 100001))


def test_a_command_that_outlives_its_timeout_fails(sandbox):
    instance = sandbox.launch()

    with pytest.raises(AdapterError, match="timed out"):
        sandbox.run(instance, "sleep 30", timeout=1)


def test_a_command_given_up_on_is_ended_with_its_children_but_not_the_daemons_it_started(sandbox):
    instance = sandbox.launch()
    sandbox.wait_for_ssh(instance)

    with pytest.raises(AdapterError, match="timed out"):
        sandbox.run(instance, "setsid sleep 331 < /dev/null > /dev/null 2>&1 & sh -c 'sleep 332'; sleep 333", timeout=1)

    # ssh.run sent the command's process group TERM: the command and its child end; the daemon is another group
    wait_for(lambda: not processes_with(b"sleep\x00332") and not processes_with(b"sleep\x00333"), 10, 0.1,
             "the command and its child to end")
    assert processes_with(b"sleep\x00331")
    sandbox.client("ec2").terminate_instances(InstanceIds=[instance["InstanceId"]])
    wait_for(lambda: not processes_with(b"sleep\x00331"), 30, 0.2, "the instance's processes to end with it")


def test_a_client_that_goes_away_leaves_its_command_running_as_sshd_does_without_a_terminal(sandbox):
    """No kinder than a real host: closing the connection does not end a command."""
    instance = sandbox.launch()
    sandbox.wait_for_ssh(instance)
    client, _ = ssh.connect(sandbox.target(instance))
    channel = client.get_transport().open_session()
    channel.exec_command("sleep 334")
    wait_for(lambda: processes_with(b"sleep\x00334"), 10, 0.1, "the command to start")

    client.close()

    time.sleep(1.5)
    assert processes_with(b"sleep\x00334")
    sandbox.client("ec2").terminate_instances(InstanceIds=[instance["InstanceId"]])
    wait_for(lambda: not processes_with(b"sleep\x00334"), 30, 0.2, "the command to end with its instance")


def test_host_keys_are_pinned_after_first_contact(sandbox):
    instance = sandbox.launch()
    first = ssh.run(sandbox.target(instance), "true")
    assert first.host_key.startswith("ssh-ed25519 ")

    again = ssh.run(sandbox.target(instance, host_key=first.host_key), "true")
    assert again.host_key == first.host_key

    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    with pytest.raises(AdapterError, match="host key .* changed"):
        ssh.run(sandbox.target(instance, host_key=impostor), "true")


def test_it_refuses_a_key_that_is_not_the_instance_key_pair(sandbox):
    instance = sandbox.launch()
    stranger = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh").decode()

    with pytest.raises(AdapterError, match="refused our SSH key"):
        ssh.run(sandbox.target(instance, private_key=stranger), "true")
    with pytest.raises(AdapterError, match="refused our SSH key"):
        ssh.run(sandbox.target(instance, user="root"), "true")


def test_an_instance_launched_from_an_image_starts_with_the_files_of_the_original(sandbox):
    ec2 = sandbox.client("ec2")
    canary = sandbox.launch(name="canary")
    assert sandbox.run(canary, "mkdir -p srv && echo deployed-v2 > srv/marker")[0].ok
    ec2.stop_instances(InstanceIds=[canary["InstanceId"]])

    image_id = ec2.create_image(InstanceId=canary["InstanceId"], Name=f"bake-{canary['InstanceId']}")["ImageId"]
    # what the canary does after the bake must not reach the image
    ec2.start_instances(InstanceIds=[canary["InstanceId"]])
    sandbox.wait_for_ssh(canary)
    assert sandbox.run(canary, "echo changed-after-bake > srv/marker")[0].ok

    clone = sandbox.launch(image_id=image_id, name="clone")
    result, lines = sandbox.run(clone, "cat srv/marker")
    assert result.ok
    assert lines == [("stdout", "deployed-v2")]


def test_a_second_image_with_the_same_name_is_refused_as_aws_does(sandbox):
    ec2 = sandbox.client("ec2")
    instance = sandbox.launch()
    name = f"bake-{instance['InstanceId']}"
    ec2.create_image(InstanceId=instance["InstanceId"], Name=name)

    with pytest.raises(ClientError) as error:
        ec2.create_image(InstanceId=instance["InstanceId"], Name=name)
    assert error.value.response["Error"]["Code"] == "InvalidAMIName.Duplicate"


def test_an_unknown_image_is_refused_as_aws_does(sandbox):
    info = sandbox.info
    with pytest.raises(ClientError) as error:
        sandbox.client("ec2").run_instances(
            ImageId="ami-00000000000000000", InstanceType=info["instance_type"], MinCount=1, MaxCount=1
        )
    assert error.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"


def test_stopping_an_instance_ends_its_processes_and_starting_it_runs_the_boot_script(sandbox):
    ec2 = sandbox.client("ec2")
    instance = sandbox.launch()
    boot_script = "mkdir -p var; echo boot >> var/boots; setsid sleep 600 > /dev/null 2>&1 < /dev/null &"
    sandbox.run(instance, f"mkdir -p etc && printf '%s\\n' '{boot_script}' > etc/rc.local")
    result, lines = sandbox.run(instance, "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo $!")
    daemon_pid = int(lines[0][1])

    ec2.stop_instances(InstanceIds=[instance["InstanceId"]])

    wait_for(lambda: not _alive(daemon_pid), 10, message="the detached process to end")
    target = sandbox.target(instance)
    wait_for(lambda: _refused(target), 10, message="SSH to close")

    ec2.start_instances(InstanceIds=[instance["InstanceId"]])
    sandbox.wait_for_ssh(instance)
    wait_for(lambda: sandbox.run(instance, "cat var/boots")[1] == [("stdout", "boot")], 10, message="the boot script")
    result, lines = sandbox.run(instance, "pgrep -f 'sleep 600' | wc -l")
    assert int(lines[0][1]) >= 1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _refused(target) -> bool:
    try:
        ssh.run(target, "true", timeout=2)
        return False
    except AdapterError:
        return True


def deploy_demo(sandbox, instance: dict, revision: str) -> None:
    info = sandbox.info
    target = sandbox.target(instance)
    seed.apply(
        target,
        ["provision", "deploy"],
        {
            "host": target.host,
            "instance_id": instance["InstanceId"],
            "name": "test",
            "ssh_user": info["ssh_user"],
            "ssh_port": info["ssh_port"],
            "ssh_key_file": info["ssh_key_file"],
            "revision": revision,
            "repository": info["repository"],
            "app_port": info["app_port"],
            "environment": info["environment"],
        },
    )


def test_the_load_balancer_routes_to_healthy_registered_instances_and_drains_deregistered_ones(sandbox):
    info = sandbox.info
    elb = sandbox.client("elb")
    lb_url = info["load_balancer_url"]
    name = info["load_balancer_name"]
    instance = sandbox.launch(name="app-new")
    new_id = instance["InstanceId"]
    try:
        # registered before it serves anything: it must get no traffic
        elb.register_instances_with_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])
        time.sleep(1)
        assert all(status == 200 and rev == "v1" for status, rev, _ in served_by(lb_url))
        health = elb.describe_instance_health(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])
        assert health["InstanceStates"][0]["State"] == "OutOfService"

        deploy_demo(sandbox, instance, "v2")
        wait_for(lambda: any(inst == new_id for _, _, inst in served_by(lb_url, 6)), 15, message="traffic on v2")
        health = elb.describe_instance_health(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])
        assert health["InstanceStates"][0]["State"] == "InService"

        # hold requests open on every backend, then take the new one out
        slow = []

        def slow_request():
            response = requests.get(f"{lb_url}/slow?seconds=2", timeout=20)
            slow.append((response.status_code, response.text))

        threads = [threading.Thread(target=slow_request) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        elb.deregister_instances_from_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])
        time.sleep(0.6)  # the balancer follows the ELB four times a second
        after = served_by(lb_url, 9)
        for thread in threads:
            thread.join()

        assert {inst for _, _, inst in after}.isdisjoint({new_id})
        assert {status for status, _, _ in after} == {200}
        assert len(slow) == 6 and {status for status, _ in slow} == {200}
        assert any(new_id in text for _, text in slow), "an in-flight request on the drained instance completed"
    finally:
        elb.deregister_instances_from_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])


def test_a_request_still_open_when_the_draining_timeout_ends_is_cut(sandbox):
    info = sandbox.info
    elb = sandbox.client("elb")
    name = info["load_balancer_name"]
    instance = sandbox.launch(name="app-slow")
    new_id = instance["InstanceId"]
    deploy_demo(sandbox, instance, "v2")
    elb.modify_load_balancer_attributes(
        LoadBalancerName=name, LoadBalancerAttributes={"ConnectionDraining": {"Enabled": True, "Timeout": 1}}
    )
    try:
        elb.register_instances_with_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])
        wait_for(lambda: any(inst == new_id for _, _, inst in served_by(info["load_balancer_url"], 6)), 15, message="traffic on the new instance")
        time.sleep(2.5)  # the balancer re-reads the draining timeout every two seconds
        outcomes = []

        def held_open():
            response = requests.get(f"{info['load_balancer_url']}/slow?seconds=8", timeout=20)
            outcomes.append((response.status_code, response.text))

        threads = [threading.Thread(target=held_open) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        elb.deregister_instances_from_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])
        for thread in threads:
            thread.join()

        # round robin over three backends: one request was on the new one, and it was
        # cut (a 502) rather than allowed to finish its eight seconds (a 200)
        cut = [o for o in outcomes if o[0] == 502]
        assert len(cut) == 1, outcomes
        assert all(status == 200 for status, text in outcomes if status != 502)
    finally:
        elb.deregister_instances_from_load_balancer(LoadBalancerName=name, Instances=[{"InstanceId": new_id}])
        elb.modify_load_balancer_attributes(
            LoadBalancerName=name,
            LoadBalancerAttributes={"ConnectionDraining": {"Enabled": True, "Timeout": info.get("draining_timeout", 5)}},
        )


def test_the_console_output_shows_the_host_key_the_instance_presents(sandbox):
    from deployer import aws

    instance = sandbox.launch()
    keys = aws.Cloud(sandbox.account()).console_host_keys(instance["InstanceId"])

    presented = ssh.run(sandbox.target(instance), "true").host_key
    assert keys == [presented]
