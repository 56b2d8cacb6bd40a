"""Who may decide a gate (issue 11): per-environment groups that narrow the
global roles, N distinct approvals, Assign to me, and every refused attempt in
the audit. Each rule through the API and through the page; the last test
clicks through a whole release on the sandbox in the browser."""

import html
import threading
from unittest import mock

import pytest
from django.contrib.auth.models import Group
from django.db import connection

from releases import notifications, services
from releases.models import Approval, AuditEvent, Environment, Release, StatusChange, Step
from tests.release_helpers import api, person
from tests.test_api import environment  # noqa: F401  (fixture)
from tests.test_maintainers import form_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def managers():
    return Group.objects.create(name="release-managers")


@pytest.fixture
def dana():
    return person("dana", "deployer", "approver")


def at_gate(environment, requester, key="verify_directly") -> Release:  # noqa: F811
    """A release of `environment` with gate `key` open (its plan frozen from the environment as it is now)."""
    release = services.release_create(environment=Environment.objects.get(pk=environment.pk), revision="v2", actor=requester)
    before = [s.key for s in release.steps.order_by("position")]
    Step.objects.filter(release=release, key__in=before[:before.index(key)]).update(status="succeeded")
    Step.objects.filter(release=release, key=key).update(status="awaiting_approval", result={"url": "http://127.0.0.1:1/", "checks": []})
    Release.objects.filter(pk=release.pk).update(status="awaiting_approval")
    return Release.objects.select_related("environment").get(pk=release.pk)


def needs(environment, n: int, **groups) -> None:  # noqa: F811
    Environment.objects.filter(pk=environment.pk).update(approvals_required=n)
    for field, members in groups.items():
        getattr(environment, field).set(members)


def gate(release, key="verify_directly") -> Step:
    return Step.objects.get(release=release, key=key)


def refusals(**details) -> list[AuditEvent]:
    return [e for e in AuditEvent.objects.filter(action__endswith=".refused") if details.items() <= e.details.items()]


def approve(user, release, key="verify_directly", **body):
    return api(user).post(f"/api/releases/{release.pk}/gates/{key}/approve", body, format="json")


def page(client, user, release) -> str:
    client.force_login(user)
    return html.unescape(client.get(f"/releases/{release.pk}/").content.decode())


def decide(client, user, release, key="verify_directly", decision="approve", **data) -> str:
    client.force_login(user)
    response = client.post(f"/releases/{release.pk}/gates/{key}/{decision}/", data, follow=True)
    return html.unescape(response.content.decode())


# -- two of N -----------------------------------------------------------------------------


def test_two_of_n_through_the_api_the_first_approval_leaves_the_gate_open_and_the_second_moves_it(environment, dana):  # noqa: F811
    needs(environment, 2)
    release = at_gate(environment, dana)
    omar, lena = person("omar", "approver"), person("lena", "approver")

    first = approve(omar, release, comment="canary fine")

    assert first.status_code == 200, first.json()
    body = first.json()
    assert body["status"] == "awaiting_approval"
    card = next(g for g in body["gates"] if g["key"] == "verify_directly")
    assert card["status"] == "awaiting_approval" and card["approvals_required"] == 2
    assert [(d["by"], d["decision"], d["comment"]) for d in card["decisions"]] == [("omar", "approve", "canary fine")]
    event = AuditEvent.objects.get(action="gate.approve", actor_name="omar")
    assert event.details["approvals"] == "1 of 2"

    second = approve(lena, release)

    assert second.status_code == 200, second.json()
    assert second.json()["status"] == "running"
    assert gate(release).status == "succeeded"
    assert AuditEvent.objects.get(action="gate.approve", actor_name="lena").details["approvals"] == "2 of 2"
    assert StatusChange.objects.filter(step=gate(release), action="approve").count() == 1


