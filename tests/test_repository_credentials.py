"""A repository URL may carry a password or token (https://user:TOKEN@host/...,
https://TOKEN@host/..., ssh://user:pw@host/...): it is masked (***) wherever
Greenlight shows the URL, and never reaches a page, an API response, an audit
event, a log line or an error message. The token of these tests is searched
for in the whole of every body."""

import json
import secrets

import pytest
from django.test import Client

from deployer import git
from deployer.errors import AdapterError
from releases import engine, plan, preflight
from releases.models import AuditEvent, Environment, LogLine, Release
from tests.release_helpers import api, offline_environment, person
from tests.test_maintainers import form_data

TOKEN = "glpat" + secrets.token_hex(12)  # what a person pasted into the repository's URL
# nothing answers on port 1: git fails at once, as a repository out of the web server's reach does
FORMS = {"password": f"https://deploy-bot:{TOKEN}@127.0.0.1:1/org/app.git",
         "token": f"https://{TOKEN}@127.0.0.1:1/org/app.git"}
SHOWN = {"password": "https://deploy-bot:***@127.0.0.1:1/org/app.git", "token": "https://***@127.0.0.1:1/org/app.git"}


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"


# -- shown(): each form of URL ------------------------------------------------------------------


@pytest.mark.parametrize("url, expected", [
    ("https://user:s3cr3t-t0ken@github.com/org/repo.git", "https://user:***@github.com/org/repo.git"),
    ("https://x-access-token:ghs_abc123@github.com/org/repo.git", "https://x-access-token:***@github.com/org/repo.git"),
    ("https://ghp_abcdef123456@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("HTTPS://ghp_abcdef123456@github.com/org/repo.git", "HTTPS://***@github.com/org/repo.git"),
    ("https://oauth2:p%40ss%2Fword@gitlab.example.com:8443/g/r.git", "https://oauth2:***@gitlab.example.com:8443/g/r.git"),
    ("https://user:pw@host", "https://user:***@host"),  # no path
    ("https://:t0ken@host/r.git", "https://:***@host/r.git"),  # an empty user
    ("ssh://deploy:hunter2hunter2@git.example.com:2222/org/repo.git", "ssh://deploy:***@git.example.com:2222/org/repo.git"),
    ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),  # an ssh user is a name
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),  # scp-like: "git" is a user, not a secret
    ("https://github.com/org/repo.git", "https://github.com/org/repo.git"),
    ("https://github.com/org/repo.git?ref=a@b", "https://github.com/org/repo.git?ref=a@b"),  # an "@" after the host
    ("file:///srv/repos/app.git", "file:///srv/repos/app.git"),
    ("https://a@b:c@host/r.git", "https://a@b:***@host/r.git"),  # the last "@" ends the userinfo, as git reads it
    ("", ""),
], ids=["user and token", "x-access-token", "token alone", "scheme in capitals", "percent-encoded", "no path", "empty user",
        "ssh password", "ssh user", "scp-like", "no userinfo", "@ in the query", "file", "@ in the userinfo", "empty"])
def test_shown_masks_the_password_or_token_of_each_form_of_url(url, expected):
    assert git.shown(url) == expected


def test_the_secrets_of_a_url_are_its_password_or_lone_https_user_as_written_and_decoded():
    assert git.secrets("https://oauth2:p%40ss%2Fword@host/r.git") == ["p%40ss%2Fword", "p@ss/word"]
    assert git.secrets(f"https://{TOKEN}@host/r.git") == [TOKEN]
    assert git.secrets("ssh://git@host/r.git") == [] and git.secrets("git@host:r.git") == []
    assert git.secrets("https://host/r.git") == []


def test_gits_own_output_is_scrubbed_of_the_url_and_the_bare_token():
    url = FORMS["password"]
    stderr = f"fatal: repository '{url}/' not found\nremote: token {TOKEN} has expired"

    assert git.scrubbed(stderr, url) == (f"fatal: repository '{SHOWN['password']}/' not found\n"
                                         "remote: token *** has expired")


@pytest.mark.parametrize("form", FORMS)
def test_no_git_error_names_the_token(form, tmp_path):
    url = FORMS[form]
    failures = []
    for ask in (lambda: git.revisions(url, timeout=10), lambda: git.resolve(url, "main", timeout=10),
                lambda: git.mirror(url, tmp_path / "repositories", timeout=10),
                lambda: git.check_repository(url.replace("https://", "http://"))):  # refused: not a transport we fetch
        with pytest.raises(AdapterError) as failed:
            ask()
        failures.append(str(failed.value))

    assert all(TOKEN not in message for message in failures), failures
    assert SHOWN[form] in failures[0] and SHOWN[form] in failures[2]
    assert SHOWN[form].replace("https://", "http://") in failures[3]


