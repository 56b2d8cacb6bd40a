"""The audit page: people's actions with the engine's AWS calls folded under
them, filters in the URL, numbered pages, times to the second, a streamed CSV."""

import asyncio
import csv
import html
import io
import re

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.http import StreamingHttpResponse
from django.test import AsyncClient

from releases import audit, services
from releases.models import AuditEvent, Environment
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db


def signed_in(client, *roles, name="vic"):
    client.force_login(person(name, *roles))
    return client


@pytest.fixture
def history(environment):  # noqa: F811
    """Two releases of two environments whose AWS calls interleave, as two workers write them."""
    dana, ravi = person("dana", "deployer", "approver"), person("ravi", "deployer", "approver")
    other = Environment.objects.create(**{**{f.name: getattr(environment, f.name) for f in Environment._meta.fields if f.name != "id"},
                                          "name": "staging"})
    first = services.release_create(environment=environment, revision="v2", actor=dana)  # release.create, by dana
    audit.record("aws:RunInstances", release=first, target="i-0aaa", request_id="r-1")
    second = services.release_create(environment=other, revision="v7", actor=ravi)
    audit.record("aws:RunInstances", release=second, target="i-0bbb")
    audit.record("aws:CreateTags", release=first, target="i-0aaa")
    audit.record("login.lockout", source_ip="10.1.2.3", target="mallory")  # the engine's, with no release: a row of its own
    audit.record("gate.approve", actor=ravi, release=first, target=f"release {first.pk} verify_directly")
    audit.record("aws:CreateImage", release=first, target="ami-0ccc")
    audit.record("aws:RunInstances", release=first, target="i-0ddd")
    return {"first": first, "second": second, "dana": dana, "ravi": ravi}


def rows(response):
    return [(event.action, event.actor_name, [call.target for call in calls]) for event, calls in response.context["rows"]]


def test_the_people_view_is_the_default_and_folds_each_aws_call_under_the_action_that_caused_it(client, history):
    first, second = history["first"], history["second"]

    response = signed_in(client, "viewer").get("/audit/")

    assert response.status_code == 200
    assert rows(response) == [
        ("gate.approve", "ravi", ["ami-0ccc", "i-0ddd"]),  # the calls after it, oldest first
        ("login.lockout", "greenlight", []),
        ("release.create", "ravi", ["i-0bbb"]),  # its own release's calls only
        ("release.create", "dana", ["i-0aaa", "i-0aaa"]),  # up to the release's next action, not past it
    ]
    body = response.content.decode()
    # expandable: a <details> per action with calls, shut until opened
    assert body.count("<details>") == 3 and "2 AWS calls by greenlight</summary>" in body and "1 AWS call by greenlight</summary>" in body
    assert f'href="/releases/{first.pk}/"' in body and f'href="/releases/{second.pk}/"' in body
    assert "4 actions" in body


def test_an_action_keeps_its_calls_when_the_next_action_is_on_another_page_or_filtered_out(client, history):
    client = signed_in(client, "viewer")

    only_dana = client.get("/audit/", {"actor": "dana"})  # ravi's approval is filtered out, yet it still ends dana's calls
    second_page = client.get("/audit/", {"page": 2, "search": "release"})

    assert rows(only_dana) == [("release.create", "dana", ["i-0aaa", "i-0aaa"])]
    assert second_page.status_code == 200 and len(rows(second_page)) == 3  # the page is past the end: the last one


def test_the_everything_view_lists_every_event_as_today(client, history):
    response = signed_in(client, "viewer").get("/audit/", {"view": "everything"})

    assert [action for action, _, calls in rows(response)] == [
        "aws:RunInstances", "aws:CreateImage", "gate.approve", "login.lockout", "aws:CreateTags", "aws:RunInstances",
        "release.create", "aws:RunInstances", "release.create"]
    assert all(calls == [] for _, _, calls in rows(response)) and "<details>" not in response.content.decode()
    assert "9 events" in response.content.decode()


def test_search_matches_part_of_any_text_in_any_case(client, history):
    client = signed_in(client, "viewer")

    assert [r[0] for r in rows(client.get("/audit/", {"search": "VERIFY_dir"}))] == ["gate.approve"]  # part of the target
    assert [r[0] for r in rows(client.get("/audit/", {"search": "lock"}))] == ["login.lockout"]  # part of the action
    assert [r[1] for r in rows(client.get("/audit/", {"search": "avi", "view": "everything"}))] == ["ravi", "ravi"]  # part of who
    assert [r[2] for r in rows(client.get("/audit/", {"search": "r-1", "view": "everything"}))] == [[]]  # the details


