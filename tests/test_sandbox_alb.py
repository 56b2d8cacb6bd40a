"""The sandbox behind an application load balancer and its target group,
with several environments, each behind its own load balancer.

One sandbox for the module, in the `aws` timings profile at 0.02: the
target group's defaults (checks every 30 s, 5 to be healthy, 2 to be
unhealthy, a 300 s deregistration delay) play as 0.6 s, 3 s, 1.2 s and 6 s.
"""

import threading
import time

import pytest
import requests

from tests.helpers import SandboxProcess, wait_for
from tests.test_sandbox import deploy_demo, served_by

pytestmark = pytest.mark.sandbox

SCALE = 0.02
INTERVAL, HEALTHY, UNHEALTHY = 30 * SCALE, 5, 2
DELAY = 300 * SCALE
ENVIRONMENTS = ["prepan", "alpha", "beta"]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    process = SandboxProcess(tmp_path_factory.mktemp("sandbox-alb"), timings="aws", time_scale=SCALE,
                             load_balancer="alb", environments=ENVIRONMENTS)
    process.start(timeout=180)
    yield process
    assert process.stop() == 0


def _health(elbv2, arn: str, *ids: str) -> dict[str, str]:
    kwargs = {"Targets": [{"Id": i} for i in ids]} if ids else {}
    described = elbv2.describe_target_health(TargetGroupArn=arn, **kwargs)["TargetHealthDescriptions"]
    return {t["Target"]["Id"]: t["TargetHealth"]["State"] for t in described}


def _watch(elbv2, arn: str, until: dict[str, str], timeout: float) -> dict[str, list[tuple[float, str]]]:
    """Each target's (seconds, state) whenever its state changes, until each is in its `until` state."""
    started, changes = time.monotonic(), {target_id: [] for target_id in until}
    while True:
        states = _health(elbv2, arn, *until)
        for target_id, state in states.items():
            if not changes[target_id] or changes[target_id][-1][1] != state:
                changes[target_id].append((time.monotonic() - started, state))
        if states == until:
            return changes
        assert time.monotonic() - started < timeout, changes
        time.sleep(0.05)


def test_the_seeded_prepan_serves_v1_through_its_target_group(sandbox):
    info = sandbox.info
    elbv2 = sandbox.client("elbv2")
    seeded = {i["id"] for i in info["instances"] if i["name"] in ("app-1", "app-2")}

    group = elbv2.describe_target_groups(TargetGroupArns=[info["target_group_arn"]])["TargetGroups"][0]
    delay = {a["Key"]: a["Value"] for a in elbv2.describe_target_group_attributes(TargetGroupArn=group["TargetGroupArn"])["Attributes"]}
    answers = served_by(info["load_balancer_url"])

    assert info["load_balancer_kind"] == "alb" and info["load_balancer_name"] == "prepan"
    assert (group["HealthCheckIntervalSeconds"], group["HealthCheckTimeoutSeconds"], group["HealthyThresholdCount"],
            group["UnhealthyThresholdCount"], group["HealthCheckPath"]) == (30, 5, 5, 2, "/health")
    assert delay["deregistration_delay.timeout_seconds"] == "300"
    assert _health(elbv2, info["target_group_arn"]) == {i: "healthy" for i in seeded}
    assert {(status, revision) for status, revision, _ in answers} == {(200, "v1")}
    assert {instance for _, _, instance in answers} == seeded


@pytest.fixture(scope="module")
def joined(sandbox):
    """Two new targets registered at once: one serving v2, one serving
    nothing; how their target health changed."""
    info = sandbox.info
    elbv2 = sandbox.client("elbv2")
    serving = sandbox.launch(name="app-new")
    deploy_demo(sandbox, serving, "v2")
    bare = sandbox.launch(name="app-bare")
    ids = {"serving": serving["InstanceId"], "bare": bare["InstanceId"]}
    elbv2.register_targets(TargetGroupArn=info["target_group_arn"], Targets=[{"Id": i} for i in ids.values()])
    changes = _watch(elbv2, info["target_group_arn"], {ids["serving"]: "healthy", ids["bare"]: "unhealthy"}, 15)
    traffic = {inst for _, _, inst in served_by(info["load_balancer_url"], 9)}
    elbv2.deregister_targets(TargetGroupArn=info["target_group_arn"], Targets=[{"Id": ids["bare"]}])
    return ids, changes, traffic


