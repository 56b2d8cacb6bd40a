"""Revisions before a release: the picker's tags, branches and commits, what
runs now, the commits a release changes (kept in its plan for the gate cards),
the API's revision check (the wizard's, to the letter), busy environments at
the wizard's first step, and strategies that cannot run."""

import html
import re

import pytest
from django.test import Client
from django.utils import timezone

from deployer.sandbox import repository
from releases import services
from releases.models import Environment, Release
from tests.helpers import wait_for
from tests.release_helpers import api, offline_environment, person

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path / "var"  # the bare clones for the log go under here


@pytest.fixture
def repo(tmp_path):
    return repository.ensure(tmp_path / "app.git")  # tags v1 and v2, one commit each ("prepan v1", "prepan v2")



@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


def wizard(user, environment: str) -> Client:
    client = Client()
    client.force_login(user)
    response = client.post("/releases/new/", {"step": "environment", "environment": environment, "next": "1"})
    assert response.status_code == 302, response.content.decode()[:2000]
    return client


def succeeded(environment: Environment, revision: str, user) -> Release:
    return Release.objects.create(environment=environment, revision=revision, fleet_size=1, plan={}, requested_by=user,
                                  status="succeeded", finished_at=timezone.now())


def test_the_api_refuses_an_unknown_revision_with_the_wizards_own_message(repo, dana):
    offline_environment("prepan", repo)

    response = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v9"}, format="json")
    page = wizard(dana, "prepan").post("/releases/new/", {"step": "revision", "revision": "v9", "next": "1"})

    assert response.status_code == 400
    message = response.json()["error"]
    assert message == f"{repo} has no branch or tag 'v9'"
    assert page.status_code == 200
    assert [str(e) for e in page.context["form"].errors["revision"]] == [message]
    assert not Release.objects.exists()


def test_a_revision_of_a_repository_out_of_reach_is_accepted_and_reads_not_checked(dana):
    offline_environment("prepan", "file:///nonexistent")

    response = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v9"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["revision_checked"] is False
    assert Release.objects.get(pk=body["id"]).plan["revision_check"]["note"].startswith("revision not checked")
    Release.objects.filter(pk=body["id"]).update(status="cancelled")

    client = wizard(dana, "prepan")
    step = client.post("/releases/new/", {"step": "revision", "revision": "v9", "next": "1"})
    assert step.status_code == 302 and step["Location"].endswith("step=options")
    client.post("/releases/new/", {"step": "options", "strategy": "bake", "clone_count": "1", "next": "1"})
    review = client.get("/releases/new/?step=review")
    assert "revision not checked" in review.content.decode()


def test_a_release_keeps_the_commits_between_what_runs_and_its_revision(repo, dana):
    environment = offline_environment("prepan", repo)
    running = succeeded(environment, "v1", dana)

    response = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v2"}, format="json")

    assert response.status_code == 201
    changes = response.json()["changes"]
    assert (changes["from"], changes["from_release"], changes["to"]) == ("v1", running.pk, "v2")
    assert [(c["subject"], c["author"]) for c in changes["commits"]] == [("prepan v2", "Greenlight sandbox")]
    assert response.json()["revision_checked"] is True


def push(repo: str, subject: str, *, tag: str = "") -> str:
    """A commit on main of the bare repository at `repo` (a file:// URL), tagged `tag` if given; its sha."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    with TemporaryDirectory() as work:
        repository._git("clone", "--quiet", Path(repo.removeprefix("file://")).as_posix(), "work", cwd=Path(work))
        clone = Path(work) / "work"
        repository._git("commit", "--quiet", "--allow-empty", "-m", subject, cwd=clone)
        if tag:
            repository._git("tag", tag, cwd=clone)
        repository._git("push", "--quiet", "--tags", "origin", "HEAD:main", cwd=clone)
        return repository._git("rev-parse", "HEAD", cwd=clone)


def next_look(text: str) -> str:
    """The URL the picker's "Fetching recent commits…" asks next (its hx-get)."""
    found = re.search(r'hx-get="([^"]*/releases/new/commits/[^"]*)"', text)
    assert found, text[-3000:]
    return html.unescape(found.group(1))