def test_the_preflights_repository_check_names_the_masked_url():
    check = preflight.check_repository(None, {"repository": FORMS["token"]}, {}, revision="v1")

    assert check.status == preflight.FAILED
    assert TOKEN not in json.dumps(check.as_dict()) and SHOWN["token"] in check.message


# -- pages, the API, the audit, the log ---------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("form", FORMS)
def test_no_page_api_response_or_audit_event_shows_the_token(form):
    offline_environment("prepan", FORMS[form])
    dana = person("dana", "deployer", "approver", "maintainer")
    browser = Client()
    browser.force_login(dana)
    bodies = {}

    created = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v1"}, format="json")
    assert created.status_code == 201, created.json()
    release = Release.objects.get(pk=created.json()["id"])
    assert TOKEN in release.plan["environment"]["repository"]  # the deploy step needs it: kept, never shown
    assert SHOWN[form] in release.plan["revision_check"]["note"]  # "revision not checked: ... could not be reached"
    Release.objects.filter(pk=release.pk).update(status="cancelled")
    bodies["api create"] = created.content
    for path in ("/api/environments/", f"/api/releases/{release.pk}/", f"/api/releases/{release.pk}/logs/", "/api/audit/"):
        bodies[path] = api(dana).get(path).content

    for path in ("/", "/environments/", "/environments/prepan/", "/environments/prepan/edit/", f"/releases/{release.pk}/",
                 f"/releases/{release.pk}/panel/", "/audit/", "/releases/new/?environment=prepan"):
        bodies[path] = browser.get(path).content
    # the wizard, step by step: the picker (the repository does not answer), the review (what changes), the start
    bodies["revision step"] = browser.get("/releases/new/?step=revision").content
    assert browser.post("/releases/new/", {"step": "revision", "revision": "v2", "next": "1"}).status_code == 302
    browser.post("/releases/new/", {"step": "options", "strategy": "bake", "clone_count": "1", "next": "1"})
    bodies["review"] = browser.get("/releases/new/?step=review").content
    assert b"revision not checked" in bodies["review"] and SHOWN[form].encode() in bodies["review"]
    bodies["start"] = browser.post("/releases/new/", {"step": "review", "next": "1"}, follow=True).content

    # the admin: the environment's form and a release's frozen plan
    from django.contrib.auth.models import User

    admin = Client()
    admin.force_login(User.objects.create_superuser("ada", password="a-long-passphrase"))
    for path in (f"/admin/releases/environment/{release.environment_id}/change/", f"/admin/releases/release/{release.pk}/change/"):
        bodies[path] = admin.get(path).content
        assert SHOWN[form].encode() in bodies[path], path

    shown = {name: body for name, body in bodies.items() if TOKEN.encode() in body}
    assert shown == {}, list(shown)
    events = list(AuditEvent.objects.values_list("action", "target", "details"))
    assert events and TOKEN not in json.dumps(events)


@pytest.mark.django_db
def test_the_edit_form_shows_the_url_masked_and_keeps_the_stored_one_when_it_is_sent_back():
    environment = offline_environment("prepan", FORMS["password"])
    mia = Client()
    mia.force_login(person("mia", "maintainer"))
    dana = Client()
    dana.force_login(person("dana", "deployer"))

    page = mia.get("/environments/prepan/edit/").content.decode()
    locked = dana.get("/environments/prepan/edit/").content.decode()
    assert f'value="{SHOWN["password"]}"' in page and TOKEN not in page
    assert f'value="{SHOWN["password"]}"' in locked and TOKEN not in locked

    # sent back as shown, with another change: the stored URL stays, token and all
    kept = mia.post("/environments/prepan/edit/", form_data(environment, repository=SHOWN["password"], desired_count=3))
    # a deployer's script that sends the whole form back as it read it changes nothing it may not
    script = dana.post("/environments/prepan/edit/", form_data(environment, repository=SHOWN["password"], desired_count=4))
    assert kept.status_code == 302 and script.status_code == 302, script.content.decode()[:3000]
    assert Environment.objects.get(pk=environment.pk).repository == FORMS["password"]
    assert Environment.objects.get(pk=environment.pk).desired_count == 4


