"""The sandbox's `aws` timings profile plays AWS's own durations, scaled.

One sandbox for the module, at a time scale of 0.02 (AWS's 30 s pending is
0.6 s here), with two entries of the table made long enough to watch: a new
id stays unknown for 50 s (1 s here) and an instance pending for 100 s (2 s).
Everything goes through boto3 and paramiko, as the release engine does.
"""

import threading
import time

import pytest
import requests
from botocore.exceptions import ClientError

from deployer import aws, ssh
from deployer.errors import AdapterError
from deployer.sandbox import timings
from tests.helpers import SandboxProcess, wait_for
from tests.test_sandbox import deploy_demo

pytestmark = pytest.mark.sandbox

SCALE = 0.02
NOT_FOUND = 50 * SCALE  # overridden, to watch it
PENDING = 250 * SCALE  # overridden, to watch it: 4 s between known and running, for a busy machine's slow looks
STOPPING = 30 * SCALE
BOOT = 15 * SCALE
CONSOLE = 60 * SCALE
IMAGE_PENDING = 180 * SCALE
HEALTH_INTERVAL, HEALTHY_THRESHOLD = 30 * SCALE, 10
DRAINING = 300 * SCALE


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    process = SandboxProcess(tmp_path_factory.mktemp("sandbox-aws-timings"), timings="aws", time_scale=SCALE,
                             timing={"not_found": 50, "instance_pending": 250})
    process.start(timeout=180)
    yield process
    assert process.stop() == 0


def _code(call, **kwargs) -> str:
    try:
        call(**kwargs)
        return "ok"
    except ClientError as exc:
        return exc.response["Error"]["Code"]


def _state(ec2, instance_id: str) -> str | None:
    try:
        return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "InvalidInstanceID.NotFound"
        return None


def _ssh_refused(sandbox, instance: dict) -> bool:
    try:
        ssh.run(sandbox.target(instance), "true", timeout=3)
        return False
    except AdapterError:
        return True


def _run(sandbox, name: str, **extra) -> dict:
    info = sandbox.info
    return sandbox.client("ec2").run_instances(
        ImageId=extra.pop("ImageId", info["base_ami"]), InstanceType=info["instance_type"], KeyName=info["key_name"],
        SubnetId=info["subnet_id"], SecurityGroupIds=[info["app_security_group_id"]], MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": name}]}], **extra,
    )["Instances"][0]


def test_each_entry_can_be_set_on_its_own_from_the_environment_or_the_command_line():
    from_env = timings.from_environment({"SANDBOX_TIMING_NOT_FOUND": "100", "SANDBOX_TIMING_BOOT": "1", "OTHER": "x"})
    from_cli = timings.parse_overrides(["boot=2", "elb_healthy_threshold=3"])

    table = timings.profile("aws", overrides={**from_env, **from_cli})

    assert (table.not_found, table.boot, table.elb_healthy_threshold, table.instance_pending) == (100, 2, 3, 30)
    assert timings.profile("fast", draining_timeout=1).connection_draining == timings.profile("fast", draining_timeout=1).deregistration_delay == 1
    assert timings.profile("fast") == timings.FAST and all(value == 0 for name, value in timings.FAST.items()[:6])
    with pytest.raises(ValueError, match="no sandbox timing named 'not_fund'"):
        timings.profile("aws", overrides={"not_fund": "1"})
    with pytest.raises(ValueError, match="NAME=SECONDS"):
        timings.parse_overrides(["not_found"])


def test_it_seeds_the_classic_elb_with_aws_defaults(sandbox):
    elb = sandbox.client("elb")

    check = elb.describe_load_balancers(LoadBalancerNames=["prepan"])["LoadBalancerDescriptions"][0]["HealthCheck"]
    draining = elb.describe_load_balancer_attributes(LoadBalancerName="prepan")["LoadBalancerAttributes"]["ConnectionDraining"]

    assert (check["Interval"], check["Timeout"], check["HealthyThreshold"], check["UnhealthyThreshold"]) == (30, 5, 10, 2)
    assert draining == {"Enabled": True, "Timeout": 300}
    assert sandbox.info["timings"] == "aws" and sandbox.info["time_scale"] == SCALE


