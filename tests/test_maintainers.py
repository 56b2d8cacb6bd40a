"""Code that runs on the workers, where it runs and who decides are a
maintainer's: each test is an attack that worked before the maintainer role."""

import html
import http.server
import json
import threading

import pytest
from django.forms.models import model_to_dict

from deployer import git
from deployer.errors import AdapterError
from releases import services
from releases.forms import EnvironmentForm, RecipeForm
from releases.models import AuditEvent, Environment, Recipe, RecipeChange
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

EVIL = {"tasks": {"deploy:update": {"run": "local", "commands": ["cat var/secret_key"]}}, "phases": {"deploy": ["deploy:update"]}}


def form_data(environment, **changes) -> dict:  # noqa: F811
    """What the environment form posts, unchanged but for `changes` (a False unticks)."""
    data = {k: v for k, v in model_to_dict(environment).items() if v is not None and k not in ("last_baked_ami", "time_scale")}
    # lists of ids one per line, as a person types them; the tags are JSON
    data.update({name: "\n".join(getattr(environment, name)) for name in ("security_group_ids", "extra_subnet_ids")})
    data["extra_tags"] = json.dumps(environment.extra_tags)
    data.update(changes)
    return {k: v for k, v in data.items() if v is not False}


def errors(response) -> str:
    return html.unescape(response.content.decode())


# -- a deployer ---------------------------------------------------------------------


def test_a_deployer_cannot_edit_a_recipe_on_the_page_or_through_the_service(client, environment):  # noqa: F811
    dana = person("dana", "deployer", "approver")
    client.force_login(dana)
    before = environment.recipe.definition

    page = client.get("/recipes/tiny/edit/")
    posted = client.post("/recipes/tiny/edit/", {"name": "tiny", "definition": json.dumps(EVIL)})
    form = RecipeForm({"name": "tiny", "definition": json.dumps(EVIL)}, instance=environment.recipe)
    assert form.is_valid()
    with pytest.raises(services.NotAllowed, match="maintainer role"):
        services.configuration_save(form=form, actor=dana)

    assert page.status_code == posted.status_code == 403 and b"the maintainer role" in posted.content
    assert Recipe.objects.get(name="tiny").definition == before
    assert not RecipeChange.objects.exists()


def test_a_deployer_who_is_also_an_approver_cannot_untick_four_eyes(client, environment):  # noqa: F811
    client.force_login(person("dana", "deployer", "approver"))

    response = client.post("/environments/prepan/edit/", form_data(environment, four_eyes=False))

    assert response.status_code == 200
    assert "Only a maintainer may change four eyes." in errors(response)
    assert Environment.objects.get(name="prepan").four_eyes is True
    assert not AuditEvent.objects.filter(action="environment.update").exists()


@pytest.mark.parametrize("field, value", [
    ("aws_endpoint_url", "http://127.0.0.1:8199/"),
    ("repository", "https://attacker.example/app.git"),
    ("aws_credentials", "profile:production"),
    ("ssh_key_file", "/etc/shadow"),
])
def test_a_deployer_cannot_change_where_things_run(client, environment, field, value):  # noqa: F811
    client.force_login(person("dana", "deployer"))
    before = getattr(environment, field)

    response = client.post("/environments/prepan/edit/", form_data(environment, **{field: value}))

    assert response.status_code == 200 and "Only a maintainer may change" in errors(response)
    assert getattr(Environment.objects.get(name="prepan"), field) == before


def test_the_service_refuses_a_deployer_s_sensitive_change_whatever_form_it_comes_through(environment):  # noqa: F811
    dana = person("dana", "deployer")
    form = EnvironmentForm(form_data(environment, four_eyes=False), instance=environment, user=person("mia", "maintainer"))
    assert form.is_valid(), form.errors

    with pytest.raises(services.NotAllowed, match="four_eyes"):
        services.configuration_save(form=form, actor=dana)

    assert Environment.objects.get(name="prepan").four_eyes is True


def test_a_deployer_may_not_add_an_environment_or_import_one(client, environment):  # noqa: F811
    client.force_login(person("dana", "deployer"))

    assert client.post("/environments/new/", form_data(environment, name="copy")).status_code == 403
    assert client.get("/environments/import/").status_code == 403
    assert not Environment.objects.filter(name="copy").exists()