def test_two_of_n_through_the_page_shows_1_of_2_given_by_the_first_and_the_second_moves_it(client, environment, dana):  # noqa: F811
    needs(environment, 2)
    release = at_gate(environment, dana)
    omar, lena = person("omar", "approver"), person("lena", "approver")

    answer = decide(client, omar, release)
    seen_by_lena = page(client, lena, release)
    seen_by_omar = page(client, omar, release)

    assert "Approved verify_directly: 1 of 2 approvals; someone else gives the next one." in answer
    assert gate(release).status == "awaiting_approval"
    assert "Who decides: any approver" in seen_by_lena
    assert "1 of 2 approvals, given by omar" in seen_by_lena
    assert 'class="approve">Approve</button>' in seen_by_lena and "You approved" not in seen_by_lena
    assert "You approved; 1 more approval from someone else." in seen_by_omar
    assert '<button disabled class="approve"' in seen_by_omar

    assert "Approved verify_directly." in decide(client, lena, release)
    assert gate(release).status == "succeeded"
    assert Release.objects.get(pk=release.pk).status == "running"


def test_a_release_keeps_the_number_of_approvals_it_started_with(environment, dana):  # noqa: F811
    needs(environment, 2)
    release = at_gate(environment, dana)
    Environment.objects.filter(pk=environment.pk).update(approvals_required=1)  # lowered while the gate is open

    assert approve(person("omar", "approver"), release).status_code == 200

    assert gate(release).status == "awaiting_approval"


def test_one_rejection_rejects_at_once_whatever_approvals_the_gate_had(environment, dana):  # noqa: F811
    needs(environment, 3)
    release = at_gate(environment, dana)
    omar, lena = person("omar", "approver"), person("lena", "approver")
    assert approve(omar, release).status_code == 200
    assert approve(lena, release).status_code == 200

    rejected = api(omar).post(f"/api/releases/{release.pk}/gates/verify_directly/reject", {"comment": "wrong colour"},
                              format="json")

    assert rejected.status_code == 200, rejected.json()
    assert gate(release).status == "failed"
    assert Release.objects.get(pk=release.pk).status == "rolling_back"
    assert dict(Approval.objects.filter(step=gate(release)).values_list("user__username", "decision")) == {
        "omar": "reject", "lena": "approve"}
    event = AuditEvent.objects.get(action="gate.reject")
    assert (event.actor_name, event.details["approved_before"], event.details["approvals"]) == ("omar", True, "1 of 3")


# -- a second approval by the same person ----------------------------------------------------


def test_a_double_approval_through_the_api_is_a_409_and_audited_and_counts_once(environment, dana):  # noqa: F811
    needs(environment, 2)
    release = at_gate(environment, dana)
    omar = person("omar", "approver")
    approve(omar, release)

    again = approve(omar, release)

    assert again.status_code == 409
    assert again.json() == {"error": "omar approved verify_directly already; it needs 1 more approval from someone else"}
    assert Approval.objects.filter(step=gate(release)).count() == 1
    assert gate(release).status == "awaiting_approval"
    [refused] = refusals(reason="again")
    assert (refused.action, refused.actor_name, refused.release_id, refused.details["gate"], refused.details["attempted"]) == (
        "gate.refused", "omar", release.pk, "verify_directly", "approve")
    assert refused.details["refused"] == again.json()["error"]


def test_a_double_approval_through_the_page_is_refused_with_a_message_and_audited(client, environment, dana):  # noqa: F811
    needs(environment, 2)
    release = at_gate(environment, dana)
    omar = person("omar", "approver")
    decide(client, omar, release)

    answer = decide(client, omar, release)  # a second tab, or a form posted by hand: the button is disabled

    assert "omar approved verify_directly already" in answer
    assert Approval.objects.filter(step=gate(release)).count() == 1
    assert len(refusals(reason="again", attempted="approve")) == 1


# -- four eyes ------------------------------------------------------------------------------


def test_a_self_approval_through_the_api_is_a_403_and_audited(environment, dana):  # noqa: F811
    release = at_gate(environment, dana)

    response = approve(dana, release)

    assert response.status_code == 403
    assert response.json()["error"] == "four eyes: dana started this release, so someone else decides its gates"
    assert gate(release).status == "awaiting_approval" and not Approval.objects.exists()
    [refused] = refusals(reason="four_eyes")
    assert (refused.actor_name, refused.details["attempted"], refused.target) == ("dana", "approve", f"release {release.pk} verify_directly")


