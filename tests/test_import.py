"""Importing an environment from a load balancer that already exists."""

import html
import re

import pytest

from releases.models import AuditEvent, Environment, Recipe
from tests.release_helpers import person

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db]
# how long each wait on AWS may take: the environment form's defaults
WAITS = {"instance_timeout": "600", "ssh_timeout": "600", "image_timeout": "3600", "smoke_timeout": "300", "command_timeout": "1800"}


def sandbox_account(info: dict) -> str:
    """An environment on the sandbox's endpoint, as a maintainer configured it:
    the import looks with its endpoint and credentials, never the request's."""
    recipe = Recipe.objects.get_or_create(name="account", defaults={"definition": info["recipe"]})[0]
    Environment.objects.create(
        name="sandbox-account", region=info["region"], aws_endpoint_url=info["aws_endpoint_url"], aws_credentials="sandbox",
        load_balancer_name="account", public_url="http://127.0.0.1:2", verify_security_group_id="sg-0123456789abcdef0", ssh_key_file="/nonexistent",
        subnet_id="subnet-0123456789abcdef0", key_name="account", base_ami="ami-0123456789abcdef0", repository="https://example.invalid/app.git", recipe=recipe)
    return "environment:sandbox-account"


def test_it_shows_the_instances_and_fills_in_what_aws_knows_then_saves(client, sandbox):
    info = sandbox.info
    client.force_login(person("dana", "maintainer"))
    lookup = {"account": sandbox_account(info), "region": info["region"], "load_balancer_name": "prepan"}

    page = html.unescape(client.get("/environments/import/", lookup).content.decode())

    seeded = [i for i in info["instances"] if i["name"] in ("app-1", "app-2")]
    for instance in seeded:
        assert instance["id"] in page and f"Name={instance['name']}" in page
    for value in (info["subnet_id"], info["key_name"], info["base_ami"], 'value="8080"', 'value="/health"'):
        assert value in page
    assert info["app_security_group_id"] in page and '["sg-' not in page  # the groups as a list to edit, not JSON

    recipe = Recipe.objects.create(name="demo", definition=info["recipe"])
    form = {
        **lookup, "aws_endpoint_url": info["aws_endpoint_url"], "aws_credentials": "sandbox",
        "name": "prepan", "public_url": info["load_balancer_url"], "verify_security_group_id": info["verify_security_group_id"],
        "verify_cidr": "127.0.0.1/32", "security_group_ids": info["app_security_group_id"], "app_port": "8080",
        "health_path": "/health", "expected_text": "{revision}", "ssh_user": "ec2-user", "ssh_port": str(info["ssh_port"]),
        "ssh_key_file": info["ssh_key_file"], "address": "private", "instance_type": "t3.micro", "subnet_id": info["subnet_id"],
        "key_name": info["key_name"], "base_ami": info["base_ami"], "name_prefix": "app-", "desired_count": "2",
        "repository": info["repository"], "recipe": recipe.pk, "four_eyes": "on", "gate_timeout": "3600", "retention": "86400",
        "target_group_arn": "", **WAITS,
    }
    response = client.post("/environments/new/", form)

    assert response.status_code == 302, _errors(response)
    assert Environment.objects.get(name="prepan").subnet_id == info["subnet_id"]
    created = AuditEvent.objects.get(action="environment.create", actor_name="dana")
    assert created.details["diff"]["subnet_id"] == [None, info["subnet_id"]]


def test_an_unknown_load_balancer_is_a_clear_error(client, sandbox):
    info = sandbox.info
    client.force_login(person("dana", "maintainer"))

    page = html.unescape(client.get("/environments/import/", {"account": sandbox_account(info), "region": info["region"],
                                                             "load_balancer_name": "nope"}).content.decode())

    assert "describe load balancer nope: LoadBalancerNotFound" in page


def _errors(response) -> list[str]:
    """What a form page says is wrong, to show when a save did not go through."""
    page = html.unescape(response.content.decode())
    return re.findall(r'class="(?:errorlist|error)[^"]*"[^>]*>(.*?)</', page, re.S)


@pytest.fixture(scope="module")
def alb_sandbox(tmp_path_factory):
    """Two environments, each behind an application load balancer and a target group."""
    from tests.helpers import SandboxProcess

    with SandboxProcess(tmp_path_factory.mktemp("import-alb"), load_balancer="alb", environments=["prepan", "alpha"], seed_count=1) as process:
        yield process


