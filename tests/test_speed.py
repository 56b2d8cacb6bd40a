"""Speed of the pages (issue 12): the environment page asks AWS after it has answered (its
instances and images are fragments it loads), and the pages people wait on make the same
number of queries however many releases there are. Times are `make bench`'s, never asserted here."""

import html
from datetime import timedelta
from unittest import mock

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from releases import engine, services
from releases.models import Approval, Instance, Release, StatusChange, Step
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture: its AWS endpoint, 127.0.0.1:1, answers nothing)

pytestmark = pytest.mark.django_db

FRAGMENTS = ["instances", "images"]


def viewer(client):
    client.force_login(person("vic", "viewer"))
    return client


def test_the_environment_page_answers_without_asking_aws(client, environment):  # noqa: F811
    with mock.patch.object(engine, "cloud_for", wraps=engine.cloud_for) as cloud_for, \
            mock.patch("releases.cleanup.environment_cloud") as images_cloud:
        response = viewer(client).get("/environments/prepan/")
    assert response.status_code == 200
    assert not cloud_for.called and not images_cloud.called
    page = html.unescape(response.content.decode())
    assert "AWS did not answer" not in page
    for part in FRAGMENTS:  # each loads itself once the page is shown, saying so meanwhile
        assert f'hx-get="/environments/prepan/aws/{part}/" hx-trigger="load"' in page
    assert "Loading instances…" in page and "Loading images…" in page


@pytest.mark.parametrize("part", FRAGMENTS)
def test_the_fragments_show_aws_s_error_when_it_does_not_answer(client, environment, part):  # noqa: F811
    response = viewer(client).get(f"/environments/prepan/aws/{part}/")

    assert response.status_code == 200
    fragment = html.unescape(response.content.decode())
    assert "AWS did not answer" in fragment and 'role="alert"' in fragment
    assert "<html" not in fragment and "<nav" not in fragment  # a fragment, not a page
    assert environment.aws_credentials not in fragment.replace("AWS did not answer", "")


def test_the_instances_fragment_lists_what_aws_reports(client, environment):  # noqa: F811
    rows = [{"id": "i-0abc", "name": "app-3", "state": "running", "address": "10.0.0.3", "health": "InService",
             "in_service": True, "revision": "v2", "release": None, "release_number": "7"}]
    with mock.patch("releases.selectors.environment_instances", return_value=rows):
        fragment = viewer(client).get("/environments/prepan/aws/instances/").content.decode()
    assert "i-0abc" in fragment and "in service" in fragment and "release #7" in fragment


@pytest.mark.parametrize("part", FRAGMENTS)
def test_the_fragments_need_the_page_s_own_role(client, environment, part):  # noqa: F811
    url = f"/environments/prepan/aws/{part}/"
    anonymous = client.get(url)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/accounts/login/")
    client.force_login(person("nobody"))
    assert client.get(url).status_code == 403
    for roles in (("viewer",), ("deployer",), ("approver",), ("maintainer",)):
        client.force_login(person(f"p-{'-'.join(roles)}", *roles))
        with mock.patch("releases.selectors.environment_instances", return_value=[]), \
                mock.patch("releases.cleanup.image_schedule", return_value=[]):
            assert client.get(url).status_code == 200


def test_an_unknown_fragment_or_environment_is_not_found(client, environment):  # noqa: F811
    client = viewer(client)
    assert client.get("/environments/prepan/aws/keys/").status_code == 404
    assert client.get("/environments/nope/aws/instances/").status_code == 404


# -- queries: the same however many releases ---------------------------------------------


def history(environment, dana, ravi, n: int) -> None:  # noqa: F811
    """`n` finished releases of every kind the pages read differently: succeeded with an old
    fleet, rolled back with new instances, cancelled; approvals and status changes on each."""
    now = timezone.now()
    plan = Release.objects.filter(environment=environment).first().plan
    for k in range(n):
        status = ("succeeded", "rolled_back", "cancelled")[k % 3]
        release = Release.objects.create(environment=environment, revision=f"v{k}", fleet_size=2, plan=plan, requested_by=dana,
                                         status=status, finished_at=now - timedelta(minutes=k),
                                         state={"old": [f"i-old{k}"]} if status == "succeeded" else {})
        steps = Step.objects.bulk_create(Step(release=release, position=p, key=s["key"], kind=s["kind"], status="succeeded")
                                         for p, s in enumerate(plan["steps"]))
        gate = next(s for s in steps if s.kind == "gate")
        Approval.objects.create(step=gate, user=ravi, decision="approve")
        StatusChange.objects.create(release=release, from_status="running", to_status="rolling_back" if status != "succeeded" else status,
                                    action="rollback" if status != "succeeded" else "finish")
        role = "old" if status == "succeeded" else "clone"
        Instance.objects.create(release=release, instance_id=f"i-{release.pk:08x}", name=f"app-{k}", role=role)


def count(client, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(url).status_code == 200
    return len(captured)


@pytest.mark.parametrize("url", ["/", "/environments/", "/environments/prepan/", "RELEASE", "/api/environments/"])
def test_the_pages_make_the_same_queries_with_more_releases(client, environment, django_assert_max_num_queries, url):  # noqa: F811
    dana = person("dana", "deployer", "approver")
    release = services.release_create(environment=environment, revision="v2", actor=dana)
    ravi = person("ravi", "approver")
    Approval.objects.create(step=release.steps.get(key="verify_directly"), user=ravi, decision="approve")
    Instance.objects.create(release=release, instance_id="i-canary", name="app-1", role="canary")
    history(environment, dana, ravi, 3)
    url = f"/releases/{release.pk}/" if url == "RELEASE" else url
    if url.startswith("/api/"):
        from tests.release_helpers import api
        client = api(person("vic", "viewer"))
    else:
        client = viewer(client)
    client.get(url)  # a first visit fills what a visit caches (the session, say)
    few = count(client, url)

    history(environment, dana, ravi, 30)

    with django_assert_max_num_queries(few):
        assert client.get(url).status_code == 200