def test_a_self_approval_through_the_page_is_explained_refused_and_audited(client, environment, dana):  # noqa: F811
    release = at_gate(environment, dana)

    shown = page(client, dana, release)
    answer = decide(client, dana, release)

    assert "You started this release; under four eyes someone else decides." in shown
    assert "four eyes: dana started this release" in answer
    assert gate(release).status == "awaiting_approval"
    assert len(refusals(reason="four_eyes", attempted="approve")) == 1


# -- groups per gate --------------------------------------------------------------------------


def test_an_approver_outside_swap_groups_decides_verify_directly_but_is_refused_at_swap_elb_through_the_api(
        environment, dana, managers):  # noqa: F811
    needs(environment, 1, swap_groups=[managers])
    omar, lena = person("omar", "approver"), person("lena", "approver", "release-managers")

    verify = approve(omar, at_gate(environment, dana))
    assert verify.status_code == 200, verify.json()
    Release.objects.update(status="succeeded")
    release = at_gate(environment, dana, key="swap_elb")
    swap = approve(omar, release, key="swap_elb")

    assert swap.status_code == 403
    assert swap.json()["error"] == "deciding swap_elb in prepan needs one of the groups release-managers"
    assert gate(release, "swap_elb").status == "awaiting_approval"
    [refused] = refusals(reason="group")
    assert (refused.actor_name, refused.details["gate"], refused.environment_id) == ("omar", "swap_elb", environment.pk)
    gates = api(omar).get(f"/api/releases/{release.pk}/").json()["gates"]
    assert {g["key"]: g["groups"] for g in gates} == {"verify_directly": [], "swap_elb": ["release-managers"]}

    assert approve(lena, release, key="swap_elb").status_code == 200
    assert gate(release, "swap_elb").status == "succeeded"


def test_an_approver_outside_swap_groups_sees_why_and_is_refused_at_swap_elb_through_the_page(
        client, environment, dana, managers):  # noqa: F811
    needs(environment, 1, swap_groups=[managers])
    omar, lena = person("omar", "approver"), person("lena", "approver", "release-managers")
    release = at_gate(environment, dana, key="swap_elb")

    shown = page(client, omar, release)
    answer = decide(client, omar, release, key="swap_elb")

    assert "Who decides: any of release-managers" in shown
    assert "Only approvers in release-managers decide this gate." in shown
    assert "formaction" not in shown and "Assign to me" not in shown
    assert "deciding swap_elb in prepan needs one of the groups release-managers" in answer
    assert gate(release, "swap_elb").status == "awaiting_approval"
    assert len(refusals(reason="group", attempted="approve")) == 1
    assert "formaction" in page(client, lena, release)
    assert "Approved swap_elb." in decide(client, lena, release, key="swap_elb")


def test_groups_are_live_taking_someone_out_of_the_group_takes_effect_on_an_open_gate(environment, dana, managers):  # noqa: F811
    omar = person("omar", "approver", "release-managers")
    needs(environment, 1, verify_groups=[managers])
    release = at_gate(environment, dana)
    omar.groups.remove(managers)

    response = approve(omar, release)

    assert response.status_code == 403 and "release-managers" in response.json()["error"]


def test_an_environment_s_groups_never_widen_a_role(environment, dana, managers):  # noqa: F811
    needs(environment, 1, verify_groups=[managers])
    release = at_gate(environment, dana)
    outsider = person("dev", "deployer", "release-managers")  # in the group, but no approver

    response = approve(outsider, release)

    assert response.status_code == 403 and response.json()["error"] == "deciding a gate needs the approver role"
    [refused] = refusals(reason="role")
    assert (refused.action, refused.actor_name, refused.release_id) == ("gate.refused", "dev", release.pk)


def test_a_viewer_s_gate_decision_on_the_page_is_refused_and_audited(client, environment, dana):  # noqa: F811
    release = at_gate(environment, dana)

    shown = page(client, person("vic", "viewer"), release)
    answer = decide(client, person("vic2", "viewer"), release, decision="reject")

    assert "Waiting for an approver: deciding a gate needs the approver role." in shown
    assert "approver role" in answer
    [refused] = refusals(reason="role")
    assert (refused.actor_name, refused.details["attempted"], refused.release_id) == ("vic2", "reject", release.pk)


