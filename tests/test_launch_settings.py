"""An environment's launch settings reach RunInstances: each one is read back
from the sandbox's EC2 (the moto server, over HTTP) after the release's own
launch steps ran against it. A release frozen before the settings existed
launches exactly as it did."""

import base64
import ipaddress

import pytest

from deployer import aws
from deployer.errors import AdapterError
from releases import engine, plan, services, steps
from releases.models import AuditEvent, Environment, Instance, Release
from tests.helpers import SandboxProcess, wait_for
from tests.release_helpers import person

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]

USER_DATA = "#cloud-config\nruncmd:\n  - echo 'hello from greenlight' > /tmp/hello\n"


@pytest.fixture(scope="module")
def launch_sandbox(tmp_path_factory):
    """A sandbox of its own: these tests launch instances the other release tests would count."""
    with SandboxProcess(tmp_path_factory.mktemp("launch-sandbox")) as process:
        yield process


@pytest.fixture(scope="module")
def second_subnet(launch_sandbox):
    """Another subnet of the environment's VPC, on the sandbox's loopback network (its instances are hosts too)."""
    ec2, info = launch_sandbox.client("ec2"), launch_sandbox.info
    vpc = ec2.describe_subnets(SubnetIds=[info["subnet_id"]])["Subnets"][0]["VpcId"]
    network = ipaddress.ip_network(ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["CidrBlock"])
    cidr = str(list(network.subnets(new_prefix=24))[200])
    found = ec2.describe_subnets(Filters=[{"Name": "cidr-block", "Values": [cidr]}])["Subnets"]
    return found[0]["SubnetId"] if found else ec2.create_subnet(VpcId=vpc, CidrBlock=cidr)["Subnet"]["SubnetId"]


@pytest.fixture
def prepan(launch_sandbox):
    return services.environment_import_sandbox(info=launch_sandbox.info)


def configure(environment: Environment, **settings) -> Environment:
    for name, value in settings.items():
        setattr(environment, name, value)
    environment.full_clean()
    environment.save()
    return environment


def new_release(environment: Environment, fleet_size: int, *, frozen: dict | None = None) -> Release:
    frozen = frozen or plan.freeze(environment, strategy="bake", revision="v1", fleet_size=fleet_size,
                                   installation="launch-tests")
    # cancelled: no worker is to run it; the test runs its launch steps itself
    return Release.objects.create(environment=environment, revision="v1", fleet_size=fleet_size, plan=frozen,
                                  requested_by=person(f"dana{Release.objects.count()}", "deployer"), status="cancelled",
                                  state={"image": environment.base_ami})


def run_until_done(action, ctx: steps.Context) -> dict:
    """A step run again after each Wait, as the engine would (the fast profile rarely waits)."""
    def attempt():
        try:
            return action(ctx) or {"done": True}
        except steps.Wait:
            return None
    return wait_for(attempt, 60, 0.2, f"{action.__name__} to finish")


def launched(release: Release, sandbox: SandboxProcess, fleet_size: int) -> dict[str, dict]:
    ctx = steps.Context(release=release, step=None, cloud=engine.release_cloud(release), log=engine.writer_for(release))
    with ctx.log:
        run_until_done(steps.launch, ctx)
        if fleet_size > 1:
            run_until_done(steps.launch_clones, ctx)
    ids = {row.slot: row.instance_id for row in Instance.objects.filter(release=release).exclude(role="old")}
    ec2 = sandbox.client("ec2")
    described = {i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=list(ids.values()))["Reservations"]
                 for i in r["Instances"]}
    return {slot: described[instance_id] for slot, instance_id in ids.items()}


