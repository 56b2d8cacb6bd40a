"""The environment form: fields grouped by purpose with human labels, lists
typed as lists, every field checked in one pass, a pasted access key refused
and never shown back, and aria-describedby naming ids that exist."""

import html
from html.parser import HTMLParser

import pytest

from deployer import aws
from releases.models import AuditEvent, Environment
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)
from tests.test_maintainers import form_data

pytestmark = pytest.mark.django_db

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
URL = "/environments/prepan/edit/"


@pytest.fixture
def maintainer(client):
    client.force_login(person("mia", "maintainer"))
    return client


def post(client, environment, **changes):  # noqa: F811
    return client.post(URL, form_data(environment, **changes))


def field_errors(response) -> dict:
    return {name: " ".join(errors) for name, errors in response.context["form"].errors.items()}


def body(response) -> str:
    return html.unescape(response.content.decode())


# -- one test per rule ---------------------------------------------------------------------------


# One bad value per rule, and what the error says. The admin's environment form runs the same rules
# (tests/test_admin_environment.py reads this table too).
BAD_VALUES = [
    pytest.param("region", "mars-1", "'mars-1' is not an EC2 region", id="region"),
    pytest.param("verify_cidr", "10.0.0.300/33", "is not an IPv4 CIDR block", id="cidr"),
    pytest.param("verify_cidr", "10.0.0.1/24", "is not an IPv4 CIDR block", id="cidr host bits"),  # host bits set: say what is meant
    pytest.param("verify_cidr", "2001:db8::/32", "is not an IPv4 CIDR block", id="cidr ipv6"),  # an IpRanges entry: IPv4 only
    pytest.param("app_port", "70000", "A port is from 1 to 65535.", id="app port high"),
    pytest.param("app_port", "0", "A port is from 1 to 65535.", id="app port zero"),
    pytest.param("ssh_port", "0", "A port is from 1 to 65535.", id="ssh port zero"),
    pytest.param("ssh_port", "65536", "A port is from 1 to 65535.", id="ssh port high"),
    pytest.param("health_path", "health", "starting with /: /health?", id="health path"),
    pytest.param("base_ami", "ami-zzz", "'ami-zzz' is not shaped like ami- and 8 or 17 hex digits", id="ami id"),
    pytest.param("subnet_id", "subnet-12", "'subnet-12' is not shaped like subnet-", id="subnet id"),
    pytest.param("verify_security_group_id", "sg-nothex00", "'sg-nothex00' is not shaped like sg-", id="verify sg id"),
    pytest.param("security_group_ids", "sg-0123456789abcdef1\nsgx-1", "'sgx-1' is not shaped like sg-", id="security group list"),
    pytest.param("extra_subnet_ids", "subnet-0123456789abcdef1, ami-0123456789abcdef1",
                 "'ami-0123456789abcdef1' is not shaped like subnet-", id="extra subnet list"),
    pytest.param("repository", "not a repo", "'not a repo' is not a repository Greenlight fetches", id="repository"),
    pytest.param("aws_credentials", "profile:has spaces", "Not a credentials reference", id="credentials reference"),
]
# What the credentials field refuses as an access key, without ever showing it back
ACCESS_KEYS = [ACCESS_KEY, "ASIAY34FZKBOKMUTVV7A", f"profile:{ACCESS_KEY}", f"env:{ACCESS_KEY}"]


@pytest.mark.parametrize("field, value, expected", BAD_VALUES)
def test_it_refuses_a_bad_value_on_its_field_and_saves_nothing(maintainer, environment, field, value, expected):  # noqa: F811
    before = Environment.objects.get(pk=environment.pk).updated_at

    response = post(maintainer, environment, **{field: value})

    assert response.status_code == 200
    assert expected in field_errors(response).get(field, ""), field_errors(response)
    assert Environment.objects.get(pk=environment.pk).updated_at == before


@pytest.mark.parametrize("region", ["eu-west-1", "us-gov-west-1", "cn-north-1", aws.SANDBOX_REGION])
def test_it_takes_a_region_of_any_partition_botocore_lists_and_the_sandbox_s(maintainer, environment, region):  # noqa: F811
    response = post(maintainer, environment, region=region)

    assert response.status_code == 302, field_errors(response)
    assert Environment.objects.get(pk=environment.pk).region == region