def test_the_dashboard_waits_on_you_only_for_gates_you_may_decide_and_have_not_approved(client, environment, dana, managers):  # noqa: F811
    needs(environment, 2, verify_groups=[managers])
    release = at_gate(environment, dana)
    omar, lena, ravi = person("omar", "approver"), person("lena", "approver", "release-managers"), person("ravi", "approver", "release-managers")
    services.gate_approve(release=release, key="verify_directly", actor=ravi)

    def waiting(user):
        client.force_login(user)
        return client.get("/").context["waiting"]

    assert [g.key for g in waiting(lena)] == ["verify_directly"]
    assert waiting(omar) == [] and waiting(ravi) == [] and waiting(dana) == []


# -- deploy groups ------------------------------------------------------------------------------


def test_deploy_groups_refuse_a_deployer_outside_them_through_the_api_and_audit_it(environment, managers):  # noqa: F811
    needs(environment, 1, deploy_groups=[managers])
    dev, dana = person("dev", "deployer"), person("dana", "deployer", "release-managers")

    refused = api(dev).post("/api/releases/", {"environment": "prepan", "revision": "v2"}, format="json")
    started = api(dana).post("/api/releases/", {"environment": "prepan", "revision": "v2"}, format="json")
    cancel = api(dev).post(f"/api/releases/{started.json()['id']}/cancel")

    assert refused.status_code == 403
    assert refused.json()["error"] == "starting a release in prepan needs one of the groups release-managers"
    assert started.status_code == 201
    assert cancel.status_code == 403 and cancel.json()["error"] == "cancelling a release in prepan needs one of the groups release-managers"
    assert not Release.objects.get(pk=started.json()["id"]).cancel_requested
    assert [(e.actor_name, e.details["attempted"], e.details["reason"]) for e in refusals()] == [
        ("dev", "cancel", "group"), ("dev", "start", "group")]


def test_deploy_groups_on_the_pages_hide_the_environment_and_the_buttons_and_refuse_a_post(client, environment, managers):  # noqa: F811
    needs(environment, 1, deploy_groups=[managers])
    dana = person("dana", "deployer", "release-managers")
    release = services.release_create(environment=environment, revision="v2", actor=dana)
    client.force_login(person("dev", "deployer"))

    choices = client.get("/releases/new/").context["form"].fields["environment"].queryset
    environment_page = client.get("/environments/prepan/").content.decode()
    release_page = client.get(f"/releases/{release.pk}/").content.decode()
    cancel = html.unescape(client.post(f"/releases/{release.pk}/cancel/", follow=True).content.decode())

    assert list(choices) == []
    assert "?environment=prepan" not in environment_page and "deployers in release-managers" in environment_page
    assert f"/releases/{release.pk}/cancel/" not in release_page
    assert "cancelling a release in prepan needs one of the groups release-managers" in cancel
    assert not Release.objects.get(pk=release.pk).cancel_requested
    assert len(refusals(attempted="cancel", reason="group")) == 1
    client.force_login(dana)
    assert f"/releases/{release.pk}/cancel/" in client.get(f"/releases/{release.pk}/").content.decode()


@pytest.mark.parametrize("step", ["revision", "options", "review"])
def test_deploy_groups_keep_a_deployer_outside_them_out_of_the_wizard_s_later_steps(client, environment, managers, step):  # noqa: F811
    needs(environment, 1, deploy_groups=[managers])
    client.force_login(person("dev", "deployer"))

    # a link from elsewhere, and a session that names the environment (as a wizard begun before the groups changed)
    linked = client.get("/releases/new/?environment=prepan", follow=True)
    session = client.session
    session["release_wizard"] = {"environment": "prepan", "revision": "v2"}
    session.save()
    later = client.get(f"/releases/new/?step={step}", follow=True)

    for response in (linked, later):
        page = html.unescape(response.content.decode())
        assert response.redirect_chain[-1][0] == "/releases/new/"
        assert "Releasing in prepan needs one of the groups release-managers." in page
        assert "?step=revision" not in response.redirect_chain[-1][0] and "revision" not in response.context["step"]


