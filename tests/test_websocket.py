"""The live feed at /ws/releases/<id>/: who may listen, replay, then live events."""

from unittest import mock

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client

from deployer.asgi import application
from releases import broadcast, services, tasks
from releases.logs import LogWriter
from releases.models import Release
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://127.0.0.1:8000")


def session_cookie(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


@pytest.fixture
def release(environment):  # noqa: F811
    dana = person("dana", "deployer", "approver")
    with mock.patch.object(tasks.advance_release, "delay", autospec=True):  # a worker running beside the tests must not add lines
        release = services.release_create(environment=environment, revision="v2", actor=dana)
    # the worker's sweep nudges a queued release it finds: this one is to be left alone
    Release.objects.filter(pk=release.pk).update(status="cancelled")
    writer = LogWriter(release.pk)
    for n in range(1, 2501):
        writer.write("deploy", f"line {n}", host="app-3", stream="stdout")
    writer.flush()
    return release


def connect(release_id: int, *headers):
    return WebsocketCommunicator(application, f"/ws/releases/{release_id}/", headers=[(b"host", b"127.0.0.1:8000"), *headers])


async def test_a_stranger_is_refused(release):
    communicator = connect(release.pk, ORIGIN)
    connected, _ = await communicator.connect()
    assert not connected


async def test_a_page_from_another_origin_is_refused(release):
    from asgiref.sync import sync_to_async

    cookie = await sync_to_async(session_cookie)(await sync_to_async(person)("vic", "viewer"))
    communicator = connect(release.pk, (b"origin", b"http://evil.example"), cookie)
    connected, _ = await communicator.connect()
    assert not connected


async def test_a_viewer_gets_the_missed_lines_then_live_ones(release):
    from asgiref.sync import sync_to_async

    cookie = await sync_to_async(session_cookie)(await sync_to_async(person)("vic", "viewer"))
    communicator = connect(release.pk, ORIGIN, cookie)
    connected, _ = await communicator.connect()
    assert connected

    await communicator.send_json_to({"after": 1000})
    seqs = []
    while True:
        message = await communicator.receive_json_from(timeout=5)
        if message["type"] == "replayed":
            break
        seqs += [line["seq"] for line in message["lines"]]
    assert seqs == list(range(1001, 2501))

    await sync_to_async(broadcast.log_lines)(release.pk, [{"seq": 2501, "text": "live"}])
    live = await communicator.receive_json_from(timeout=5)
    assert live == {"type": "log", "lines": [{"seq": 2501, "text": "live"}]}
    await communicator.disconnect()


async def _viewer_socket(release):
    from asgiref.sync import sync_to_async

    cookie = await sync_to_async(session_cookie)(await sync_to_async(person)("vic", "viewer"))
    communicator = connect(release.pk, ORIGIN, cookie)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


@pytest.mark.parametrize("frame, says", [
    ({"text_data": "not json at all"}, "not JSON"),
    ({"text_data": "[" * 100_000}, "not JSON"),
    ({"bytes_data": b'{"after": 0}'}, "binary frames are not read"),
    ({"text_data": "[1, 2]"}, 'send {"after": <seq>}'),
    ({"text_data": '"after"'}, 'send {"after": <seq>}'),
    ({"text_data": "{}"}, 'send {"after": <seq>}'),
    ({"text_data": '{"after": true}'}, "after is a whole number"),
    ({"text_data": '{"after": -1}'}, "after is a whole number"),
    ({"text_data": '{"after": 100000000000000000000000}'}, "after is a whole number"),
    ({"text_data": '{"after": 1.5}'}, "after is a whole number"),
    ({"text_data": '{"after": "0"}'}, "after is a JSON number"),
])
async def test_a_bad_frame_is_answered_with_an_error_and_the_feed_stays_open(release, frame, says):
    communicator = await _viewer_socket(release)

    await communicator.send_to(**frame)
    answer = await communicator.receive_json_from(timeout=5)

    assert answer["type"] == "error" and says in answer["error"], answer
    # still open: a good request afterwards replays the whole log
    await communicator.send_json_to({"after": 2400})
    seqs = []
    while (message := await communicator.receive_json_from(timeout=5))["type"] != "replayed":
        seqs += [line["seq"] for line in message["lines"]]
    assert seqs == list(range(2401, 2501))
    assert message == {"type": "replayed", "seq": 2500}
    await communicator.disconnect()


async def test_a_bad_after_names_the_field(release):
    communicator = await _viewer_socket(release)

    await communicator.send_json_to({"after": True})

    assert (await communicator.receive_json_from(timeout=5))["field"] == "after"
    await communicator.disconnect()


# -- the dashboard's feed: /ws/dashboard/ ------------------------------------------------


def dashboard(*headers):
    return WebsocketCommunicator(application, "/ws/dashboard/", headers=[(b"host", b"127.0.0.1:8000"), *headers])


async def _signed_in(communicator_for, user):
    from asgiref.sync import sync_to_async

    communicator = communicator_for(ORIGIN, await sync_to_async(session_cookie)(user))
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def test_the_dashboard_feed_refuses_a_stranger_and_another_origin():
    from asgiref.sync import sync_to_async

    stranger = dashboard(ORIGIN)
    assert not (await stranger.connect())[0]
    no_role = await sync_to_async(person)("nora")  # signed in, but holds no role
    assert not (await dashboard(ORIGIN, await sync_to_async(session_cookie)(no_role)).connect())[0]
    vic = await sync_to_async(person)("vic", "viewer")
    assert not (await dashboard((b"origin", b"http://evil.example"), await sync_to_async(session_cookie)(vic)).connect())[0]


async def test_the_dashboard_feed_brings_every_release_s_status_changes_but_no_log(release):
    from asgiref.sync import sync_to_async

    from releases import transitions

    communicator = await _signed_in(dashboard, await sync_to_async(person)("vic", "viewer"))
    step = await sync_to_async(release.steps.get)(key="launch")

    await sync_to_async(broadcast.log_lines)(release.pk, [{"seq": 2501, "text": "not for dashboards"}])
    assert await sync_to_async(transitions.step)(step.pk, "start", release_id=release.pk)

    # the log line went to the release's page only: the first thing here is the step's move
    assert await communicator.receive_json_from(timeout=5) == {"type": "step", "release": release.pk, "key": "launch", "status": "running"}
    await sync_to_async(broadcast.release_changed)(release.pk)
    assert await communicator.receive_json_from(timeout=5) == {"type": "release", "id": release.pk, "status": "cancelled"}
    await communicator.disconnect()


async def test_an_open_gate_is_announced_to_those_who_may_decide_it_only(release):
    """ravi may decide it; dana started the release (four eyes); vic only views;
    omar approves, but not in this environment's verify group."""
    from asgiref.sync import sync_to_async
    from django.contrib.auth.models import Group

    from releases import transitions

    def groups():
        managers = Group.objects.create(name="release-managers")
        release.environment.verify_groups.add(managers)
        ravi = person("ravi", "approver")
        ravi.groups.add(managers)
        release.requested_by.groups.add(managers)  # dana may decide gates here, but not her own release's
        return ravi, release.requested_by, person("vic", "viewer"), person("omar", "approver")

    ravi, dana, vic, omar = await sync_to_async(groups)()
    watching = {
        "ravi (dashboard)": await _signed_in(dashboard, ravi),
        "ravi (release page)": await _signed_in(lambda *h: connect(release.pk, *h), ravi),
        "dana": await _signed_in(dashboard, dana),
        "vic": await _signed_in(dashboard, vic),
        "omar": await _signed_in(dashboard, omar),
    }
    gate = await sync_to_async(release.steps.get)(key="verify_directly")

    assert await sync_to_async(transitions.step)(gate.pk, "open", release_id=release.pk)
    await sync_to_async(broadcast.release_changed)(release.pk)  # a marker: what comes before it, comes

    told = {}
    for who, communicator in watching.items():
        assert (await communicator.receive_json_from(timeout=5))["type"] == "gate"
        told[who] = []
        while (message := await communicator.receive_json_from(timeout=5))["type"] != "release":
            told[who].append(message)
        await communicator.disconnect()

    notice = {
        "type": "notify", "release": release.pk, "gate": "verify_directly",
        "title": f"Release #{release.pk} waits for you: verify_directly",
        "body": "prepan v2, started by dana", "url": f"/releases/{release.pk}/", "tag": f"gate-{release.pk}-verify_directly-0",
    }
    assert told == {"ravi (dashboard)": [notice], "ravi (release page)": [notice], "dana": [], "vic": [], "omar": []}


async def test_a_feed_left_open_keeps_its_place_in_the_group_past_the_layer_s_expiry(settings):
    """channels-redis forgets a group's member `group_expiry` after it joined; an open feed joins again."""
    from asgiref.sync import sync_to_async

    from releases import consumers

    layer = settings.CHANNEL_LAYERS["default"]
    settings.CHANNEL_LAYERS = {"default": {**layer, "CONFIG": {**layer["CONFIG"], "group_expiry": 2}}}
    with mock.patch.object(consumers, "REJOIN_SECONDS", 0.5):
        communicator = await _signed_in(dashboard, await sync_to_async(person)("vic", "viewer"))
        await communicator.receive_nothing(timeout=4)  # twice the expiry, quietly

        await sync_to_async(broadcast.send)(1, {"type": "release"}, dashboard={"type": "release", "id": 1, "status": "running"})
        assert await communicator.receive_json_from(timeout=5) == {"type": "release", "id": 1, "status": "running"}
        await communicator.disconnect()