@pytest.mark.django_db
def test_stars_with_another_host_are_refused_and_a_new_token_is_never_shown_back_nor_audited():
    environment = offline_environment("prepan", FORMS["password"])
    mia = Client()
    mia.force_login(person("mia", "maintainer"))
    new_token = "glpat" + secrets.token_hex(12)

    moved = mia.post("/environments/prepan/edit/", form_data(environment, repository="https://deploy-bot:***@evil.example/org/app.git",
                                                            skip_repository_check="on"))
    assert moved.status_code == 200
    assert "*** stands for the stored password or token only" in " ".join(moved.context["form"].errors["repository"])
    # a new token typed, and an error elsewhere: the form comes back without the URL, to be typed again
    retyped = mia.post("/environments/prepan/edit/", form_data(
        environment, repository=f"https://deploy-bot:{new_token}@127.0.0.1:1/org/app.git", app_port="0"))
    assert retyped.status_code == 200 and new_token not in retyped.content.decode() and TOKEN not in retyped.content.decode()
    # git's answer (nothing answers there) names the URL masked
    unreachable = " ".join(retyped.context["form"].errors["repository"])
    assert "Greenlight cannot reach this repository" in unreachable and SHOWN["password"] in unreachable
    saved = mia.post("/environments/prepan/edit/", form_data(
        environment, repository=f"https://deploy-bot:{new_token}@127.0.0.1:1/org/app.git", skip_repository_check="on"))
    assert saved.status_code == 302
    assert Environment.objects.get(pk=environment.pk).repository == f"https://deploy-bot:{new_token}@127.0.0.1:1/org/app.git"

    event = AuditEvent.objects.filter(action="environment.update").latest("at")
    assert event.details["changed"] == ["repository"]
    assert event.details["diff"]["repository"] == [SHOWN["password"], SHOWN["password"] + " (a secret in it changed)"]
    details = json.dumps(list(AuditEvent.objects.values_list("details", flat=True)))
    assert TOKEN not in details and new_token not in details
    page = mia.get("/audit/").content.decode()
    assert TOKEN not in page and new_token not in page and "(a secret in it changed)" in page


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("form", FORMS)
def test_the_release_log_never_shows_the_token_git_prints_on_an_instance(form):
    environment = offline_environment("prepan", FORMS[form])
    dana = person("dana", "deployer", "viewer")
    # the plan a release keeps (made here, not started: no worker runs it), with the URL the deploy step clones
    release = Release.objects.create(environment=environment, revision="v1", fleet_size=1, requested_by=dana,
                                     plan={"environment": plan.settings_of(environment)}, status="cancelled")

    # what the deploy step's commands print on the instance: the command, git's errors, a script's echo
    with engine.writer_for(Release.objects.get(pk=release.pk)) as writer:
        writer.write("deploy", f"$ git clone --branch v1 {FORMS[form]} /srv/app", host="app-1")
        writer.write("deploy", f"fatal: repository '{FORMS[form]}/' not found", host="app-1", stream="stderr")
        writer.write("deploy", f"remote: the credentials {TOKEN} have expired", host="app-1", stream="stderr")
        writer.write("deploy", f"{TOKEN}", host="app-1")

    lines = list(LogLine.objects.filter(release=release).order_by("seq").values_list("text", flat=True))
    assert len(lines) == 4 and not [line for line in lines if TOKEN in line], lines
    assert "127.0.0.1:1/org/app.git /srv/app" in lines[0]  # the rest of the URL stays readable
    assert TOKEN not in api(dana).get(f"/api/releases/{release.pk}/logs/").content.decode()


@pytest.mark.parametrize("value, shown_as", [
    (f"deploy:{TOKEN}@git.example.com:org/repo.git", "'***@git.example.com:org/repo.git'"),  # scp-like with a password: no URL
    (f"http://deploy:{TOKEN}@git.example.com/org/repo.git", "'http://deploy:***@git.example.com/org/repo.git'"),
], ids=["scp-like with a password", "http"])  # ids without the token: it is random, and xdist's processes must agree
def test_a_refused_value_never_repeats_a_token_in_its_error(value, shown_as):
    with pytest.raises(AdapterError) as refused:
        git.check_repository(value)

    assert TOKEN not in str(refused.value)
    assert str(refused.value).startswith(f"{shown_as} is not a repository Greenlight fetches")
