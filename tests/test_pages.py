"""The pages: who may see and do what, forms and their errors, queries per page."""

import html

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from releases import services
from releases.models import Approval, AuditEvent, Environment, Recipe, Release, Step
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

PAGES = ["/", "/environments/", "/audit/", "/releases/new/"]


@pytest.fixture
def release(environment):  # noqa: F811
    return services.release_create(environment=environment, revision="v2", actor=person("dana", "deployer", "approver"))


def signed_in(client, *roles, name="someone"):
    client.force_login(person(name, *roles))
    return client


@pytest.mark.parametrize("url", PAGES + ["/environments/prepan/edit/"])
def test_strangers_are_sent_to_sign_in(client, environment, url):  # noqa: F811
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


@pytest.mark.parametrize("fragment", ["/environments/prepan/aws/instances/", "/environments/prepan/deliveries/", "/"])
def test_a_fragment_asked_for_after_the_session_ended_sends_the_whole_page_to_sign_in_and_back(client, environment, fragment):  # noqa: F811
    response = client.get(fragment, HTTP_HX_REQUEST="true",
                          HTTP_HX_CURRENT_URL="http://testserver/environments/prepan/?tab=1")

    # not a redirect the browser would follow into the fragment's box: htmx (and the page's refresher) go there
    assert response.status_code == 200 and response.content == b""
    assert response["HX-Redirect"] == "/accounts/login/?next=%2Fenvironments%2Fprepan%2F%3Ftab%3D1"


def test_a_fragment_s_sign_in_never_sends_the_person_to_another_host(client, environment):  # noqa: F811
    response = client.get("/environments/prepan/aws/instances/", HTTP_HX_REQUEST="true",
                          HTTP_HX_CURRENT_URL="https://evil.example/phish")

    assert response["HX-Redirect"] == "/accounts/login/?next=%2Fphish"


@pytest.mark.parametrize("url", ["/", "/environments/", "/audit/"])
def test_a_viewer_reads_every_page(client, environment, release, url):  # noqa: F811
    assert signed_in(client, "viewer").get(url).status_code == 200


def test_the_release_page_shows_its_steps_to_a_viewer(client, release):
    response = signed_in(client, "viewer").get(f"/releases/{release.pk}/")

    assert response.status_code == 200
    body = response.content.decode()
    assert "verify_directly" in body and "swap_elb" in body
    assert "Cancel" not in body  # a viewer gets no buttons


def test_the_release_page_says_what_a_step_waits_for_as_the_api_does(client, release):
    from django.utils import timezone

    Step.objects.filter(release=release, key="launch").update(status="running", waiting_for="canary running")
    Step.objects.filter(release=release, key="provision").update(waiting_for="left over")  # pending, from an earlier try
    viewer = signed_in(client, "viewer")
    assert "waiting for canary running" in viewer.get(f"/releases/{release.pk}/").content.decode()

    # its worker went quiet: the page says what the API says, not the wait it had
    Step.objects.filter(release=release, key="launch").update(lease_owner="dead-host:41:1",
                                                              lease_expires_at=timezone.now() - timezone.timedelta(seconds=1))
    body = html.unescape(viewer.get(f"/releases/{release.pk}/").content.decode())
    assert "waiting for the sweep to take it back: its worker stopped renewing its lease" in body
    assert "canary running" not in body
    assert "waiting for left over" in body


@pytest.mark.parametrize("url, needed", [
    ("/releases/new/", b"the deployer role"), ("/environments/new/", b"the maintainer role"),
    ("/recipes/new/", b"the maintainer role"), ("/environments/prepan/edit/", b"the deployer or maintainer role")])
def test_a_viewer_may_not_start_or_change_anything(client, environment, url, needed):  # noqa: F811
    response = signed_in(client, "viewer").get(url)
    assert response.status_code == 403
    assert needed in response.content


def test_someone_with_no_role_sees_nothing(client, environment):  # noqa: F811
    assert signed_in(client).get("/").status_code == 403


def test_a_viewer_s_post_changes_nothing(client, release):
    open_gate(release)
    response = signed_in(client, "viewer").post(f"/releases/{release.pk}/gates/verify_directly/approve/", follow=True)

    assert "approver role" in response.content.decode()
    assert Step.objects.get(release=release, key="verify_directly").status == "awaiting_approval"


def open_gate(release, key="verify_directly"):
    Release.objects.filter(pk=release.pk).update(status="awaiting_approval")
    Step.objects.filter(release=release, key=key).update(status="awaiting_approval", result={"url": "http://127.0.0.1:1/", "checks": []})