def test_a_new_instance_is_unknown_then_pending_then_running_and_answers_ssh_only_after_boot(sandbox):
    ec2 = sandbox.client("ec2")
    started = time.monotonic()
    instance = _run(sandbox, "timed")
    instance_id = instance["InstanceId"]
    assert instance["State"]["Name"] == "pending"

    # AWS's eventual consistency: the id is unknown to every other call for a while
    assert _state(ec2, instance_id) is None
    named = ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["timed"]}])["Reservations"]
    assert named == []
    assert _code(ec2.create_tags, Resources=[instance_id], Tags=[{"Key": "k", "Value": "v"}]) == "InvalidInstanceID.NotFound"
    assert _code(ec2.get_console_output, InstanceId=instance_id) == "InvalidInstanceID.NotFound"

    cloud = aws.Cloud(sandbox.account())
    seen: list[tuple[float, str | None, bool]] = []  # (when, state, console shows a host key)
    while time.monotonic() - started < PENDING + CONSOLE + 3:
        refused = _ssh_refused(sandbox, instance)
        state = _state(ec2, instance_id)  # asked after SSH: pending now means pending then
        keys = cloud.console_host_keys(instance_id) if state else []
        seen.append((time.monotonic() - started, state, bool(keys)))
        if state in (None, "pending"):
            assert refused, f"SSH answered while the instance was {state or 'unknown'}"
        if keys:
            break
        time.sleep(0.02)

    found = next(at for at, state, _ in seen if state)
    running = next(at for at, state, _ in seen if state == "running")
    console = next(at for at, _, keys in seen if keys)
    assert NOT_FOUND - 0.1 <= found < PENDING, seen
    assert [state for _, state, _ in seen if state][0] == "pending"
    assert PENDING - 0.1 <= running <= PENDING + 3, seen
    assert console >= running + CONSOLE - 0.2, "the console output appeared before the instance booted"
    assert {state for at, state, _ in seen if at > running} == {"running"}

    presented = sandbox.wait_for_ssh(instance).host_key
    assert cloud.console_host_keys(instance_id) == [presented]


def test_a_repeated_client_token_returns_the_first_instance_as_aws_does(sandbox):
    ec2 = sandbox.client("ec2")

    first = _run(sandbox, "token", ClientToken="greenlight-test-token")
    second = _run(sandbox, "token", ClientToken="greenlight-test-token")
    other = _run(sandbox, "token", ClientToken="greenlight-test-token-2")

    assert second["InstanceId"] == first["InstanceId"]
    assert other["InstanceId"] != first["InstanceId"]
    wait_for(lambda: _state(ec2, other["InstanceId"]), 10, message="the instances to be visible")
    named = ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["token"]}])["Reservations"]
    assert len([i for r in named for i in r["Instances"]]) == 2


def test_stopping_takes_its_time_and_a_start_is_pending_again(sandbox):
    ec2 = sandbox.client("ec2")
    instance = sandbox.launch(name="stopper")
    instance_id = instance["InstanceId"]

    started = time.monotonic()
    answer = ec2.stop_instances(InstanceIds=[instance_id])["StoppingInstances"][0]
    assert answer["CurrentState"]["Name"] == "stopping"
    assert _state(ec2, instance_id) == "stopping"
    assert _code(ec2.start_instances, InstanceIds=[instance_id]) == "IncorrectInstanceState"
    wait_for(lambda: _state(ec2, instance_id) == "stopped", 10, 0.05, "stopped")
    assert time.monotonic() - started >= STOPPING - 0.1
    assert _ssh_refused(sandbox, instance)

    started = time.monotonic()
    assert ec2.start_instances(InstanceIds=[instance_id])["StartingInstances"][0]["CurrentState"]["Name"] == "pending"
    assert _state(ec2, instance_id) == "pending"
    assert _ssh_refused(sandbox, instance), "SSH answered while the instance was pending"
    wait_for(lambda: _state(ec2, instance_id) == "running", 10, 0.05, "running")
    assert time.monotonic() - started >= PENDING - 0.1
    sandbox.wait_for_ssh(instance)


