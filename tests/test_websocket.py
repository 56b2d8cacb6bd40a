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