def test_an_approver_sees_the_gate_card_and_approves_once(client, release):
    open_gate(release)
    client = signed_in(client, "approver", name="ravi")
    page = client.get(f"/releases/{release.pk}/").content.decode()
    assert 'class="approve"' in page and "http://127.0.0.1:1/" in page
    assert f'maxlength="{services.COMMENT_LIMIT}"' in page  # the form's own limit, not a copy of it

    client.post(f"/releases/{release.pk}/gates/verify_directly/approve/", {"comment": "fine"})
    late = client.post(f"/releases/{release.pk}/gates/verify_directly/approve/", follow=True)

    assert "is not open (it is succeeded)" in late.content.decode()
    assert release.steps.get(key="verify_directly").approvals.get().comment == "fine"


def test_the_requester_sees_a_disabled_approve_under_four_eyes(client, release):
    open_gate(release)
    client.force_login(release.requested_by)

    page = client.get(f"/releases/{release.pk}/").content.decode()

    assert "<button disabled class=\"approve\">Approve</button>" in page
    assert "formaction" not in page


def test_the_wizard_keeps_input_going_back_and_checks_the_revision(client, environment):  # noqa: F811
    client = signed_in(client, "deployer")
    client.post("/releases/new/", {"step": "environment", "environment": "prepan"})
    bad = client.post("/releases/new/", {"step": "revision", "revision": "v2; touch pwned"})
    assert "is not a valid branch, tag or commit name" in bad.content.decode()

    client.post("/releases/new/", {"step": "revision", "revision": "abc1234"})  # a commit: cannot be asked
    client.post("/releases/new/", {"step": "options", "strategy": "bake", "clone_count": "3", "back": "1"})
    back = client.get("/releases/new/?step=options").content.decode()
    assert 'value="3"' in back
    review = client.post("/releases/new/", {"step": "options", "strategy": "bake", "clone_count": "3"}, follow=True).content.decode()
    assert "launch" in review and "swap_elb" in review and "3 instances" in review

    started = client.post("/releases/new/", {"step": "review"}, follow=True)

    release = Release.objects.get()
    assert (release.revision, release.fleet_size, release.strategy) == ("abc1234", 3, "bake")
    assert started.redirect_chain[-1][0] == f"/releases/{release.pk}/"


def test_the_wizard_refuses_a_revision_the_repository_does_not_have(client, environment, tmp_path):  # noqa: F811
    import subprocess

    subprocess.run(["git", "init", "--quiet", "--bare", str(tmp_path)], check=True)
    Environment.objects.filter(pk=environment.pk).update(repository=tmp_path.as_uri())
    client = signed_in(client, "deployer")
    client.post("/releases/new/", {"step": "environment", "environment": "prepan"})

    response = client.post("/releases/new/", {"step": "revision", "revision": "v7"})

    assert "has no branch or tag 'v7'" in html.unescape(response.content.decode())


def test_an_environment_form_shows_its_errors_next_to_the_fields(client, environment):  # noqa: F811
    client = signed_in(client, "maintainer")
    response = client.post("/environments/prepan/edit/", {"name": "prepan", "app_port": "not a port"})

    assert response.status_code == 200
    body = response.content.decode()
    assert "Enter a whole number." in body and "This field is required." in body


def test_a_recipe_form_explains_bad_json_and_bad_templates(client):
    client = signed_in(client, "maintainer")

    bad_json = client.post("/recipes/new/", {"name": "demo", "definition": "{tasks: "}).content.decode()
    bad_template = client.post("/recipes/new/", {"name": "demo", "definition": '{"tasks": {"x": {"commands": ["echo {nope}"]}}}'}).content.decode()

    assert "not valid JSON" in bad_json
    assert "undeclared parameter nope" in bad_template
    assert not Recipe.objects.filter(name="demo").exists()


def test_a_deployer_changes_the_fleet_size_and_the_change_is_audited_with_a_diff(client, environment):  # noqa: F811
    from django.forms.models import model_to_dict

    client = signed_in(client, "deployer", name="dana")
    data = {k: v for k, v in model_to_dict(environment).items() if v is not None}
    data.update(desired_count=4, security_group_ids="", extra_tags="{}", extra_subnet_ids="")
    response = client.post("/environments/prepan/edit/", data)

    assert response.status_code == 302
    event = AuditEvent.objects.get(action="environment.update", actor_name="dana")
    assert event.details["diff"] == {"desired_count": [2, 4]} and event.details["changed"] == ["desired_count"]