def test_it_reads_a_target_group_fills_in_what_aws_knows_and_saves_it(client, alb_sandbox):
    info = alb_sandbox.info
    client.force_login(person("dana", "maintainer"))
    lookup = {"account": sandbox_account(info), "region": info["region"], "target_group_arn": info["target_group_arn"]}

    page = html.unescape(client.get("/environments/import/", lookup).content.decode())

    app1 = next(i for i in info["instances"] if i["name"] == "app-1")
    assert app1["id"] in page and "Name=app-1" in page and "healthy" in page
    assert not any(i["id"] in page for i in info["environments"][1]["instances"]), "another target group's instances"
    for value in (info["subnet_id"], info["key_name"], info["base_ami"], info["vpc_id"], 'value="8080"', 'value="/health"',
                  'name="name" value="prepan"', f'value="{info["target_group_arn"]}"'):
        assert value in page, value

    recipe = Recipe.objects.create(name="demo", definition=info["recipe"])
    form = {
        **lookup, "aws_endpoint_url": info["aws_endpoint_url"], "aws_credentials": "sandbox", "load_balancer_name": "",
        "name": "prepan", "public_url": info["load_balancer_url"],
        "verify_security_group_id": info["verify_security_group_id"], "verify_cidr": "127.0.0.1/32",
        "security_group_ids": info["app_security_group_id"], "app_port": "8080", "health_path": "/health",
        "expected_text": "{revision}", "ssh_user": "ec2-user", "ssh_port": str(info["ssh_port"]), "ssh_key_file": info["ssh_key_file"],
        "address": "private", "instance_type": "t3.micro", "subnet_id": info["subnet_id"], "key_name": info["key_name"],
        "base_ami": info["base_ami"], "name_prefix": "app-", "desired_count": "1", "repository": info["repository"],
        "recipe": recipe.pk, "four_eyes": "on", "gate_timeout": "3600", "retention": "86400", **WAITS,
    }
    response = client.post("/environments/new/", form)

    assert response.status_code == 302, _errors(response)
    saved = Environment.objects.get(name="prepan")
    assert (saved.target_group_arn, saved.load_balancer_name) == (info["target_group_arn"], "")


def test_the_lookup_needs_exactly_one_of_a_load_balancer_and_a_target_group(client, alb_sandbox):
    info = alb_sandbox.info
    client.force_login(person("dana", "maintainer"))
    where = {"account": sandbox_account(info), "region": info["region"]}

    neither = html.unescape(client.get("/environments/import/", where).content.decode())
    both = html.unescape(client.get("/environments/import/", {**where, "load_balancer_name": "prepan",
                                                               "target_group_arn": info["target_group_arn"]}).content.decode())
    unknown = html.unescape(client.get("/environments/import/", {**where, "target_group_arn": info["target_group_arn"] + "0"}).content.decode())

    for page in (neither, both):
        assert "one of the two" in page and "Save environment" not in page
    assert f"describe target group {info['target_group_arn']}0: TargetGroupNotFound" in unknown


def test_each_sandbox_environment_behind_an_alb_is_stored_with_its_target_group(alb_sandbox):
    from releases import services

    entries = alb_sandbox.info["environments"]

    stored = [services.environment_import_sandbox(info=entry) for entry in entries]

    assert [(e.name, e.load_balancer_name, e.target_group_arn, e.name_prefix, e.public_url) for e in stored] == [
        (entry["environment"], "", entry["target_group_arn"], entry["name_prefix"], entry["load_balancer_url"]) for entry in entries]
    assert [e.name_prefix for e in stored] == ["app-", "alpha-app-"]


def test_the_classic_sandbox_is_stored_with_its_load_balancer_name(sandbox):
    from releases import services

    environment = services.environment_import_sandbox(info=sandbox.info)

    assert (environment.load_balancer_name, environment.target_group_arn, environment.time_scale) == ("prepan", "", 1.0)


def test_a_sandbox_playing_aws_timings_faster_is_stored_with_its_clock(alb_sandbox):
    from releases import services

    environment = services.environment_import_sandbox(info={**alb_sandbox.info, "timings": "aws", "time_scale": 0.02})

    assert environment.time_scale == 0.02
