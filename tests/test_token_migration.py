"""Upgrading to hashed tokens: every DRF token (key in clear) becomes an ApiToken
(the key's digest), keeps working, and DRF's table is gone."""

import hashlib
import importlib
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from releases.models import ApiToken
from tests.helpers import ROOT, child_environ
from tests.release_helpers import person
from tests.test_security_web import api_with

pytestmark = pytest.mark.django_db

KEY = "9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b"  # DRF's format: 40 hex
migration = importlib.import_module("releases.migrations.0007_api_token")


def run_migration():
    apps = MigrationExecutor(connection).loader.project_state(("releases", "0007_api_token")).apps
    with connection.schema_editor() as editor:
        migration.copy_drf_tokens(apps, editor)


def tables() -> list[str]:
    with connection.cursor() as cursor:
        return connection.introspection.table_names(cursor)


def test_an_old_drf_token_is_kept_as_its_digest_and_still_authenticates():
    dana = person("dana", "viewer")
    created = datetime(2026, 3, 1, 9, 30, tzinfo=timezone.utc)
    with connection.cursor() as cursor:
        # DRF's table, as rest_framework.authtoken's migrations made it on PostgreSQL
        cursor.execute('CREATE TABLE "authtoken_token" ("key" varchar(40) NOT NULL PRIMARY KEY, '
                       '"created" timestamp with time zone NOT NULL, '
                       '"user_id" integer NOT NULL UNIQUE REFERENCES "auth_user" ("id") DEFERRABLE INITIALLY DEFERRED)')
        cursor.execute('INSERT INTO "authtoken_token" VALUES (%s, %s, %s)', [KEY, created, dana.pk])
        cursor.execute("INSERT INTO django_migrations (app, name, applied) VALUES ('authtoken', '0001_initial', now())")
        # the test's transaction holds the row's deferred foreign-key check, which
        # PostgreSQL would not let the table be dropped under; an upgrade has none
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")

    run_migration()

    token = ApiToken.objects.get(user=dana)
    assert (token.prefix, token.digest, token.created) == (KEY[:6], hashlib.sha256(KEY.encode()).hexdigest(), created)
    assert "authtoken_token" not in tables()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_migrations WHERE app = 'authtoken'")
        assert cursor.fetchone() == (0,)
        cursor.execute("SELECT * FROM releases_apitoken")
        assert not any(KEY in str(value) for row in cursor.fetchall() for value in row)
    response = api_with(KEY).get("/api/environments/")
    assert response.status_code == 200
    assert api_with(KEY[:-1] + "0").get("/api/environments/").status_code == 401


def test_a_database_migrated_from_scratch_has_no_old_table_and_nothing_to_copy():
    person("dana", "viewer")

    run_migration()

    assert "authtoken_token" not in tables()
    assert not ApiToken.objects.exists()


def test_an_old_sqlite_database_upgrades_with_its_tokens(tmp_path):
    """The demo's default database, upgraded for real: built with DRF's app, a
    token made by `drf_create_token`, then `migrate` with today's settings."""
    database = tmp_path / "old.sqlite3"
    env = {**child_environ(), "DATABASE_URL": f"sqlite:///{database}", "GREENLIGHT_VAR_DIR": str(tmp_path),
           "SECRET_KEY": "a-test-key-for-an-old-database-0123456789abcdef"}

    def manage(*args, settings="deployer.settings"):
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": settings},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    old = "tests.settings_with_authtoken"
    manage("migrate", "releases", "0006", settings=old)
    manage("migrate", "authtoken", settings=old)
    manage("grant", "dana", "viewer", settings=old)
    key = manage("drf_create_token", "dana", settings=old).split()[2]  # "Generated token KEY for user dana"

    assert key.encode() in database.read_bytes()

    manage("migrate")
    found = manage("shell", "-c", f"from releases import tokens; t = tokens.token_authenticate({key!r}); print(t.user.username, t.prefix)")

    assert found.splitlines()[-1].split() == ["dana", key[:6]]
    # not in the table, nor left in the file's free pages
    assert key.encode() not in database.read_bytes()