def commits_after_a_worker_read_them(client: Client, page: str) -> str:
    """The picker's recent commits once a worker has read them: the fragment
    asked for again, as the page's htmx does, until it is no longer "Fetching…"."""
    url = [next_look(page)]

    def answered():
        fragment = client.get(url[0]).content.decode()
        if "Fetching recent commits" in fragment:
            url[0] = next_look(fragment)
            return None
        return fragment

    return wait_for(answered, 60, 1, "a worker to read the recent commits")


def subjects(fragment: str) -> list[str]:
    return re.findall(r"</code> ([^<]*)</button>", fragment)


@pytest.mark.django_db(transaction=True)
def test_the_picker_answers_without_a_clone_and_lists_recent_commits_once_a_worker_read_them(repo, celery_worker, settings):
    environment = offline_environment("prepan", repo)
    dana = person("dana", "deployer", "approver")
    running = succeeded(environment, "v1", dana)
    succeeded(environment, "v2", dana).__class__.objects.filter(revision="v2").update(status="rolled_back")
    mirrors = settings.VAR_DIR / "repositories"
    client = wizard(dana, "prepan")

    page = client.get("/releases/new/?step=revision").content.decode()

    assert not mirrors.exists()  # nothing was cloned or fetched while the page was made
    assert f"Running now: v1 (<a href=\"/releases/{running.pk}/\">release #{running.pk}</a>)" in page
    assert 'name="pick" value="v1"' in page and 'name="pick" value="v2"' in page and 'name="pick" value="main"' in page
    assert "Fetching recent commits…" in page and "prepan v1" not in page
    fragment = commits_after_a_worker_read_them(client, page)
    assert subjects(fragment) == ["prepan v2", "prepan v1"]
    assert not mirrors.exists()  # the worker cloned it, with its own


@pytest.mark.django_db(transaction=True)
def test_a_fresh_reading_of_the_commits_is_not_fetched_again_within_the_window(repo, celery_worker, settings):
    offline_environment("prepan", repo)
    client = wizard(person("dana", "deployer"), "prepan")
    settings.REPOSITORY_FRESH_SECONDS = 3600
    first = commits_after_a_worker_read_them(client, client.get("/releases/new/?step=revision").content.decode())
    push(repo, "prepan v3")

    within = client.get("/releases/new/?step=revision").content.decode()
    settings.REPOSITORY_FRESH_SECONDS = 0  # the window has passed
    after = client.get("/releases/new/?step=revision").content.decode()

    assert subjects(first) == ["prepan v2", "prepan v1"]
    assert "Fetching recent commits…" not in within and subjects(within) == ["prepan v2", "prepan v1"]
    assert "Fetching recent commits…" in after
    assert subjects(commits_after_a_worker_read_them(client, after)) == ["prepan v3", "prepan v2", "prepan v1"]


def test_what_changes_reuses_a_fresh_clone_unless_it_lacks_the_revision_the_repository_names(repo, dana, settings):
    environment = offline_environment("prepan", repo)
    succeeded(environment, "v1", dana)
    settings.REPOSITORY_FRESH_SECONDS = 3600

    def changes(revision: str, **commit) -> list[str]:
        found = services.revision_changes(environment=environment, revision=revision, **commit)
        assert found["error"] == ""
        return [c["subject"] for c in found["commits"]]

    first = changes("main")  # the review's look: a first clone, in this process
    v3 = push(repo, "prepan v3")
    within = changes("main")
    pinned = changes("main", commit=v3)  # what release_start passes: the commit ls-remote named
    push(repo, "prepan v4", tag="v4")
    tagged = changes("v4")  # a tag pushed a moment ago: fetched for
    push(repo, "prepan v5")
    created = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "main"}, format="json")

    assert first == within == ["prepan v2"]
    assert pinned == ["prepan v3", "prepan v2"]
    assert tagged == ["prepan v4", "prepan v3", "prepan v2"]
    assert [c["subject"] for c in created.json()["changes"]["commits"]] == ["prepan v5", "prepan v4", "prepan v3", "prepan v2"]


def test_the_picker_stops_asking_and_says_so_when_no_worker_answers(repo, dana):
    offline_environment("prepan", repo)  # not committed: no worker can read it, as none that runs would
    client = wizard(dana, "prepan")

    first = client.get("/releases/new/commits/?environment=prepan&tries=1").content.decode()
    last = client.get("/releases/new/commits/?environment=prepan&tries=60").content.decode()

    assert "Fetching recent commits…" in first and "hx-get" in first
    assert "no worker has read them in 120 s: are the workers running?" in last and "hx-get" not in last