def test_the_dropdowns_offer_what_the_audit_holds_and_combine_with_search(client, history):
    client = signed_in(client, "viewer")

    response = client.get("/audit/")
    form = response.context["form"]

    assert [v for v, _ in form.fields["environment"].choices] == ["", "prepan", "staging"]
    assert [v for v, _ in form.fields["actor"].choices] == ["", "dana", "greenlight", "ravi"]
    actions = dict(form.fields["action"].choices)
    assert [v for v, _ in actions["aws:"]] == ["aws:", "aws:CreateImage", "aws:CreateTags", "aws:RunInstances"]
    assert "gate.approve" in actions and "login.lockout" in actions
    body = response.content.decode()
    assert '<select name="actor"' in body and '<option value="ravi">ravi</option>' in body

    assert rows(client.get("/audit/", {"environment": "staging"})) == [("release.create", "ravi", ["i-0bbb"])]
    assert [r[0] for r in rows(client.get("/audit/", {"action": "aws:", "view": "everything"}))] == [
        "aws:RunInstances", "aws:CreateImage", "aws:CreateTags", "aws:RunInstances", "aws:RunInstances"]
    # combined: all must hold
    assert rows(client.get("/audit/", {"actor": "ravi", "environment": "prepan"})) == [("gate.approve", "ravi", ["ami-0ccc", "i-0ddd"])]
    assert rows(client.get("/audit/", {"actor": "ravi", "environment": "prepan", "search": "create"})) == []
    assert [r[2] for r in rows(client.get("/audit/", {"action": "aws:", "search": "0aaa", "view": "everything"}))] == [[], []]


def test_a_value_no_dropdown_offers_is_an_error_on_the_form_and_the_other_filters_still_apply(client, history):
    response = signed_in(client, "viewer").get("/audit/", {"actor": "nobody", "environment": "staging"})

    assert response.status_code == 200
    body = html.unescape(response.content.decode())
    assert "Who: Select a valid choice. nobody is not one of the available choices." in body
    assert rows(response) == [("release.create", "ravi", ["i-0bbb"])]
    too_big = signed_in(client, "viewer", name="vera").get("/audit/", {"release": "9" * 30, "since": "yesterday"})
    assert too_big.status_code == 200 and len(rows(too_big)) == 4  # errors on the form, never a 500
    assert "Ensure this value is less than or equal to" in too_big.content.decode()


def test_pages_are_numbered_with_a_window_and_keep_the_filters(client, environment):  # noqa: F811
    dana = person("dana", "deployer")
    for n in range(50 * 12 + 1):
        audit.record("environment.preflight", actor=dana, environment=environment, target=f"check {n}")
    client = signed_in(client, "viewer")

    response = client.get("/audit/", {"actor": "dana", "search": "check", "page": 6})

    body = html.unescape(response.content.decode())
    pages = re.search(r'<nav class="pages".*?</nav>', body, re.S).group(0)
    numbers = re.findall(r'>(\d+|…)<', pages)
    assert numbers == ["1", "…", "4", "5", "6", "7", "8", "…", "13"]
    assert '<span aria-current="page">6</span>' in pages
    links = re.findall(r'href="\?([^"]+)"', pages)
    assert links and all(link.startswith("actor=dana&search=check&page=") for link in links)
    assert "601 actions" in pages
    last = client.get("/audit/", {"actor": "dana", "search": "check", "page": 13})
    assert [e.target for e, _ in last.context["rows"]] == ["check 0"]
    # the export links and the view links keep them too, without the page
    assert 'href="?actor=dana&search=check&format=csv"' in body
    assert 'href="?actor=dana&search=check&view=everything"' in body


def test_every_time_is_to_the_second_in_utc_and_says_so(client, history):
    body = signed_in(client, "viewer").get("/audit/").content.decode()

    times = re.findall(r'<time datetime="([^"]+)" data-local title="([^"]+)">([^<]+)</time>', body)
    assert len(times) == 9  # 4 actions, 5 calls
    event = AuditEvent.objects.get(action="gate.approve")
    utc = event.at.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert (event.at.isoformat(), utc, utc) in times
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text) and text == title for _, title, text in times)
    assert all(iso.endswith("+00:00") for iso, _, _ in times)