def test_deploy_groups_also_guard_the_preflight_and_the_ssh_config_download(client, environment, managers):  # noqa: F811
    """Both use the workers' credentials or map the fleet: who may not deploy here may not run them either."""
    needs(environment, 1, deploy_groups=[managers])
    dev = person("dev", "deployer")

    by_api = api(dev).post("/api/environments/prepan/preflight")
    client.force_login(dev)
    by_button = client.post("/environments/prepan/preflight/")
    download = client.get("/environments/prepan/ssh-config.zip")
    page = client.get("/environments/prepan/").content.decode()

    assert by_api.status_code == 403
    assert by_api.json()["error"] == "running a preflight in prepan needs one of the groups release-managers"
    assert by_button.status_code == 403 and download.status_code == 403
    assert "downloading an ssh config in prepan needs one of the groups release-managers" in html.unescape(
        download.content.decode())
    assert "/environments/prepan/preflight/" not in page and "/environments/prepan/ssh-config.zip" not in page
    assert sorted(e.details["attempted"] for e in refusals(reason="group")) == ["preflight", "preflight", "ssh_config"]


def test_a_viewer_s_release_action_through_the_api_and_the_page_is_audited(client, environment, dana):  # noqa: F811
    release = services.release_create(environment=environment, revision="v2", actor=dana)
    vic = person("vic", "viewer")

    through_api = api(vic).post(f"/api/releases/{release.pk}/rollback")
    client.force_login(vic)
    through_page = client.post(f"/releases/{release.pk}/retry/")

    assert through_api.status_code == through_page.status_code == 403
    assert sorted((e.action, e.details["attempted"]) for e in refusals(reason="role")) == [
        ("release.refused", "retry"), ("release.refused", "rollback")]


# -- Assign to me ----------------------------------------------------------------------------------


def test_assign_and_unassign_through_the_api_are_shown_audited_and_notified_and_no_lock(environment, dana):  # noqa: F811
    release = at_gate(environment, dana)
    omar, lena = person("omar", "approver"), person("lena", "approver")
    url = f"/api/releases/{release.pk}/gates/verify_directly/assignee"

    with mock.patch.object(notifications, "gate_event", wraps=notifications.gate_event) as notified:
        taken = api(omar).post(url)
        again = api(omar).post(url)
        taken_over = api(lena).post(url)

    assert taken.status_code == 200
    assert next(g for g in taken.json()["gates"] if g["key"] == "verify_directly")["assignee"] == "omar"
    assert again.status_code == 409 and again.json()["error"] == "omar has taken verify_directly already"
    assert taken_over.status_code == 200 and gate(release).assignee == lena
    assert [(c.args[0].pk, c.args[1], c.kwargs["actor"]) for c in notified.call_args_list] == [
        (gate(release).pk, "gate.assigned", omar), (gate(release).pk, "gate.assigned", lena)]
    assert [(e.actor_name, e.details.get("taken_from")) for e in AuditEvent.objects.filter(action="gate.assign").order_by("seq")] == [
        ("omar", None), ("lena", "omar")]

    assert approve(omar, release).status_code == 200  # not a lock: omar still decides
    assert gate(release).status == "succeeded"


def test_unassign_through_the_api(environment, dana):  # noqa: F811
    release = at_gate(environment, dana)
    omar, lena = person("omar", "approver"), person("lena", "approver")
    url = f"/api/releases/{release.pk}/gates/verify_directly/assignee"
    api(omar).post(url)

    released = api(lena).delete(url)
    nobody = api(lena).delete(url)

    assert released.status_code == 200
    assert next(g for g in released.json()["gates"] if g["key"] == "verify_directly")["assignee"] is None
    assert nobody.status_code == 409 and nobody.json()["error"] == "nobody has taken verify_directly"
    event = AuditEvent.objects.get(action="gate.unassign")
    assert (event.actor_name, event.details["taken_from"]) == ("lena", "omar")


@pytest.mark.parametrize("who, status, reason", [
    ("vic", 403, "role"), ("dana", 403, "four_eyes"), ("omar", 403, "group")])
def test_only_someone_who_may_decide_the_gate_may_take_it_and_each_refusal_is_audited(
        environment, dana, managers, who, status, reason):  # noqa: F811
    needs(environment, 1, verify_groups=[managers])
    dana.groups.add(managers)
    people = {"vic": person("vic", "viewer"), "dana": dana, "omar": person("omar", "approver")}
    release = at_gate(environment, dana)

    response = api(people[who]).post(f"/api/releases/{release.pk}/gates/verify_directly/assignee")

    assert response.status_code == status
    assert gate(release).assignee is None
    [refused] = refusals(reason=reason)
    assert (refused.actor_name, refused.details["attempted"]) == (who, "assign")