def test_the_audit_exports_csv_and_json_with_the_filters(client, release):
    client = signed_in(client, "viewer")

    csv_text = b"".join(client.get("/audit/", {"action": "release.", "format": "csv"}).streaming_content).decode()
    data = client.get("/audit/", {"format": "json"}).json()

    assert csv_text.splitlines()[0] == "at,actor,source_ip,action,target,environment,release,details"
    assert "release.create" in csv_text and len(csv_text.splitlines()) == 2
    assert data["events"][0]["action"] == "release.create"


def test_the_log_downloads_whole(client, release):
    from releases.logs import LogWriter

    writer = LogWriter(release.pk)
    for n in range(3):
        writer.write("deploy", f"line {n}", host="app-3", stream="stdout")
    writer.flush()

    response = signed_in(client, "viewer").get(f"/releases/{release.pk}/log.txt")

    lines = b"".join(response.streaming_content).decode().splitlines()
    assert [line.split("\t")[-1] for line in lines] == ["line 0", "line 1", "line 2"]


@pytest.mark.parametrize("url", ["/", "/audit/", "/environments/"])
def test_list_pages_make_the_same_number_of_queries_however_many_rows(client, environment, url):  # noqa: F811
    client = signed_in(client, "viewer")

    def queries():
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url).status_code == 200
        return len(captured)

    dana = person("dana", "deployer")
    services.release_create(environment=environment, revision="v0", actor=dana)
    Release.objects.filter(environment=environment).update(status="succeeded")
    services.release_create(environment=environment, revision="v1", actor=dana)
    few = queries()  # one of each kind of row, so every prefetch runs
    for n in range(5):
        Release.objects.filter(environment=environment).update(status="succeeded")
        services.release_create(environment=environment, revision=f"v{n}", actor=dana)
        other = Environment.objects.create(**{**{f.name: getattr(environment, f.name) for f in Environment._meta.fields if f.name not in ("id",)}, "name": f"env-{n}"})
        services.release_create(environment=other, revision="v1", actor=dana)
    assert queries() == few


def test_the_dashboard_names_who_decided_each_finished_release_s_gates(client, release):
    ravi, vera = person("ravi", "approver"), person("vera", "approver")
    Approval.objects.create(step=release.steps.get(key="verify_directly"), user=vera, decision="approve")
    Approval.objects.create(step=release.steps.get(key="swap_elb"), user=ravi, decision="approve")
    Release.objects.filter(pk=release.pk).update(status="succeeded")

    page = signed_in(client, "viewer").get("/").content.decode()

    recent = page[page.index('id="recent"'):]  # (the environments' rows above name the release too)
    row = recent[recent.index(f"#{release.pk}</a>"):]
    assert "ravi, vera" in row[:row.index("</tr>")]


@pytest.mark.parametrize("roles, action, refusal", [
    (("viewer",), "cancel", "deployer role"),
    (("approver",), "cancel", "deployer role"),
    (("viewer",), "rollback", "deployer role"),
    (("approver",), "retry", "deployer role"),
])
def test_release_actions_need_the_deployer_role(client, release, roles, action, refusal):
    client.force_login(person("someone", *roles))

    response = client.post(f"/releases/{release.pk}/{action}/", follow=True)

    assert refusal in response.content.decode()
    release.refresh_from_db()
    assert (release.status, release.cancel_requested) == ("queued", False)


def test_a_deployer_cancels_from_the_page(client, release):
    client.force_login(release.requested_by)

    response = client.post(f"/releases/{release.pk}/cancel/", follow=True)

    assert "Cancelling: cleaning up." in response.content.decode()
    assert Release.objects.get(pk=release.pk).cancel_requested


def test_an_unknown_action_is_a_404(client, release):
    client.force_login(release.requested_by)
    assert client.post(f"/releases/{release.pk}/explode/").status_code == 404
    assert client.post(f"/releases/{release.pk}/gates/verify_directly/maybe/").status_code == 404


def test_the_dashboard_refreshes_its_body_and_counts_what_waits_in_the_title(client, release):
    open_gate(release)
    client.force_login(person("ravi", "approver"))

    body = client.get("/", HTTP_HX_REQUEST="true").content.decode()

    # the title before the fragment, at its top level, where htmx takes a title from
    title, fragment = body.strip().split("\n", 1)
    assert title.startswith("<title>(1) Dashboard") and fragment.startswith('<div id="dashboard">')
    assert "verify_directly" in body
    assert "hx-trigger" not in body  # no polling: the websocket says when (static/js/dashboard.js)