def test_the_csv_streams_every_matching_event_with_its_header(client, history):
    response = signed_in(client, "viewer").get("/audit/", {"search": "i-0", "view": "people", "format": "csv"})

    assert isinstance(response, StreamingHttpResponse)
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="greenlight-audit.csv"'
    chunks = list(response.streaming_content)
    assert chunks[0] == b"at,actor,source_ip,action,target,environment,release,details\r\n"  # before any row is read
    table = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    # the export is of events (the engine's calls too), newest first, whatever the view
    assert [r["target"] for r in table] == ["i-0ddd", "ami-0ccc", "i-0aaa", "i-0bbb", "i-0aaa"]
    assert table[-1]["details"] == '{"request_id": "r-1"}' and table[-1]["environment"] == "prepan"


@pytest.mark.django_db(transaction=True)
def test_under_asgi_the_csv_is_an_async_stream_read_in_batches(environment):  # noqa: F811
    dana = person("dana", "deployer")
    vic = person("vic", "viewer")
    for n in range(1200):
        audit.record("environment.preflight", actor=dana, environment=environment, target=f"check {n}")

    async def download():
        client = AsyncClient()
        await client.aforce_login(vic)
        response = await client.get("/audit/", {"format": "csv"})
        chunks = [chunk async for chunk in response.streaming_content]
        await sync_to_async(connections.close_all)()  # the request's thread's own connection
        return response, chunks

    response, chunks = asyncio.run(download())

    assert response.is_async and response.status_code == 200
    assert len(chunks) == 3  # 1,201 lines in batches of 500: Django does not read it all before sending
    lines = b"".join(chunks).decode().splitlines()
    assert lines[0].startswith("at,actor") and len(lines) == 1201 and lines[-1].split(",")[4] == "check 0"


def test_a_viewer_reads_the_audit_and_a_stranger_is_sent_to_sign_in(client, history):
    assert client.get("/audit/").status_code == 302 and client.get("/audit/")["Location"].startswith("/accounts/login/")
    assert client.get("/audit/?format=csv")["Location"].startswith("/accounts/login/")
    assert signed_in(client, "viewer").get("/audit/").status_code == 200


@pytest.mark.sandbox
@pytest.mark.django_db(transaction=True)
def test_in_the_browser_calls_expand_and_times_show_in_the_viewer_s_zone_with_utc_on_hover(history, web_server, browser):
    person("vera", "viewer")
    context = browser.new_context(timezone_id="Asia/Tokyo", locale="en-US")
    page = context.new_page()
    refused = []
    page.on("console", lambda message: "Content Security Policy" in message.text and refused.append(message.text))
    page.goto(f"{web_server}/accounts/login/")
    page.fill("#id_username", "vera")
    page.fill("#id_password", "a-long-passphrase")
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{web_server}/")

    page.goto(f"{web_server}/audit/")

    calls = page.locator("details").first  # under ravi's approval, the newest action
    assert calls.locator("summary").inner_text() == "2 AWS calls by greenlight"
    assert not calls.locator("text=ami-0ccc").is_visible()  # folded
    calls.locator("summary").click()
    assert calls.locator("text=ami-0ccc").is_visible() and calls.locator("text=aws:CreateImage").is_visible()

    event = AuditEvent.objects.get(action="gate.approve")
    shown = page.locator(f'time[datetime="{event.at.isoformat()}"]').first
    tokyo = event.at + timezone_offset_tokyo()
    assert shown.get_attribute("title") == event.at.strftime("%Y-%m-%d %H:%M:%S UTC")  # UTC on hover
    text = shown.inner_text()
    assert "GMT+9" in text and tokyo.strftime("%S") in text and f"{tokyo.hour % 12 or 12}:{tokyo.strftime('%M:%S')}" in text

    page.select_option("select[name=actor]", "ravi")
    page.fill("input[name=search]", "VERIFY")
    page.click("button:has-text('Filter')")
    page.wait_for_url(lambda url: "actor=ravi" in url and "search=VERIFY" in url)
    assert page.locator("table.audit > tbody > tr:not(.calls)").count() == 1
    assert refused == []
    context.close()


def timezone_offset_tokyo():
    from datetime import timedelta

    return timedelta(hours=9)  # Japan keeps no summer time
