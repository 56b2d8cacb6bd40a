"""The audit trail tried as someone with the database's password would: every
change to a recorded event shows, and names the event."""

import importlib
import io
import subprocess
import sys
import threading
import time

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.db import DatabaseError, connection, connections, transaction

from releases import audit, chain
from releases.models import AuditEvent, Environment
from tests.helpers import ROOT, child_environ
from tests.release_helpers import api, person
from tests.test_api import environment  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db

TABLE = "releases_auditevent"


@pytest.fixture(autouse=True)
def no_remembered_status():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def events():
    """Five events, in order."""
    dana = person("dana", "deployer")
    return [audit.record(f"test.{n}", actor=dana, source_ip="10.0.0.7", target=f"thing {n}", n=n, nested={"b": [1, 2.5]})
            for n in range(1, 6)]


def verify_audit() -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_audit", stdout=out, stderr=err)
    except SystemExit as exit:
        return exit.code, err.getvalue()
    return 0, out.getvalue()


def as_superuser(*statements):
    """What someone with the database's owner password can do: switch the trigger off."""
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER releases_auditevent_append_only")
        for sql, params in statements:
            cursor.execute(sql, params)
        cursor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER releases_auditevent_append_only")


def test_an_untouched_chain_verifies(events):
    code, output = verify_audit()

    assert code == 0
    assert output.startswith("Chain verified: 5 events")


def test_an_empty_chain_verifies():
    assert verify_audit() == (0, "Chain verified: 0 events (last position 0, hash 0000000000000000)\n")


def test_an_event_edited_through_sql_is_named(events):
    as_superuser((f"UPDATE {TABLE} SET actor_name = 'someone-else' WHERE id = %s", [events[2].pk]))

    code, output = verify_audit()

    assert code == 1
    assert f"Chain broken at event #{events[2].pk}: edited" in output


def test_an_event_edited_with_its_hash_recomputed_without_the_key_is_named(events):
    forged = AuditEvent.objects.get(pk=events[1].pk)
    forged.details = {"n": 99}
    forged_hash = chain.mac(forged, secret=b"a guess at the key")
    as_superuser((f"UPDATE {TABLE} SET details = '{{\"n\": 99}}', hash = %s WHERE id = %s", [forged_hash, events[1].pk]))

    code, output = verify_audit()

    assert code == 1 and f"event #{events[1].pk}: edited" in output


def test_a_deleted_event_is_named_by_the_event_after_it(events):
    as_superuser((f"DELETE FROM {TABLE} WHERE id = %s", [events[2].pk]))

    code, output = verify_audit()

    assert code == 1
    assert f"Chain broken at event #{events[3].pk}: deleted (1 event before it missing, at position 3)" in output


def test_deleting_the_newest_events_shows(events):
    as_superuser((f"DELETE FROM {TABLE} WHERE id IN (%s, %s)", [events[3].pk, events[4].pk]))

    code, output = verify_audit()

    assert code == 1
    assert "deleted" in output and "the newest 2 event(s) are missing" in output


def test_an_event_inserted_in_the_middle_with_a_forged_hash_is_named(events):
    as_superuser(
        # make room at position 3, as an attacker must (the positions are unique)
        (f"UPDATE {TABLE} SET seq = seq + 1000 WHERE seq >= 3", []),
        (f"UPDATE {TABLE} SET seq = seq - 999 WHERE seq >= 1000", []),
        (f"INSERT INTO {TABLE} (at, actor_name, action, target, details, seq, prev_hash, hash) "
         "VALUES (now(), 'dana', 'gate.approve', 'release 1 swap_elb', '{}', 3, %s, %s)", [events[1].hash, "f" * 64]),
    )
    inserted = AuditEvent.objects.get(seq=3)

    code, output = verify_audit()

    assert code == 1
    assert f"Chain broken at event #{inserted.pk}: inserted" in output


def test_an_event_appended_with_a_forged_hash_is_named(events):
    as_superuser((f"INSERT INTO {TABLE} (at, actor_name, action, target, details, seq, prev_hash, hash) "
                  "VALUES (now(), 'dana', 'gate.approve', 'release 1 swap_elb', '{}', 6, %s, %s)", [events[4].hash, "f" * 64]))
    inserted = AuditEvent.objects.get(seq=6)

    code, output = verify_audit()

    assert code == 1 and f"Chain broken at event #{inserted.pk}: inserted" in output


def test_two_swapped_events_are_named_reordered(events):
    third, fourth = events[2], events[3]
    as_superuser(
        (f"UPDATE {TABLE} SET seq = 1000 WHERE id = %s", [third.pk]),
        (f"UPDATE {TABLE} SET seq = 3 WHERE id = %s", [fourth.pk]),
        (f"UPDATE {TABLE} SET seq = 4 WHERE id = %s", [third.pk]),
    )

    code, output = verify_audit()

    assert code == 1
    assert f"Chain broken at event #{fourth.pk}: reordered (it was written at position 4, found at 3)" in output


def test_a_chain_hashed_with_another_key_does_not_verify(events, settings):
    settings.AUDIT_KEY = "not the key the chain was written with"

    code, output = verify_audit()

    assert code == 1 and f"event #{events[0].pk}: edited" in output


