"""Preflight against the sandbox: every check passes on a seeded sandbox
(behind a classic ELB and behind an ALB's target group, in both timing
profiles), each failing check says what is wrong and what to do, and
preflight changes nothing."""

import io
from unittest import mock

import pytest
from botocore.exceptions import ClientError
from django.core.management import call_command

from deployer import aws
from releases import preflight, services
from releases.models import Environment
from tests.helpers import SandboxProcess

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db]


@pytest.fixture(scope="module", params=[("classic", None), ("alb", "aws")], ids=["classic-fast", "alb-aws"])
def kind_sandbox(request, tmp_path_factory):
    kind, timings = request.param
    process = SandboxProcess(tmp_path_factory.mktemp(f"preflight-{kind}"), load_balancer=kind, timings=timings,
                             time_scale=0.02 if timings else None)
    process.start(timeout=240)
    yield process
    assert process.stop() == 0


@pytest.fixture
def prepan(kind_sandbox):
    return services.environment_import_sandbox(info=kind_sandbox.info)


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def everything_the_cloud_holds(sandbox) -> tuple:
    ec2 = sandbox.client("ec2")
    instances = sorted((i["InstanceId"], i["State"]["Name"]) for r in ec2.describe_instances()["Reservations"]
                       for i in r["Instances"])
    images = sorted(i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"])
    groups = sorted(str(g.get("IpPermissions")) for g in ec2.describe_security_groups()["SecurityGroups"])
    return instances, images, groups


def test_it_passes_every_check_on_the_sandbox_and_changes_nothing(prepan, kind_sandbox):
    before = everything_the_cloud_holds(kind_sandbox)
    checks = preflight.run(prepan, revision="v2", strategy="bake")
    assert preflight.failed(checks) == [], "\n".join(map(str, checks))
    named = by_name(checks)
    for name in ("credentials", "region", "load balancer", "subnets", "security groups", "key pair", "key file",
                 "base image", "may RunInstances", "may CreateImage", "may StopInstances", "may StartInstances",
                 "may TerminateInstances", "may AuthorizeSecurityGroupIngress", "may RevokeSecurityGroupIngress",
                 "repository", "ssh"):
        assert name in named, f"no {name} check: {list(named)}"
    assert named["load balancer"].status == "ok"
    assert ("target group" if kind_sandbox.info.get("load_balancer_kind") == "alb" else "classic load balancer") in \
        named["load balancer"].message
    assert "2 of 2 registered instances in service" in named["load balancer"].message
    assert "v2 is " in named["repository"].message
    # the seeded instances were not launched by a release: no pinned key to hold them to
    assert named["ssh"].status == "warning" and "no host key" in named["ssh"].message
    assert "user ec2-user exists" in named["ssh"].message
    assert everything_the_cloud_holds(kind_sandbox) == before


def test_no_such_load_balancer_fails_with_what_to_do(prepan):
    if prepan.load_balancer_name:
        Environment.objects.filter(pk=prepan.pk).update(load_balancer_name="no-such-lb")
        expected = "the load balancer no-such-lb does not exist"
    else:
        arn = prepan.target_group_arn.rsplit("/", 2)[0] + "/no-such-group/0123456789abcdef"
        Environment.objects.filter(pk=prepan.pk).update(target_group_arn=arn)
        expected = "does not exist"
    prepan.refresh_from_db()
    check = by_name(preflight.run(prepan))["load balancer"]
    assert check.status == "failed"
    assert expected in check.message
    assert "name an existing" in check.fix


def test_no_such_subnet_fails_naming_it(prepan):
    Environment.objects.filter(pk=prepan.pk).update(extra_subnet_ids=["subnet-0123456789abcdef0"])
    prepan.refresh_from_db()
    check = by_name(preflight.run(prepan))["subnets"]
    assert check.status == "failed"
    assert check.message.startswith("no such subnet: subnet-0123456789abcdef0")
    assert prepan.subnet_id not in check.message


def test_a_missing_key_file_fails_and_ssh_is_not_tried(prepan, tmp_path):
    Environment.objects.filter(pk=prepan.pk).update(ssh_key_file=str(tmp_path / "gone.pem"))
    prepan.refresh_from_db()
    named = by_name(preflight.run(prepan))
    assert named["key file"].status == "failed"
    assert named["key file"].message == f"cannot read the SSH key file {tmp_path / 'gone.pem'}: No such file or directory"
    assert "on every worker" in named["key file"].fix
    assert named["ssh"].status == "failed" and "key file cannot be read" in named["ssh"].message


def test_a_dry_run_refused_fails_naming_the_action_and_the_policy(prepan):
    # moto answers every DryRun with DryRunOperation (it enforces no IAM policy unless told to, and then
    # not by DryRun): AWS's refusal is played at the adapter boundary, on the boto3 client itself.
    made = aws.client

    def client(account, service):
        real = made(account, service)
        if service == "ec2":
            def refuse(params, **_):
                if params.get("DryRun"):
                    raise ClientError({"Error": {"Code": "UnauthorizedOperation",
                                                 "Message": "You are not authorized to perform this operation."}},
                                      "StopInstances")
            real.meta.events.register("before-parameter-build.ec2.StopInstances", refuse)
        return real

    with mock.patch("deployer.aws.client", side_effect=client):
        checks = by_name(preflight.run(prepan))
    refused = checks["may StopInstances"]
    assert refused.status == "failed"
    assert "AWS refused StopInstances on i-" in refused.message and "UnauthorizedOperation" in refused.message
    assert "allow ec2:StopInstances to the workers' role (docs/iam-policy.json)" in refused.fix
    assert "greenlight:release" in refused.fix
    assert checks["may StartInstances"].status == "ok"


def test_the_command_prints_a_line_per_check_and_exits_1_when_one_failed(prepan, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    call_command("preflight", prepan.name, stdout=out, stderr=err)
    assert "checks passed" in out.getvalue() and "ok      credentials:" in out.getvalue()
    assert err.getvalue() == ""
    Environment.objects.filter(pk=prepan.pk).update(ssh_key_file=str(tmp_path / "gone.pem"))
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("preflight", prepan.name, stdout=out, stderr=err)
    assert exited.value.code == 1
    assert "failed  key file: cannot read the SSH key file" in err.getvalue()
    assert "checks failed: key file, ssh" in err.getvalue()


def test_credentials_aws_does_not_answer_fail_once_and_the_other_aws_checks_are_not_tried(prepan):
    Environment.objects.filter(pk=prepan.pk).update(aws_endpoint_url="http://127.0.0.1:1")
    prepan.refresh_from_db()
    named = by_name(preflight.run(prepan))
    assert named["credentials"].status == "failed" and "get caller identity" in named["credentials"].message
    assert "give the workers credentials" in named["credentials"].fix
    assert set(named) == {"credentials", "key file", "repository"}
    assert named["key file"].status == "ok" and named["repository"].status == "ok"