def test_a_deployer_is_offered_only_the_harmless_fields(client, environment):  # noqa: F811
    client.force_login(person("dana", "deployer"))

    form = client.get("/environments/prepan/edit/").context["form"]
    listing = client.get("/environments/").content.decode()
    detail = client.get("/environments/prepan/").content.decode()

    enabled = {name for name, field in form.fields.items() if not field.disabled}
    assert enabled == {"desired_count", "gate_timeout", "instance_timeout", "ssh_timeout", "image_timeout", "smoke_timeout",
                       "command_timeout"}
    assert "Add environment" not in listing and "Add recipe" not in listing and "/recipes/tiny/edit/" not in listing
    assert "/environments/prepan/edit/" in detail


# -- a maintainer -------------------------------------------------------------------


def test_a_maintainer_changes_four_eyes_and_the_endpoint_and_the_audit_has_the_diff(client, environment):  # noqa: F811
    client.force_login(person("mia", "maintainer"))

    response = client.post("/environments/prepan/edit/", form_data(environment, four_eyes=False, aws_endpoint_url="http://127.0.0.1:5"))

    assert response.status_code == 302, errors(response)
    saved = Environment.objects.get(name="prepan")
    assert (saved.four_eyes, saved.aws_endpoint_url) == (False, "http://127.0.0.1:5")
    event = AuditEvent.objects.get(action="environment.update", actor_name="mia")
    assert event.details["diff"] == {"four_eyes": [True, False], "aws_endpoint_url": ["http://127.0.0.1:1", "http://127.0.0.1:5"]}


def test_a_recipe_change_without_four_eyes_applies_at_once_with_its_diff(client, environment):  # noqa: F811
    Environment.objects.filter(pk=environment.pk).update(four_eyes=False)
    client.force_login(person("mia", "maintainer"))
    definition = {"tasks": {"deploy:update": {"commands": ["echo v2"]}}, "phases": {"deploy": ["deploy:update"]}}

    response = client.post("/recipes/tiny/edit/", {"name": "tiny", "definition": json.dumps(definition)})

    assert response.status_code == 302
    assert Recipe.objects.get(name="tiny").definition == definition
    event = AuditEvent.objects.get(action="recipe.update")
    assert event.details["diff"] == {"definition.tasks.deploy:update.commands": [["true"], ["echo v2"]]}


def test_under_four_eyes_a_maintainer_s_recipe_change_waits_until_another_maintainer_approves_it(client, environment):  # noqa: F811
    mia, ola = person("mia", "maintainer"), person("ola", "maintainer")
    before = environment.recipe.definition
    definition = {"tasks": {"deploy:update": {"commands": ["echo v2"]}}, "phases": {"deploy": ["deploy:update"]}}
    client.force_login(mia)

    proposed = client.post("/recipes/tiny/edit/", {"name": "tiny", "definition": json.dumps(definition)})
    change = RecipeChange.objects.get()
    own_page = client.get("/recipes/tiny/edit/").content.decode()
    own_approval = client.post(f"/recipes/tiny/changes/{change.pk}/approve/", follow=True)

    assert proposed.status_code == 302
    assert Recipe.objects.get(name="tiny").definition == before, "applied before a second person approved"
    assert change.status == "pending" and 'title="four eyes: someone else approves your change"' in own_page
    assert "someone else approves it" in errors(own_approval)
    assert RecipeChange.objects.get().status == "pending"

    client.force_login(ola)
    page = client.get("/recipes/tiny/edit/").content.decode()
    assert "Waiting for a second maintainer" in page and "echo v2" in page
    approved = client.post(f"/recipes/tiny/changes/{change.pk}/approve/")

    assert approved.status_code == 302
    assert Recipe.objects.get(name="tiny").definition == definition
    change.refresh_from_db()
    assert (change.status, change.decided_by) == ("approved", ola)
    event = AuditEvent.objects.get(action="recipe.update")
    assert (event.actor_name, event.details["proposed_by"], event.details["approved_by"]) == ("ola", "mia", "ola")
    assert event.details["diff"] == {"definition.tasks.deploy:update.commands": [["true"], ["echo v2"]]}
    assert AuditEvent.objects.filter(action="recipe.propose", actor_name="mia").exists()


def test_a_rejected_recipe_change_changes_nothing_and_cannot_be_approved_later(environment):  # noqa: F811
    mia, ola = person("mia", "maintainer"), person("ola", "maintainer")
    form = RecipeForm({"name": "tiny", "definition": json.dumps(EVIL)}, instance=environment.recipe)
    assert form.is_valid()
    change = services.configuration_save(form=form, actor=mia)

    services.recipe_change_reject(change=change, actor=ola)

    with pytest.raises(services.Conflict):
        services.recipe_change_approve(change=RecipeChange.objects.get(), actor=ola)
    assert Recipe.objects.get(name="tiny").definition == {"tasks": {"deploy:update": {"commands": ["true"]}},
                                                          "phases": {"deploy": ["deploy:update"]}}