def test_the_recent_commits_are_only_for_who_may_start_a_release_there(repo):
    from django.contrib.auth.models import Group

    environment = offline_environment("prepan", repo)
    environment.deploy_groups.add(Group.objects.create(name="team-a"))
    outsider, viewer = Client(), Client()
    outsider.force_login(person("dana", "deployer"))
    viewer.force_login(person("vic", "viewer"))

    assert outsider.get("/releases/new/commits/?environment=prepan").status_code == 404
    assert viewer.get("/releases/new/commits/?environment=prepan").status_code == 403


def test_the_wizard_names_a_busy_environment_at_its_first_step(repo, dana):
    environment = offline_environment("prepan", repo)
    offline_environment("other", repo)
    holding = Release.objects.create(environment=environment, revision="v1", fleet_size=1, plan={}, requested_by=dana)
    client = Client()
    client.force_login(dana)

    first = client.get("/releases/new/").content.decode()
    refused = client.post("/releases/new/", {"step": "environment", "environment": "prepan", "next": "1"})

    assert f'prepan is busy: <a href="/releases/{holding.pk}/">release #{holding.pk}</a>' in first
    assert refused.status_code == 200
    assert f"release #{holding.pk}" in str(refused.context["form"].errors["environment"])
    assert client.post("/releases/new/", {"step": "environment", "environment": "other", "next": "1"}).status_code == 302


def test_deploy_from_image_cannot_be_chosen_without_an_image_and_the_default_is_the_environments(repo, dana):
    environment = offline_environment("prepan", repo)
    client = wizard(dana, "prepan")
    client.post("/releases/new/", {"step": "revision", "revision": "v2", "next": "1"})

    page = client.get("/releases/new/?step=options").content.decode()
    refused = client.post("/releases/new/", {"step": "options", "strategy": "deploy_from_image", "clone_count": "1", "next": "1"})

    assert 'value="deploy_from_image"' in page and "disabled" in page.split('value="deploy_from_image"')[1].split(">")[0]
    assert "has no baked image yet" in page
    assert "cannot run" in str(refused.context["form"].errors["strategy"])

    Environment.objects.filter(pk=environment.pk).update(last_baked_ami="ami-2", default_strategy="bake")
    client = wizard(dana, "prepan")
    client.post("/releases/new/", {"step": "revision", "revision": "v2", "next": "1"})
    page = client.get("/releases/new/?step=options").content.decode()
    assert 'value="bake"' in page and "checked" in page.split('value="bake"')[1].split(">")[0]  # an image does not change it
    response = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v2"}, format="json")
    assert response.json()["strategy"] == "bake"


def test_both_gate_cards_show_the_commits_and_an_unchecked_revision_says_so(repo, dana):
    from releases.models import Step

    environment = offline_environment("prepan", repo)
    succeeded(environment, "v1", dana)
    checked = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v2"}, format="json").json()
    Release.objects.filter(pk=checked["id"]).update(status="cancelled")
    Environment.objects.filter(pk=environment.pk).update(repository="file:///nonexistent")
    unchecked = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v2"}, format="json").json()
    Release.objects.filter(pk=unchecked["id"]).update(status="cancelled")
    client = Client()
    client.force_login(person("ravi", "approver"))

    for release_id, key in ((checked["id"], "verify_directly"), (checked["id"], "swap_elb"), (unchecked["id"], "swap_elb")):
        Release.objects.filter(pk=release_id).update(status="awaiting_approval")
        Step.objects.filter(release_id=release_id).update(status="pending")
        Step.objects.filter(release_id=release_id, key=key).update(
            status="awaiting_approval", deadline=timezone.now() + timezone.timedelta(hours=1),
            result={"name": "app-1", "instance": "i-1", "url": "http://127.0.0.1:9/", "checks": [], "old": [], "new": []})
        page = client.get(f"/releases/{release_id}/").content.decode()
        card = page.split(f'data-gate="{key}"')[1].split("</section>")[0:2]
        card = "</section>".join(card)
        if release_id == checked["id"]:
            assert "Changes from v1 to v2" in card and "prepan v2" in card and "revision not checked" not in card
        else:
            assert "revision not checked" in card and "prepan v2" not in card
        Release.objects.filter(pk=release_id).update(status="cancelled")
