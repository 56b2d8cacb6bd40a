"""The release wizard in the browser, by what a person sees: the revision
picker (tags v1 and v2 of the sandbox's repository, with search; its recent
commits once a worker has read them), the commit
between what runs and what is chosen on the review, a busy environment
named at the first step with a link to the release holding it."""

import pytest
from django.utils import timezone

from releases import services
from releases.models import Release
from tests.release_helpers import person
from tests.test_browser import sign_in

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]


def test_the_picker_lists_v1_and_v2_and_the_review_shows_the_commit_between(release_sandbox, web_server, browser):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    dana = person("dana", "deployer", "approver")
    running = Release.objects.create(environment=environment, revision="v1", fleet_size=1, plan={}, requested_by=dana,
                                     status="succeeded", finished_at=timezone.now())
    page = sign_in(browser, web_server, "dana")

    page.get_by_role("navigation", name="main").get_by_role("link", name="New release").click()
    page.get_by_label("Environment").select_option(environment.name)
    page.get_by_role("button", name="Next").click()
    assert f"Running now: v1 (release #{running.pk})" in page.inner_text(".running-now")
    picker = page.get_by_role("region", name="Choose a revision")
    assert picker.get_by_role("button", name="v1", exact=True).is_visible()
    assert picker.get_by_role("button", name="v2", exact=True).is_visible()
    # the recent commits arrive once a worker has read them (the page asks again meanwhile)
    commits = page.locator("#recent-commits")
    commits.get_by_role("button", name="prepan v1").wait_for(timeout=60_000)
    assert "Fetching recent commits" not in commits.inner_text()
    page.get_by_label("Search revisions").fill("v2")
    assert picker.get_by_role("button", name="v1", exact=True).is_hidden()
    assert commits.get_by_role("button", name="prepan v1").is_hidden()
    assert commits.get_by_role("button", name="prepan v2").is_visible()
    picker.get_by_role("button", name="v2", exact=True).click()

    page.wait_for_url("**step=options")
    page.get_by_role("button", name="Next").click()
    page.wait_for_url("**step=review")
    changes = page.get_by_role("region", name="Changes from v1 to v2")
    assert "prepan v2" in changes.inner_text()
    assert "Greenlight sandbox" in changes.inner_text()
    assert "prepan v1" not in changes.inner_text()
    page.context.close()


def test_a_busy_environment_is_named_at_the_first_step_with_a_link_to_its_release(release_sandbox, web_server, browser):
    environment = services.environment_import_sandbox(info=release_sandbox.info)
    dana = person("dana", "deployer", "approver")
    holding = Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan={}, requested_by=dana,
                                     status="failed")
    page = sign_in(browser, web_server, "dana")

    page.get_by_role("navigation", name="main").get_by_role("link", name="New release").click()
    status = page.get_by_role("status").filter(has_text="is busy")
    assert f"{environment.name} is busy: release #{holding.pk}" in status.inner_text()
    status.get_by_role("link", name=f"release #{holding.pk}").click()
    page.wait_for_url(f"**/releases/{holding.pk}/")
    page.context.close()