def test_a_closed_gate_cannot_be_taken(environment, dana):  # noqa: F811
    release = services.release_create(environment=environment, revision="v2", actor=dana)

    response = api(person("omar", "approver")).post(f"/api/releases/{release.pk}/gates/swap_elb/assignee")

    assert response.status_code == 409 and "is not open" in response.json()["error"]


def test_assign_to_me_on_the_page(client, environment, dana):  # noqa: F811
    release = at_gate(environment, dana)
    omar, lena = person("omar", "approver"), person("lena", "approver")
    client.force_login(omar)

    assert "Assign to me" in page(client, omar, release)
    answer = html.unescape(client.post(f"/releases/{release.pk}/gates/verify_directly/assign/", follow=True).content.decode())

    assert "You have taken verify_directly." in answer and "taken by omar" in answer and "Unassign" in answer
    assert "taken by omar" in page(client, lena, release) and "Assign to me" in page(client, lena, release)
    client.force_login(omar)
    client.post(f"/releases/{release.pk}/gates/verify_directly/unassign/")
    assert gate(release).assignee is None
    assert [e.action for e in AuditEvent.objects.filter(action__startswith="gate.").order_by("seq")] == ["gate.assign", "gate.unassign"]
    client.force_login(person("vic", "viewer"))
    assert client.post(f"/releases/{release.pk}/gates/verify_directly/assign/").status_code == 403
    assert len(refusals(attempted="assign", reason="role")) == 1


# -- the last approval, twice at once --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_approvers_at_the_same_instant_neither_lose_an_approval_nor_move_the_gate_twice(environment):  # noqa: F811
    needs(environment, 2)
    release = at_gate(environment, person("dana", "deployer"))
    people = [person("omar", "approver"), person("lena", "approver")]
    start, answers = threading.Barrier(2), []

    def approve_now(user):
        try:
            start.wait(10)
            services.gate_approve(release=Release.objects.select_related("environment").get(pk=release.pk),
                                  key="verify_directly", actor=user)
            answers.append("ok")
        except services.ServiceError as exc:
            answers.append(str(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=approve_now, args=(user,)) for user in people]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert answers == ["ok", "ok"]
    assert Approval.objects.filter(step=gate(release), decision="approve").count() == 2
    assert gate(release).status == "succeeded"
    assert StatusChange.objects.filter(step=gate(release), action="approve").count() == 1
    assert sorted(e.details["approvals"] for e in AuditEvent.objects.filter(action="gate.approve")) == ["1 of 2", "2 of 2"]
    Release.objects.filter(pk=release.pk).update(status="cancelled")  # nothing for a worker to pick up


# -- the environment's access settings ---------------------------------------------------------------


def test_a_maintainer_sets_the_groups_and_approvals_and_the_audit_names_the_groups(client, environment, managers):  # noqa: F811
    qa = Group.objects.create(name="qa")
    client.force_login(person("mia", "maintainer"))

    response = client.post("/environments/prepan/edit/", form_data(
        environment, verify_groups=[managers.pk, qa.pk], swap_groups=[managers.pk], approvals_required=2))

    assert response.status_code == 302, html.unescape(response.content.decode())
    saved = Environment.objects.get(pk=environment.pk)
    assert sorted(g.name for g in saved.verify_groups.all()) == ["qa", "release-managers"]
    assert saved.approvals_required == 2
    event = AuditEvent.objects.get(action="environment.update")
    assert event.details["diff"] == {"verify_groups": [[], ["qa", "release-managers"]], "swap_groups": [[], ["release-managers"]],
                                     "approvals_required": [1, 2]}
    listed = api(person("vic", "viewer")).get("/api/environments/").json()["environments"][0]
    assert (listed["verify_groups"], listed["swap_groups"], listed["deploy_groups"], listed["approvals_required"]) == (
        ["qa", "release-managers"], ["release-managers"], [], 2)


