"""docs/iam-policy.json is exactly what Greenlight calls.

Every AWS call is recorded as its IAM action (deployer/aws.py RECORD_CALLS):
the worker's, in a real worker, through a whole release, a rollback and a
preflight (with an instance profile, as RunInstances then passes a role);
the web process's, here, through the pages and the import that read AWS.
Behind a classic ELB and behind an ALB's target group. The test fails when
a call is missing from its role's policy, or when a policy grants an action
that nothing calls."""

import io
import json

import pytest
from django.core.management import call_command

from deployer import aws
from releases import cleanup, selectors, services
from releases.models import Environment
from tests.helpers import ROOT, SandboxProcess
from tests.release_helpers import api, person, wait_gate, wait_status

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]
POLICY = json.loads((ROOT / "docs" / "iam-policy.json").read_text())


def granted(document: dict) -> set[str]:
    return {action for statement in document["Statement"] if statement["Effect"] == "Allow"
            for action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])}


def approve(user, release_id: int, key: str) -> None:
    response = api(user).post(f"/api/releases/{release_id}/gates/{key}/approve", {}, format="json")
    assert response.status_code == 200, response.json()


def release_and_roll_back(info: dict, dana, ravi, client, web_calls, monkeypatch, worker_calls) -> None:
    environment = services.environment_import_sandbox(info=info)
    # the web process: the environment page, the wizard's review, the import page's look-up
    monkeypatch.setenv(aws.RECORD_CALLS, str(web_calls))
    client.force_login(dana)
    for part in ("", "aws/instances/", "aws/images/"):  # the page, and what it loads from AWS after it
        assert client.get(f"/environments/{environment.name}/{part}").status_code == 200
    client.get("/releases/new/", {"environment": environment.name})
    client.post("/releases/new/", {"step": "revision", "revision": "v2"})
    client.post("/releases/new/", {"step": "options", "strategy": "bake", "clone_count": 2})
    assert client.get("/releases/new/", {"step": "review"}).status_code == 200
    account = {"region": info["region"], "aws_endpoint_url": info["aws_endpoint_url"], "aws_credentials": "sandbox"}
    if environment.load_balancer_name:
        selectors.describe_load_balancer(**account, load_balancer_name=environment.load_balancer_name)
    else:
        selectors.describe_target_group(**account, target_group_arn=environment.target_group_arn)
    monkeypatch.delenv(aws.RECORD_CALLS)

    # the worker: a release started through the API (its preflight first), then rolled back
    answer = api(dana).post("/api/releases/", {"environment": environment.name, "revision": "v2"}, format="json")
    assert answer.status_code == 201, answer.json()
    release_id = answer.json()["id"]
    wait_gate(release_id, "verify_directly", timeout=240)
    approve(ravi, release_id, "verify_directly")
    wait_gate(release_id, "swap_elb", timeout=240)
    approve(ravi, release_id, "swap_elb")
    wait_status(release_id, "succeeded", timeout=240)
    assert api(dana).post(f"/api/releases/{release_id}/rollback").status_code == 200
    wait_status(release_id, "rolled_back", timeout=240)

    # manage.py preflight runs where the workers run, with their role; with an instance profile set
    iam = aws.client(aws.Account(info["region"], info["aws_endpoint_url"], *aws.SANDBOX_CREDENTIALS), "iam")
    iam.create_role(RoleName="app", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="app")
    iam.add_role_to_instance_profile(InstanceProfileName="app", RoleName="app")
    Environment.objects.filter(pk=environment.pk).update(instance_profile="app")
    monkeypatch.setenv(aws.RECORD_CALLS, str(worker_calls))
    call_command("preflight", environment.name, stdout=io.StringIO(), stderr=io.StringIO())

    # the workers' clean-up (a periodic task): an image of Greenlight's beyond the last N goes, snapshots first tagged
    cloud = cleanup.environment_cloud(Environment.objects.get(pk=environment.pk))
    [serving] = cloud.registered()[:1]
    image = cloud.create_image(serving, f"greenlight-iam-{environment.name}",
                               {aws.TAG_RELEASE: "iam-test", aws.TAG_ENVIRONMENT: environment.name})
    Environment.objects.filter(pk=environment.pk).update(images_kept=0)
    assert image in cleanup.clean_up_images(Environment.objects.get(pk=environment.pk))
    monkeypatch.delenv(aws.RECORD_CALLS)


def test_the_policy_grants_exactly_what_the_workers_and_the_web_call(release_sandbox, celery_worker, client, settings,
                                                                     monkeypatch, tmp_path):
    settings.PREFLIGHT_BEFORE_RELEASE = True
    worker_file = celery_worker.parent / "aws-calls.txt"
    worker_file.write_text("")  # what earlier tests' releases called is theirs
    web_calls, preflight_calls = tmp_path / "web.txt", tmp_path / "preflight.txt"
    dana, ravi = person("dana", "deployer", "viewer"), person("ravi", "approver")
    release_and_roll_back(release_sandbox.info, dana, ravi, client, web_calls, monkeypatch, preflight_calls)
    alb = SandboxProcess(tmp_path / "alb", load_balancer="alb", draining_timeout=1, environments=["alpha"])
    alb.start(timeout=240)
    try:
        assert alb.info["environment"] == "alpha"
        release_and_roll_back(alb.info, dana, ravi, client, web_calls, monkeypatch, preflight_calls)
    finally:
        assert alb.stop() == 0

    worker = set(worker_file.read_text().split()) | set(preflight_calls.read_text().split())
    web = set(web_calls.read_text().split())
    assert worker - granted(POLICY["worker"]) == set(), "the workers call these, and their policy does not grant them"
    assert granted(POLICY["worker"]) - worker == set(), "the workers' policy grants these, and nothing calls them"
    assert web - granted(POLICY["web"]) == set(), "the web process calls these, and its policy does not grant them"
    assert granted(POLICY["web"]) - web == set(), "the web's policy grants these, and nothing calls them"


def test_changes_to_instances_and_images_are_limited_to_what_greenlight_tagged():
    statements = {s["Sid"]: s for s in POLICY["worker"]["Statement"]}
    change = statements["ChangeOnlyReleaseInstances"]
    assert {"ec2:StopInstances", "ec2:StartInstances", "ec2:TerminateInstances"} <= set(change["Action"])
    assert change["Condition"] == {"Null": {f"aws:ResourceTag/{aws.TAG_RELEASE}": "false"}}
    assert statements["RemoveOnlyReleaseImages"]["Condition"] == change["Condition"]
    assert statements["TagOnlyWhatItCreates"]["Condition"]["StringEquals"]["ec2:CreateAction"] == ["RunInstances",
                                                                                                   "CreateImage"]
    assert statements["MarkSnapshotsOfImagesBeingRemoved"]["Condition"] == {
        "ForAllValues:StringEquals": {"aws:TagKeys": [aws.TAG_DEREGISTERED_IMAGE]}}  # the clean-up's one mark, no other tag
    assert statements["LaunchOnlyTaggedInstances"]["Condition"]["Null"][f"aws:RequestTag/{aws.TAG_RELEASE}"] == "false"
    assert all(not a.startswith(("ec2:", "elasticloadbalancing:")) or a.split(":")[1].startswith("Describe")
               for a in granted(POLICY["web"])), "the web's policy is read-only"