def test_security_groups_and_subnets_are_typed_one_per_line_or_with_commas_and_stored_as_lists(maintainer, environment):  # noqa: F811
    response = post(maintainer, environment, security_group_ids="sg-0123456789abcdef1\n sg-0123456789abcdef2 ,sg-0123abcd",
                    extra_subnet_ids="subnet-0123456789abcdef1, subnet-0123456789abcdef2")

    assert response.status_code == 302, field_errors(response)
    saved = Environment.objects.get(pk=environment.pk)
    assert saved.security_group_ids == ["sg-0123456789abcdef1", "sg-0123456789abcdef2", "sg-0123abcd"]
    assert saved.extra_subnet_ids == ["subnet-0123456789abcdef1", "subnet-0123456789abcdef2"]
    page = body(maintainer.get(URL))
    assert "sg-0123456789abcdef1\nsg-0123456789abcdef2\nsg-0123abcd</textarea>" in page  # shown back as typed, not JSON


def test_every_error_arrives_in_one_submit(maintainer, environment):  # noqa: F811
    response = post(maintainer, environment, region="mars-1", verify_cidr="10.0.0.300/33", app_port="70000", ssh_port="0",
                    health_path="health", base_ami="ami-zzz", subnet_id="subnet-x", verify_security_group_id="sg-x",
                    security_group_ids="sg-y", extra_subnet_ids="subnet-y", repository="not a repo", aws_credentials=ACCESS_KEY,
                    target_group_arn="arn:aws:elasticloadbalancing:us-west-1:123456789012:targetgroup/tg/0123456789abcdef",
                    desired_count="0", root_volume_size="99999")

    errors = field_errors(response)
    assert set(errors) == {"region", "verify_cidr", "app_port", "ssh_port", "health_path", "base_ami", "subnet_id",
                           "verify_security_group_id", "security_group_ids", "extra_subnet_ids", "repository", "aws_credentials",
                           "__all__", "desired_count", "root_volume_size"}, errors
    assert "12 things to fix" not in body(response) and f"{len(errors)} things to fix" in body(response)


# -- the access key --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ACCESS_KEYS)
def test_an_access_key_in_the_credentials_field_is_refused_and_never_echoed(maintainer, environment, value):  # noqa: F811
    response = post(maintainer, environment, aws_credentials=value)

    assert "is an access key, not a reference to one" in field_errors(response)["aws_credentials"]
    assert value not in response.content.decode() and value[-16:] not in response.content.decode()
    assert Environment.objects.get(pk=environment.pk).aws_credentials == "sandbox"
    assert not AuditEvent.objects.filter(action="environment.update").exists()


def test_an_access_key_stored_before_the_form_refused_it_is_never_shown_on_any_page(maintainer, environment):  # noqa: F811
    Environment.objects.filter(pk=environment.pk).update(aws_credentials=ACCESS_KEY)

    # the environment page asks AWS after it answers: its instances and images come as fragments
    pages = [maintainer.get(url) for url in ("/environments/prepan/aws/instances/", "/environments/prepan/aws/images/",
                                             "/environments/prepan/", URL, "/environments/", "/environments/import/")]

    for page in pages:
        assert page.status_code == 200
        assert ACCESS_KEY[4:] not in page.content.decode(), page.request["PATH_INFO"]
    assert "holds an access key id (not shown)" in body(pages[0])  # why AWS cannot be asked, without the value


# -- accessibility ---------------------------------------------------------------------------------


class Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.described, self.legends, self.labels = set(), [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if attrs.get("aria-describedby"):
            self.described.append((tag, attrs.get("id") or attrs.get("name"), attrs["aria-describedby"]))
        if tag in ("legend", "label"):
            self._in = tag

    def handle_data(self, data):
        if self._in == "legend":
            self.legends.append(data.strip())
        elif self._in == "label":
            self.labels.append(data.strip())
        self._in = None


def test_every_aria_describedby_names_ids_that_exist_with_and_without_errors(maintainer, environment):  # noqa: F811
    for response in (maintainer.get(URL), post(maintainer, environment, region="mars-1", deploy_groups="nope")):
        page = Ids()
        page.feed(response.content.decode())

        assert len(page.described) > 20
        for tag, name, described in page.described:
            missing = [i for i in described.split() if i not in page.ids]
            assert not missing, (tag, name, missing)
    assert "id_region_error" in page.ids and "id_deploy_groups_error" in page.ids  # the errors, described


def test_the_fields_are_grouped_by_purpose_with_human_labels(maintainer, environment):  # noqa: F811
    page = Ids()
    page.feed(maintainer.get(URL).content.decode())

    assert page.legends[:1] == ["AWS"]
    for legend in ("Load balancer", "Instances", "SSH", "App and checks", "Gates and access"):
        assert legend in page.legends
    assert {"AWS region", "AWS endpoint URL", "Credentials reference", "Security groups", "Health check path"} <= set(page.labels)
    assert not [label for label in page.labels if label.startswith("Aws ")]


def test_a_form_with_errors_asks_for_focus_on_its_first_error_with_a_script_of_its_own(maintainer, environment):  # noqa: F811
    response = post(maintainer, environment, health_path="health")

    page = response.content.decode()
    assert "data-focus-error" in page and "/static/js/forms.js" in page and "<script>" not in page
    assert 'aria-invalid="true"' in page and '<a href="#id_health_path">' in page


# -- who may change what ---------------------------------------------------------------------------


def test_a_deployer_saves_the_fleet_size_where_a_locked_field_holds_a_value_the_form_would_refuse(client, environment):  # noqa: F811
    Environment.objects.filter(pk=environment.pk).update(base_ami="ami-1", region="mars-1")
    environment.refresh_from_db()
    client.force_login(person("dana", "deployer"))

    response = client.post(URL, {"desired_count": "3", "gate_timeout": "3600", "instance_timeout": "600", "ssh_timeout": "600",
                                 "image_timeout": "3600", "smoke_timeout": "300", "command_timeout": "1800"})
    refused = client.post(URL, form_data(environment, region="us-east-1", desired_count=4))

    assert response.status_code == 302, field_errors(response)
    assert Environment.objects.get(pk=environment.pk).desired_count == 3
    assert "Only a maintainer may change AWS region." in field_errors(refused)["region"]


@pytest.mark.django_db(transaction=True)
def test_in_the_browser_the_keyboard_starts_at_the_first_field_to_fix(environment, web_server, browser):  # noqa: F811
    from tests.test_browser import sign_in

    person("mia", "maintainer")
    page = sign_in(browser, web_server, "mia")
    page.goto(f"{web_server}{URL}")
    page.get_by_label("AWS region").fill("mars-1")
    page.get_by_label("Health check path").fill("health")
    page.get_by_role("button", name="Save").click()
    page.wait_for_selector(".error-summary")

    assert page.evaluate("document.activeElement.id") == "id_region"  # the first, in the page's order
    assert page.get_by_label("AWS region").get_attribute("aria-describedby") == "id_region_helptext id_region_error"
    assert "is not an EC2 region" in page.inner_text("#id_region_error")
    page.click(".error-summary a[href='#id_health_path']")
    assert page.evaluate("document.activeElement.id") == "id_health_path"
    assert page.csp_violations == []


# -- a reachable repository ------------------------------------------------------------------------


def a_repository(tmp_path) -> str:
    """A real git repository with one commit, as file:// (the tests allow that transport)."""
    import subprocess

    path = tmp_path / "app"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "commit", "-q", "--allow-empty", "-m", "first"], check=True, env=env)
    return path.as_uri()


def test_a_changed_repository_that_does_not_answer_is_refused_and_nothing_is_saved(maintainer, environment, tmp_path):  # noqa: F811
    missing = (tmp_path / "nowhere.git").as_uri()

    response = post(maintainer, environment, repository=missing)

    assert response.status_code == 200
    error = field_errors(response).get("repository", "")
    assert "Greenlight cannot reach this repository" in error and 'tick "Save without reaching the repository"' in error
    assert Environment.objects.get(pk=environment.pk).repository == "file:///nonexistent"


def test_a_repository_that_answers_is_saved(maintainer, environment, tmp_path):  # noqa: F811
    repository = a_repository(tmp_path)

    response = post(maintainer, environment, repository=repository)

    assert response.status_code == 302, field_errors(response)
    assert Environment.objects.get(pk=environment.pk).repository == repository


def test_a_repository_only_the_workers_reach_is_saved_when_the_maintainer_says_so(maintainer, environment, tmp_path):  # noqa: F811
    missing = (tmp_path / "nowhere.git").as_uri()

    response = post(maintainer, environment, repository=missing, skip_repository_check="on")

    assert response.status_code == 302, field_errors(response)
    assert Environment.objects.get(pk=environment.pk).repository == missing


def test_an_unchanged_repository_is_not_asked_again(maintainer, environment):  # noqa: F811
    # file:///nonexistent answers nothing; saving another field must not trip over it
    response = post(maintainer, environment, desired_count="3")

    assert response.status_code == 302, field_errors(response)
    assert Environment.objects.get(pk=environment.pk).desired_count == 3
