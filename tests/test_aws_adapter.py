"""The AWS adapter against the moto server: ELBv2 target groups and errors."""

import pytest

from deployer import aws
from deployer.errors import AdapterError

pytestmark = pytest.mark.sandbox


def test_a_target_group_registers_reports_and_deregisters(sandbox):
    info = sandbox.info
    elbv2 = sandbox.client("elbv2")
    group = elbv2.create_target_group(Name="adapter-test", Protocol="HTTP", Port=info["app_port"], VpcId=info["vpc_id"],
                                      TargetType="instance")["TargetGroups"][0]["TargetGroupArn"]
    mutations = []
    cloud = aws.Cloud(sandbox.account(), target_group_arn=group, on_mutation=lambda *m: mutations.append(m))
    instance = sandbox.launch(name="tg")

    cloud.register([instance["InstanceId"]])
    cloud.register([instance["InstanceId"]])  # already there: nothing to do

    assert cloud.registered() == [instance["InstanceId"]]
    assert instance["InstanceId"] in cloud.health()
    assert [m[0] for m in mutations] == ["RegisterTargets"]
    assert mutations[0][2]  # the request id, for the audit trail
    cloud.deregister([instance["InstanceId"]])
    assert cloud.registered() == []
    assert cloud.draining_timeout() == 300.0  # AWS's default deregistration delay


def test_an_aws_error_is_one_adapter_error_that_says_what_was_being_done(sandbox):
    cloud = aws.Cloud(sandbox.account(), load_balancer_name="no-such-lb")

    with pytest.raises(AdapterError, match="describe load balancer: LoadBalancerNotFound"):
        cloud.registered()
    with pytest.raises(AdapterError, match="StopInstances i-0000000000000dead: InvalidInstanceID.NotFound"):
        cloud.stop(["i-0000000000000dead"])


def test_credentials_are_references_and_never_printed(monkeypatch):
    monkeypatch.setenv("PROD_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
    monkeypatch.setenv("PROD_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

    account = aws.Account.from_reference("us-west-1", "", "env:PROD")

    assert account.secret_access_key == "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert "wJalr" not in repr(account) and "AKIA" not in repr(account)
    with pytest.raises(AdapterError, match="MISSING_ACCESS_KEY_ID and MISSING_SECRET_ACCESS_KEY are not set"):
        aws.Account.from_reference("us-west-1", "", "env:MISSING")
    with pytest.raises(AdapterError, match="is not one of") as unknown:
        aws.Account.from_reference("us-west-1", "", "AKIAEXAMPLE:secret")
    with pytest.raises(AdapterError, match="holds an access key id") as key:
        aws.Account.from_reference("us-west-1", "", "profile:AKIAIOSFODNN7EXAMPLE")
    assert "AKIA" not in str(unknown.value) + str(key.value)


def test_a_profile_reference_gives_a_task_that_profile_s_keys_and_never_the_worker_s(tmp_path, monkeypatch):
    (tmp_path / "credentials").write_text("[deploy]\naws_access_key_id = AKIDPROFILE000000001\n"
                                          "aws_secret_access_key = profile-secret-0123456789\naws_session_token = profile-token-0123\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDWORKER0000000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret-0123456789")

    variables = aws.task_environment(aws.Account.from_reference("eu-west-1", "", "profile:deploy"))

    assert variables == {"AWS_ACCESS_KEY_ID": "AKIDPROFILE000000001", "AWS_SECRET_ACCESS_KEY": "profile-secret-0123456789",
                         "AWS_SESSION_TOKEN": "profile-token-0123", "AWS_DEFAULT_REGION": "eu-west-1"}


def test_a_profile_the_worker_does_not_have_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))

    with pytest.raises(AdapterError, match="reading the credentials of profile nowhere: .*nowhere"):
        aws.task_environment(aws.Account.from_reference("eu-west-1", "", "profile:nowhere"))


def test_the_default_chain_is_never_a_task_s():
    with pytest.raises(AdapterError, match="uses the worker's default credential chain"):
        aws.task_environment(aws.Account.from_reference("eu-west-1", "", ""))