def test_a_deployer_cannot_approve_a_recipe_change(environment):  # noqa: F811
    form = RecipeForm({"name": "tiny", "definition": json.dumps(EVIL)}, instance=environment.recipe)
    assert form.is_valid()
    change = services.configuration_save(form=form, actor=person("mia", "maintainer"))

    with pytest.raises(services.NotAllowed, match="maintainer role"):
        services.recipe_change_approve(change=change, actor=person("dana", "deployer", "approver"))


# -- no fetch of internal URLs on a person's request ----------------------------------


class Listener:
    """A tiny HTTP server on loopback that counts what reaches it and answers a non-AWS page."""

    BODY = b"<html>internal admin page: do-not-show-this</html>"

    def __init__(self):
        self.requests: list[str] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                listener.requests.append(self.path)
                self.send_response(400)
                self.send_header("Content-Length", str(len(listener.BODY)))
                self.end_headers()
                self.wfile.write(listener.BODY)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


def test_the_import_page_never_sends_a_request_to_an_endpoint_named_in_the_query(client, environment, listener):  # noqa: F811
    client.force_login(person("mia", "maintainer"))

    response = client.get("/environments/import/", {"region": "us-west-1", "aws_endpoint_url": listener.url,
                                                    "aws_credentials": "sandbox", "load_balancer_name": "prepan"})

    assert response.status_code == 200 and "This field is required." in errors(response)
    assert listener.requests == []


def test_the_import_page_looks_only_where_an_environment_points_and_never_echoes_the_answer(client, environment, listener):  # noqa: F811
    other = Listener()
    try:
        Environment.objects.filter(pk=environment.pk).update(aws_endpoint_url=other.url)
        client.force_login(person("mia", "maintainer"))

        response = client.get("/environments/import/", {"account": "environment:prepan", "region": "us-west-1",
                                                        "aws_endpoint_url": listener.url, "load_balancer_name": "prepan"})
    finally:
        other.close()

    page = errors(response)
    assert listener.requests == [] and other.requests, "asked the request's endpoint, not the environment's"
    assert "describe load balancer prepan:" in page and "do-not-show-this" not in page


@pytest.mark.parametrize("repository", [
    "http://127.0.0.1/internal.git", "/srv/git/greenlight.git", "../greenlight", "file:///srv/git/greenlight.git",
    "ext::sh -c touch% /tmp/pwned", "-uhttps://example.com/x.git", "ssh://-oProxyCommand=touch%20/tmp/pwned/x",
])
def test_a_repository_that_is_not_https_ssh_or_scp_like_is_refused_with_a_clear_error(client, environment, repository,  # noqa: F811
                                                                                        settings):
    settings.ALLOW_FILE_REPOSITORIES = False
    client.force_login(person("mia", "maintainer"))

    response = client.post("/environments/prepan/edit/", form_data(environment, repository=repository))

    assert response.status_code == 200
    assert "is not a repository Greenlight fetches: use https://, ssh:// or git@host:path" in errors(response)
    assert Environment.objects.get(name="prepan").repository == "file:///nonexistent"


@pytest.mark.parametrize("repository", ["https://github.com/acme/app.git", "ssh://git@git.example.com:2222/acme/app.git",
                                        "git@github.com:acme/app.git"])
def test_https_ssh_and_scp_like_repositories_are_accepted(repository):
    assert git.check_repository(repository) == repository


def test_file_repositories_are_accepted_only_where_the_setting_allows_them():
    assert git.check_repository("file:///srv/git/app.git", allow_file=True)
    with pytest.raises(AdapterError, match="use https://, ssh:// or git@host:path$"):
        git.check_repository("file:///srv/git/app.git", allow_file=False)


def test_git_ls_remote_is_never_run_against_an_http_url(listener):
    with pytest.raises(AdapterError, match="not a repository Greenlight fetches"):
        git.resolve(f"{listener.url}internal.git", "main")

    assert listener.requests == []


def test_the_sandbox_import_says_which_setting_its_repository_needs(settings):
    settings.ALLOW_FILE_REPOSITORIES = False

    with pytest.raises(services.BadInput, match="ALLOW_FILE_REPOSITORIES=true"):
        services.environment_import_sandbox(info={"environment": "prepan", "repository": "file:///srv/app.git"})