def test_a_change_of_groups_in_the_admin_is_audited_by_name_once_they_are_saved(environment, admin_client, managers):  # noqa: F811
    from django.forms.models import model_to_dict

    data = {k: v for k, v in model_to_dict(environment).items() if v is not None}
    data.update(security_group_ids="[]", extra_tags="{}", extra_subnet_ids="[]", deploy_groups=[managers.pk])

    response = admin_client.post(f"/admin/releases/environment/{environment.pk}/change/", data)

    assert response.status_code == 302, response.content.decode()[:2000]
    event = AuditEvent.objects.get(action="environment.update")
    assert event.details["diff"] == {"deploy_groups": [[], ["release-managers"]]}


@pytest.mark.parametrize("field", ["verify_groups", "swap_groups", "deploy_groups", "approvals_required"])
def test_a_deployer_may_not_change_who_decides_on_the_form_or_through_the_service(client, environment, managers, field):  # noqa: F811
    from releases.forms import EnvironmentForm

    dana = person("dana", "deployer", "approver")
    value = 3 if field == "approvals_required" else [managers.pk]
    client.force_login(dana)

    response = client.post("/environments/prepan/edit/", form_data(environment, **{field: value}))
    form = EnvironmentForm(form_data(environment, **{field: value}), instance=environment, user=person("mia", "maintainer"))
    assert form.is_valid(), form.errors
    with pytest.raises(services.NotAllowed, match=f"only a maintainer may change {field}"):
        services.configuration_save(form=form, actor=dana)

    assert response.status_code == 200 and "Only a maintainer may change" in html.unescape(response.content.decode())
    saved = Environment.objects.get(pk=environment.pk)
    assert (saved.approvals_required, list(getattr(saved, field).all()) if field != "approvals_required" else []) == (1, [])
    [refused] = refusals(fields=[field])
    assert (refused.action, refused.actor_name) == ("environment.refused", "dana")


@pytest.mark.parametrize("value", ["0", "11"])
def test_approvals_required_is_from_1_to_10(client, environment, value):  # noqa: F811
    client.force_login(person("mia", "maintainer"))

    response = client.post("/environments/prepan/edit/", form_data(environment, approvals_required=value))

    assert response.status_code == 200 and "from 1 to 10 distinct people" in response.content.decode()


def test_the_environment_page_says_who_decides_and_warns_when_too_few_people_may(client, environment, managers):  # noqa: F811
    needs(environment, 2, swap_groups=[managers])
    person("lena", "approver", "release-managers")
    person("omar", "approver")

    shown = html.unescape(signed_in_page(client, "/environments/prepan/"))

    assert "Decides verify_directly</dt><dd>any approver" in shown
    assert "Decides swap_elb</dt><dd>approvers in release-managers" in shown
    assert "swap_elb needs 2 approvals but only 1 person may decide it." in shown
    assert "verify_directly needs 2 approvals" not in shown


def signed_in_page(client, url: str) -> str:
    client.force_login(person("vic", "viewer"))
    return client.get(url).content.decode()


# -- recipes ------------------------------------------------------------------------------------------


def test_a_deployer_s_recipe_edit_is_refused_on_the_page_and_by_the_service_and_audited(client, environment):  # noqa: F811
    import json

    from releases.forms import RecipeForm
    from releases.models import Recipe

    dana = person("dana", "deployer", "approver")
    before = Recipe.objects.get(name="tiny").definition
    evil = {"tasks": {"deploy:update": {"run": "local", "commands": ["cat var/secret_key"]}}, "phases": {"deploy": ["deploy:update"]}}
    client.force_login(dana)

    posted = client.post("/recipes/tiny/edit/", {"name": "tiny", "definition": json.dumps(evil)})
    form = RecipeForm({"name": "tiny", "definition": json.dumps(evil)}, instance=Recipe.objects.get(name="tiny"))
    assert form.is_valid()
    with pytest.raises(services.NotAllowed, match="maintainer role"):
        services.configuration_save(form=form, actor=dana)

    assert posted.status_code == 403
    assert Recipe.objects.get(name="tiny").definition == before
    assert [(e.action, e.actor_name, e.target) for e in refusals()] == [("recipe.refused", "dana", "tiny")] * 2