def test_an_image_is_pending_for_a_while_and_holds_the_disk_as_it_was_at_the_call(sandbox):
    ec2 = sandbox.client("ec2")
    canary = sandbox.launch(name="baker")
    assert sandbox.run(canary, "mkdir -p srv && echo at-the-call > srv/marker")[0].ok

    started = time.monotonic()
    image_id = ec2.create_image(InstanceId=canary["InstanceId"], Name=f"bake-{canary['InstanceId']}")["ImageId"]
    assert sandbox.run(canary, "echo after-the-call > srv/marker")[0].ok

    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["State"] == "pending"
    with pytest.raises(ClientError) as refused:
        _run(sandbox, "too-early", ImageId=image_id)
    assert refused.value.response["Error"]["Code"] == "InvalidAMIID.Unavailable"
    wait_for(lambda: ec2.describe_images(ImageIds=[image_id])["Images"][0]["State"] == "available", 20, 0.1, "the image")
    assert time.monotonic() - started >= IMAGE_PENDING - 0.2

    clone = sandbox.launch(image_id=image_id, name="clone")
    assert sandbox.run(clone, "cat srv/marker")[1] == [("stdout", "at-the-call")]


@pytest.fixture(scope="module")
def registered(sandbox):
    """A new instance serving v2, registered with prepan; when it turned InService."""
    elb = sandbox.client("elb")
    instance = sandbox.launch(name="app-new")
    deploy_demo(sandbox, instance, "v2")
    started = time.monotonic()
    elb.register_instances_with_load_balancer(LoadBalancerName="prepan", Instances=[{"InstanceId": instance["InstanceId"]}])
    states = []

    def in_service():
        state = elb.describe_instance_health(LoadBalancerName="prepan", Instances=[{"InstanceId": instance["InstanceId"]}])
        states.append((time.monotonic() - started, state["InstanceStates"][0]["State"]))
        return states[-1][1] == "InService"

    wait_for(in_service, 30, 0.05, "InService")
    return instance, states


def test_the_load_balancer_needs_its_healthy_threshold_of_checks_at_its_interval(sandbox, registered):
    instance, states = registered

    in_service = states[-1][0]
    # the first check comes within an interval of the registration, the tenth nine intervals later
    assert (HEALTHY_THRESHOLD - 1) * HEALTH_INTERVAL - 0.3 <= in_service <= (HEALTHY_THRESHOLD + 1) * HEALTH_INTERVAL + 1.0, states
    assert all(state == "OutOfService" for _, state in states[:-1])


def test_draining_lasts_the_elbs_connection_draining_timeout(sandbox, registered):
    instance, _ = registered
    elb = sandbox.client("elb")
    lb_url = sandbox.info["load_balancer_url"]
    outcomes = []

    def held_open(seconds):
        response = requests.get(f"{lb_url}/slow?seconds={seconds}", timeout=30)
        outcomes.append((response.status_code, response.text, time.monotonic()))

    # round robin over three backends: three requests, one on each
    threads = [threading.Thread(target=held_open, args=(DRAINING + 2,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    deregistered = time.monotonic()
    elb.deregister_instances_from_load_balancer(LoadBalancerName="prepan", Instances=[{"InstanceId": instance["InstanceId"]}])
    for thread in threads:
        thread.join()

    cut = [o for o in outcomes if o[0] == 502]
    assert len(cut) == 1, outcomes
    assert DRAINING - 0.2 <= cut[0][2] - deregistered <= DRAINING + 1.2
    assert all(status == 200 and instance["InstanceId"] not in text for status, text, _ in outcomes if status != 502)
