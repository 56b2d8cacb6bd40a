"""Settings come from the environment, with defaults that work on a laptop."""

import json
import os
import stat
import subprocess
import sys

from tests.helpers import ROOT

PRINT_SETTINGS = """
import json, django
from django.conf import settings
django.setup()
print(json.dumps({
    "engine": settings.DATABASES["default"]["ENGINE"],
    "name": str(settings.DATABASES["default"]["NAME"]),
    "debug": settings.DEBUG,
    "redis": settings.REDIS_URL,
    "broker": settings.CELERY_BROKER_URL,
    "hosts": settings.ALLOWED_HOSTS,
    "secret": settings.SECRET_KEY,
}))
"""


def settings_with(env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SECRET_KEY", "DEBUG", "REDIS_URL", "ALLOWED_HOSTS")}
    output = subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "deployer.settings", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output)


def test_the_defaults_need_nothing_configured(tmp_path):
    settings = settings_with({"GREENLIGHT_VAR_DIR": str(tmp_path)})

    assert settings["engine"] == "django.db.backends.sqlite3"
    assert settings["name"] == str(tmp_path / "greenlight.sqlite3")
    assert settings["debug"] is False
    assert settings["redis"] == "redis://127.0.0.1:6379/0"
    assert settings["broker"] == settings["redis"]
    assert settings["hosts"] == ["127.0.0.1", "localhost"]


def test_a_secret_key_is_generated_once_kept_private_and_reused(tmp_path):
    first = settings_with({"GREENLIGHT_VAR_DIR": str(tmp_path)})["secret"]
    second = settings_with({"GREENLIGHT_VAR_DIR": str(tmp_path)})["secret"]

    assert len(first) >= 50
    assert first == second
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600


def test_a_new_var_directory_is_the_worker_s_own(tmp_path):
    settings_with({"GREENLIGHT_VAR_DIR": str(tmp_path / "var")})

    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "var").iterdir()] == ["secret_key"], "no draft left behind"


def test_a_secret_key_file_others_could_read_is_made_private(tmp_path):
    (tmp_path / "secret_key").write_text("an-old-key-from-before-" + "x" * 40)
    (tmp_path / "secret_key").chmod(0o644)

    settings = settings_with({"GREENLIGHT_VAR_DIR": str(tmp_path)})

    assert settings["secret"] == "an-old-key-from-before-" + "x" * 40
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600


def test_the_environment_overrides_the_defaults(tmp_path):
    settings = settings_with(
        {
            "GREENLIGHT_VAR_DIR": str(tmp_path),
            "DATABASE_URL": "postgres://u@db.internal:5432/greenlight",
            "REDIS_URL": "redis://cache.internal:6379/2",
            "SECRET_KEY": "from-the-environment",
            "DEBUG": "true",
            "ALLOWED_HOSTS": "greenlight.example.com,10.0.0.5",
        }
    )

    assert settings["engine"] == "django.db.backends.postgresql"
    assert settings["name"] == "greenlight"
    assert settings["redis"] == "redis://cache.internal:6379/2"
    assert settings["secret"] == "from-the-environment"
    assert settings["debug"] is True
    assert settings["hosts"] == ["greenlight.example.com", "10.0.0.5"]
    assert not (tmp_path / "secret_key").exists()