# -- in the browser, on the sandbox: one release, every rule ----------------------------------------


def shows(page, selector: str, timeout: float = 150):
    """Wait until `page` shows `selector`, reloading it every few seconds: this test is about who
    may decide, and must not hang on a live update (tests/test_browser.py is about those)."""
    import time

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + timeout
    while True:
        try:
            return page.wait_for_selector(selector, timeout=5_000)
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
            page.reload()


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(600)
def test_in_the_browser_two_approvals_a_gate_group_four_eyes_and_assign_to_me_in_one_release(release_sandbox, web_server, browser):
    from tests.release_helpers import revisions_behind, wait_status
    from tests.test_browser import sign_in

    prepan = services.environment_import_sandbox(info=release_sandbox.info)
    managers = Group.objects.create(name="release-managers")
    Environment.objects.filter(pk=prepan.pk).update(approvals_required=2)
    prepan.swap_groups.set([managers])
    before = revisions_behind(prepan.public_url).pop()
    target = "v2" if before == "v1" else "v1"
    dana = person("dana", "deployer", "approver")
    person("omar", "approver")
    person("lena", "approver", "release-managers")
    mia = person("mia", "approver", "release-managers")
    release = services.release_create(environment=Environment.objects.get(pk=prepan.pk), revision=target, actor=dana)
    dana_page, omar, lena = (sign_in(browser, web_server, name) for name in ("dana", "omar", "lena"))
    for watching in (dana_page, omar, lena):
        watching.goto(f"{web_server}/releases/{release.pk}/")
    verify, swap = ".gate-card[data-gate=verify_directly]", ".gate-card[data-gate=swap_elb]"

    # four eyes: the requester sees the card, its Approve disabled and why
    shows(dana_page, verify)
    assert dana_page.is_disabled(f"{verify} button.approve")
    assert "under four eyes someone else decides" in dana_page.inner_text(verify)

    # Assign to me: lena takes the gate, and omar is shown who has it
    shows(lena, f"{verify} button.assign")
    assert "Who decides: any approver · 0 of 2 approvals" in lena.inner_text(verify)
    lena.click(f"{verify} button.assign")
    lena.wait_for_selector("text=You have taken verify_directly.")
    shows(omar, f"{verify} .assignee:has-text('taken by lena')")

    # two of N: omar's approval leaves the gate open and says so; lena is shown "1 of 2, given by omar"
    omar.fill("#comment-verify_directly", "the canary serves it")
    omar.click(f"{verify} button.approve")
    omar.wait_for_selector("text=Approved verify_directly: 1 of 2 approvals; someone else gives the next one.")
    assert omar.is_disabled(f"{verify} button.approve")  # a second approval by the same person
    shows(lena, f"{verify} .approvals:has-text('1 of 2 approvals, given by omar')")
    lena.click(f"{verify} button.approve")
    lena.wait_for_selector("text=Approved verify_directly.")

    # per-gate groups: omar decided verify_directly, but swap_elb is release-managers'
    shows(omar, swap)
    assert omar.is_disabled(f"{swap} button.approve")
    assert "Who decides: any of release-managers" in omar.inner_text(swap)
    assert "Only approvers in release-managers decide this gate." in omar.inner_text(swap)
    shows(lena, f"{swap} button.approve:not([disabled])")
    lena.click(f"{swap} button.approve")
    lena.wait_for_selector("text=Approved swap_elb: 1 of 2 approvals; someone else gives the next one.")
    assert Release.objects.get(pk=release.pk).status == "awaiting_approval"
    assert api(mia).post(f"/api/releases/{release.pk}/gates/swap_elb/approve", format="json").status_code == 200

    assert wait_status(release.pk, "succeeded").status == "succeeded"
    shows(lena, ".release-status .status-succeeded")
    assert revisions_behind(prepan.public_url) == {target}
    assert [(e.actor_name, e.details["approvals"]) for e in AuditEvent.objects.filter(action="gate.approve").order_by("seq")] == [
        ("omar", "1 of 2"), ("lena", "2 of 2"), ("lena", "1 of 2"), ("mia", "2 of 2")]
    assert dana_page.csp_violations == omar.csp_violations == lena.csp_violations == []