def root_volume(sandbox: SandboxProcess, instance: dict) -> dict:
    [volume] = sandbox.client("ec2").describe_volumes(Filters=[
        {"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}])["Volumes"]
    return volume


def user_data(sandbox: SandboxProcess, instance: dict) -> str:
    value = sandbox.client("ec2").describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
    encoded = value.get("UserData", {}).get("Value")
    return base64.b64decode(encoded).decode() if encoded else ""


def test_every_launch_setting_reaches_run_instances(prepan, launch_sandbox, second_subnet):
    info = launch_sandbox.info
    configure(prepan, instance_profile=info["instance_profile"], user_data=USER_DATA, root_volume_size=32,
              root_volume_type="gp3", root_volume_encrypted=True, require_imdsv2=True, public_ip="no",
              extra_tags={"team": "web", "cost-centre": "42"}, extra_subnet_ids=[second_subnet])
    release = new_release(prepan, fleet_size=4)

    instances = launched(release, launch_sandbox, 4)

    assert sorted(instances) == ["canary", "clone-1", "clone-2", "clone-3"]
    # the canary in the environment's subnet; clones round both subnets, as across availability zones
    assert {slot: i["SubnetId"] for slot, i in instances.items()} == {
        "canary": prepan.subnet_id, "clone-1": second_subnet, "clone-2": prepan.subnet_id, "clone-3": second_subnet}
    for slot, instance in instances.items():
        assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{info['instance_profile']}"), slot
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert instance["MetadataOptions"]["HttpEndpoint"] == "enabled"
        assert "PublicIpAddress" not in instance  # asked for none, on a subnet that would not give one anyway
        # with a network interface asked for, the groups ride on it
        [interface] = instance["NetworkInterfaces"]
        assert {g["GroupId"] for g in interface["Groups"]} == {*prepan.security_group_ids, prepan.verify_security_group_id}
        assert ipaddress.ip_address(instance["PrivateIpAddress"]).is_loopback  # a sandbox host, as any other
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert tags["team"] == "web" and tags["cost-centre"] == "42"
        assert tags[aws.TAG_RELEASE] == str(release.uuid) and tags[aws.TAG_SLOT] == slot
        assert user_data(launch_sandbox, instance) == USER_DATA
        volume = root_volume(launch_sandbox, instance)
        assert (volume["Size"], volume["VolumeType"], volume["Encrypted"]) == (32, "gp3", True), slot
        assert volume["Attachments"][0]["Device"] == launch_sandbox.client("ec2").describe_images(
            ImageIds=[prepan.base_ami])["Images"][0]["RootDeviceName"]
    assert AuditEvent.objects.filter(release=release, action="aws:RunInstances").count() == 4


def test_an_instance_profile_by_arn_and_a_public_ip(prepan, launch_sandbox):
    arn = launch_sandbox.client("iam").get_instance_profile(
        InstanceProfileName=launch_sandbox.info["instance_profile"])["InstanceProfile"]["Arn"]
    configure(prepan, instance_profile=arn, public_ip="yes", root_volume_type="", root_volume_size=20,
              root_volume_encrypted=False)
    release = new_release(prepan, fleet_size=1)

    [canary] = launched(release, launch_sandbox, 1).values()

    assert canary["IamInstanceProfile"]["Arn"] == arn
    assert canary["PublicIpAddress"]
    volume = root_volume(launch_sandbox, canary)
    assert volume["Size"] == 20 and volume["Encrypted"] is False  # only the size was asked for


def test_a_release_frozen_before_the_launch_settings_launches_exactly_as_before(prepan, launch_sandbox):
    # the environment asks for everything now; the old plan knew none of it
    configure(prepan, instance_profile=launch_sandbox.info["instance_profile"], user_data=USER_DATA,
              root_volume_size=30, root_volume_encrypted=True, require_imdsv2=True, public_ip="yes",
              extra_tags={"team": "web"})
    frozen = plan.freeze(prepan, strategy="bake", revision="v1", fleet_size=1)
    for name in (*plan.LAUNCH_FIELDS, *plan.ACCESS_FIELDS):
        del frozen["environment"][name]
    release = new_release(prepan, fleet_size=1, frozen=frozen)
    cloud = engine.release_cloud(release)
    sent = []
    # botocore's own hook for a call's parameters: what was sent, observed, not replaced
    cloud.ec2.meta.events.register("provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(dict(params)))
    ctx = steps.Context(release=release, step=None, cloud=cloud, log=engine.writer_for(release))
    with ctx.log:
        run_until_done(steps.launch, ctx)

    [request] = sent
    assert set(request) == {"ImageId", "InstanceType", "KeyName", "SubnetId", "SecurityGroupIds", "MinCount", "MaxCount",
                            "ClientToken", "TagSpecifications"}
    [canary] = launch_sandbox.client("ec2").describe_instances(
        InstanceIds=[release.instances.get(slot="canary").instance_id])["Reservations"][0]["Instances"]
    assert "IamInstanceProfile" not in canary and canary["MetadataOptions"]["HttpTokens"] == "optional"
    assert "team" not in {t["Key"] for t in canary["Tags"]}
    assert user_data(launch_sandbox, canary) == ""


def test_a_launch_run_again_adopts_what_its_first_run_made_in_the_same_subnet(prepan, launch_sandbox, second_subnet):
    configure(prepan, extra_subnet_ids=[second_subnet], require_imdsv2=True)
    release = new_release(prepan, fleet_size=2)
    first = launched(release, launch_sandbox, 2)
    # the worker died after RunInstances, before recording the clone
    Instance.objects.filter(release=release, slot="clone-1").delete()

    again = launched(release, launch_sandbox, 2)

    assert again["clone-1"]["InstanceId"] == first["clone-1"]["InstanceId"]
    assert again["clone-1"]["SubnetId"] == second_subnet
    assert AuditEvent.objects.filter(release=release, action="aws:RunInstances").count() == 2
    assert release.log_lines.filter(text__startswith="adopted").count() == 1


def test_a_launch_naming_a_missing_instance_profile_fails_saying_so(prepan, launch_sandbox):
    configure(prepan, instance_profile="no-such-profile")
    release = new_release(prepan, fleet_size=1)
    ctx = steps.Context(release=release, step=None, cloud=engine.release_cloud(release), log=engine.writer_for(release))
    with ctx.log, pytest.raises(AdapterError) as failed:
        steps.launch(ctx)
    assert "instance profile no-such-profile does not exist" in str(failed.value)


def test_a_root_volume_smaller_than_the_image_s_fails_the_launch_as_on_aws(prepan, launch_sandbox):
    [image] = launch_sandbox.client("ec2").describe_images(ImageIds=[prepan.base_ami])["Images"]
    [root] = [m for m in image["BlockDeviceMappings"] if m["DeviceName"] == image["RootDeviceName"]]
    configure(prepan, root_volume_size=root["Ebs"]["VolumeSize"] - 1)
    release = new_release(prepan, fleet_size=1)
    ctx = steps.Context(release=release, step=None, cloud=engine.release_cloud(release), log=engine.writer_for(release))
    with ctx.log, pytest.raises(AdapterError) as failed:
        steps.launch(ctx)
    assert "InvalidBlockDeviceMapping" in str(failed.value) and "smaller than snapshot" in str(failed.value)


@pytest.mark.parametrize(("settings", "field", "message"), [
    ({"instance_profile": "web server"}, "instance_profile", "letters, digits"),
    ({"instance_profile": "arn:aws:iam::12345:instance-profile/web"}, "instance_profile", "an ARN as"),
    ({"root_volume_type": "io2"}, "root_volume_type", "provisioned IOPS"),
    ({"root_volume_type": "st1", "root_volume_size": 20}, "root_volume_size", "from 125 to 16384"),
    ({"root_volume_type": "standard", "root_volume_size": 2000}, "root_volume_size", "from 1 to 1024"),
    ({"user_data": "x" * (16 * 1024 + 1)}, "user_data", "16 KB"),
    ({"extra_tags": {"Name": "mine"}}, "extra_tags", "Greenlight's or AWS's own tag"),
])
def test_a_launch_setting_aws_would_refuse_is_a_form_error(settings, field, message):
    from releases.models import launch_setting_errors

    environment = Environment(name="x", subnet_id="subnet-1", **settings)
    errors = launch_setting_errors(environment)
    assert message in errors.get(field, ""), errors


@pytest.mark.parametrize("profile", ["web", "web-app_1.role@team", "arn:aws:iam::123456789012:instance-profile/web",
                                     "arn:aws-us-gov:iam::123456789012:instance-profile/team/web"])
def test_an_instance_profile_by_name_or_arn_is_accepted(profile):
    from releases.models import launch_setting_errors

    assert "instance_profile" not in launch_setting_errors(Environment(name="x", subnet_id="subnet-1", instance_profile=profile))