@pytest.mark.parametrize("change", [
    lambda pk: AuditEvent.objects.filter(pk=pk).update(target="nothing to see"),
    lambda pk: AuditEvent.objects.filter(pk=pk).delete(),
    lambda pk: AuditEvent.objects.get(pk=pk).save(),
    lambda pk: connection.cursor().execute(f"UPDATE {TABLE} SET target = 'x' WHERE id = %s", [pk]),
    lambda pk: connection.cursor().execute(f"DELETE FROM {TABLE} WHERE id = %s", [pk]),
], ids=["orm-update", "orm-delete", "orm-save", "sql-update", "sql-delete"])
def test_the_database_refuses_to_change_or_delete_an_event(events, change):
    with pytest.raises(DatabaseError, match="audit events are append-only"), transaction.atomic():
        change(events[0].pk)

    assert AuditEvent.objects.get(pk=events[0].pk).target == "thing 1"
    assert verify_audit()[0] == 0


def test_deleting_an_environment_or_a_person_keeps_their_events_as_recorded(environment, admin_client, admin_user):  # noqa: F811
    someone = person("someone", "deployer")
    event = audit.record("environment.update", actor=someone, environment=environment, target="prepan")
    ids = (environment.pk, someone.pk, "someone")

    Environment.objects.filter(pk=environment.pk).delete()
    someone.delete()

    kept = AuditEvent.objects.get(pk=event.pk)
    assert (kept.environment_id, kept.actor_id, kept.actor_name) == ids
    assert verify_audit()[0] == 0
    assert admin_client.get(f"/admin/releases/auditevent/{event.pk}/change/").status_code == 200
    assert admin_client.get("/audit/").status_code == 200
    assert api(admin_user).get("/api/audit/").json()["events"][0]["environment"] is None


@pytest.mark.django_db(transaction=True)
def test_two_threads_recording_at_once_make_one_chain():
    start = threading.Barrier(4)
    errors = []

    def record_many(name):
        try:
            start.wait()
            for n in range(15):
                with transaction.atomic():
                    audit.record("test.concurrent", target=f"{name} {n}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=record_many, args=(f"worker-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert list(AuditEvent.objects.order_by("seq").values_list("seq", flat=True)) == list(range(1, 61))
    assert verify_audit() == (0, f"Chain verified: 60 events (last position 60, hash {AuditEvent.objects.get(seq=60).hash[:16]})\n")


RECORD_AT = """
import os, time
from django.db import transaction
from releases import audit
time.sleep(max(0, float(os.environ["START_AT"]) - time.time()))
for n in range(25):
    with transaction.atomic():
        audit.record("test.process", target=f"{os.getpid()} {n}")
"""


@pytest.mark.django_db(transaction=True)
def test_two_processes_recording_at_once_make_one_chain(settings):
    db = settings.DATABASES["default"]
    env = {**child_environ(), "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
           "SECRET_KEY": settings.SECRET_KEY, "START_AT": str(time.time() + 4)}
    processes = [subprocess.Popen([sys.executable, "manage.py", "shell", "-v0", "-c", RECORD_AT], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]

    outputs = [process.communicate(timeout=60)[0].decode() for process in processes]

    assert [process.returncode for process in processes] == [0, 0], outputs
    assert AuditEvent.objects.count() == 50
    assert verify_audit()[1].startswith("Chain verified: 50 events")


def test_the_audit_page_says_the_chain_verifies_and_where_it_broke(client, events):
    client.force_login(person("vic", "viewer"))

    assert "Chain verified: 5 events" in client.get("/audit/").content.decode()

    as_superuser((f"UPDATE {TABLE} SET target = 'x' WHERE id = %s", [events[3].pk]))
    cache.clear()  # as a page view after the next full walk would see it

    assert f"Chain broken at event #{events[3].pk}: edited" in client.get("/audit/").content.decode()


def test_the_audit_page_verifies_only_new_events_between_full_walks(client, events, django_assert_max_num_queries):
    client.force_login(person("vic", "viewer"))
    client.get("/audit/")
    audit.record("test.6")

    verdict = audit.chain_status()

    assert str(verdict) == "Chain verified: 6 events"
    with django_assert_max_num_queries(4):  # the known position, the new events, the head
        audit.chain_status()


def test_the_api_says_whether_the_chain_verifies(events):
    body = api(person("vic", "viewer")).get("/api/audit/").json()

    assert body["chain"] == {"verified": True, "events": 5, "summary": "Chain verified: 5 events", "broken_at": None, "problem": None}
    assert body["events"][0]["seq"] == 5 and body["events"][0]["hash"] == events[4].hash


def test_events_written_before_the_chain_are_chained_by_the_migration_in_id_order():
    from django.apps import apps

    migration = importlib.import_module("releases.migrations.0005_audit_chain")
    as_superuser(*[
        (f"INSERT INTO {TABLE} (at, actor_name, source_ip, action, target, details, seq, prev_hash, hash) "
         "VALUES (now(), 'dana', %s, %s, '', '{\"b\": 1, \"a\": [1.0, 2]}', %s, '', '')", ["::ffff:10.0.0.1", f"old.{n}", 1000 + n])
        for n in (3, 1, 2)
    ])
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER releases_auditevent_append_only")
        migration.chain_existing(apps, None)
        cursor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER releases_auditevent_append_only")
    audit.record("new.event")

    assert list(AuditEvent.objects.order_by("seq").values_list("action", flat=True)) == ["old.3", "old.1", "old.2", "new.event"]
    assert verify_audit()[1].startswith("Chain verified: 4 events")


def test_the_admin_offers_no_way_to_delete_an_event(admin_client, events):
    response = admin_client.post(f"/admin/releases/auditevent/{events[0].pk}/delete/", {"post": "yes"})

    assert response.status_code == 403
    assert AuditEvent.objects.filter(pk=events[0].pk).exists()