def test_a_new_target_is_initial_until_its_checks_decide_then_healthy_or_unhealthy(sandbox, joined):
    ids, changes, traffic = joined
    serving, bare = changes[ids["serving"]], changes[ids["bare"]]

    assert [state for _, state in serving] == ["initial", "healthy"]
    assert [state for _, state in bare] == ["initial", "unhealthy"]
    # n checks at the group's interval, the first within an interval of the registration
    assert (HEALTHY - 1) * INTERVAL - 0.3 <= serving[-1][0] <= (HEALTHY + 1) * INTERVAL + 1.0, serving
    assert (UNHEALTHY - 1) * INTERVAL - 0.3 <= bare[-1][0] <= (UNHEALTHY + 1) * INTERVAL + 1.0, bare
    assert ids["serving"] in traffic and ids["bare"] not in traffic


def test_a_deregistered_target_drains_for_the_delay_finishing_what_is_in_flight_then_is_gone(sandbox, joined):
    new_id = joined[0]["serving"]
    info = sandbox.info
    elbv2, arn, lb_url = sandbox.client("elbv2"), info["target_group_arn"], info["load_balancer_url"]
    slow = []

    def slow_request():
        response = requests.get(f"{lb_url}/slow?seconds=2", timeout=20)
        slow.append((response.status_code, response.text))

    threads = [threading.Thread(target=slow_request) for _ in range(3)]  # round robin: one on each target
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    deregistered = time.monotonic()
    elbv2.deregister_targets(TargetGroupArn=arn, Targets=[{"Id": new_id}])

    assert _health(elbv2, arn)[new_id] == "draining"
    assert _health(elbv2, arn, new_id)[new_id] == "draining"
    time.sleep(0.5)
    assert new_id not in {inst for _, _, inst in served_by(lb_url, 6)}
    for thread in threads:
        thread.join()
    assert {status for status, _ in slow} == {200}
    assert any(new_id in text for _, text in slow), "the request in flight on the draining target finished"
    assert _health(elbv2, arn)[new_id] == "draining", "ELBv2 waits out the delay even with nothing in flight"

    wait_for(lambda: new_id not in _health(elbv2, arn), DELAY + 5, 0.05, "the target to be gone")
    assert DELAY - 0.2 <= time.monotonic() - deregistered <= DELAY + 1.5
    assert _health(elbv2, arn, new_id)[new_id] == "unused"


def test_every_environment_serves_its_own_instances_through_its_own_load_balancer(sandbox):
    info = sandbox.info
    elbv2 = sandbox.client("elbv2")
    entries = info["environments"]

    assert [e["environment"] for e in entries] == ENVIRONMENTS
    assert {k: v for k, v in entries[0].items() if k != "instances"} == {
        k: v for k, v in info.items() if k not in ("instances", "environments", "addressing")}
    assert len({e["load_balancer_url"] for e in entries}) == len({e["target_group_arn"] for e in entries}) == 3
    assert len({e["app_security_group_id"] for e in entries}) == 3
    for entry in entries:
        prefix = entry["name_prefix"]
        seeded = {i["id"] for i in entry["instances"] if i["name"] in (f"{prefix}1", f"{prefix}2")}
        assert len(seeded) == 2, entry["instances"]
        assert _health(elbv2, entry["target_group_arn"]) == {i: "healthy" for i in seeded}
        answers = served_by(entry["load_balancer_url"], 6)
        assert {(status, revision) for status, revision, _ in answers} == {(200, "v1")}
        assert {instance for _, _, instance in answers} == seeded
    assert [e["name_prefix"] for e in entries] == ["app-", "alpha-app-", "beta-app-"]
