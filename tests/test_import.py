"""Importing an environment from a load balancer that already exists."""

import html
import json

import pytest

from releases.models import AuditEvent, Environment, Recipe
from tests.release_helpers import person

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db]


def test_it_shows_the_instances_and_fills_in_what_aws_knows_then_saves(client, sandbox):
    info = sandbox.info
    client.force_login(person("dana", "deployer"))
    lookup = {"region": info["region"], "aws_endpoint_url": info["aws_endpoint_url"], "aws_credentials": "sandbox",
              "load_balancer_name": "prepan"}

    page = html.unescape(client.get("/environments/import/", lookup).content.decode())

    seeded = [i for i in info["instances"] if i["name"] in ("app-1", "app-2")]
    for instance in seeded:
        assert instance["id"] in page and f"Name={instance['name']}" in page
    for value in (info["subnet_id"], info["key_name"], info["base_ami"], 'value="8080"', 'value="/health"'):
        assert value in page

    recipe = Recipe.objects.create(name="demo", definition=info["recipe"])
    form = {
        **lookup, "name": "prepan", "public_url": info["load_balancer_url"], "verify_security_group_id": info["verify_security_group_id"],
        "verify_cidr": "127.0.0.1/32", "security_group_ids": json.dumps([info["app_security_group_id"]]), "app_port": "8080",
        "health_path": "/health", "expected_text": "{revision}", "ssh_user": "ec2-user", "ssh_port": str(info["ssh_port"]),
        "ssh_key_file": info["ssh_key_file"], "address": "private", "instance_type": "t3.micro", "subnet_id": info["subnet_id"],
        "key_name": info["key_name"], "base_ami": info["base_ami"], "name_prefix": "app-", "desired_count": "2",
        "repository": info["repository"], "recipe": recipe.pk, "four_eyes": "on", "gate_timeout": "3600", "retention": "86400",
        "target_group_arn": "",
    }
    response = client.post("/environments/new/", form)

    assert response.status_code == 302, html.unescape(response.content.decode())[:3000]
    assert Environment.objects.get(name="prepan").subnet_id == info["subnet_id"]
    assert AuditEvent.objects.filter(action="environment.create", actor_name="dana").exists()


def test_an_unknown_load_balancer_is_a_clear_error(client, sandbox):
    info = sandbox.info
    client.force_login(person("dana", "deployer"))

    page = html.unescape(client.get("/environments/import/", {"region": info["region"], "aws_endpoint_url": info["aws_endpoint_url"],
                                                             "aws_credentials": "sandbox", "load_balancer_name": "nope"}).content.decode())

    assert "describe load balancer nope: LoadBalancerNotFound" in page
