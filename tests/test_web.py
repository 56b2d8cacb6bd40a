"""The project's web surface: health, sign-in, roles, static files."""

import pytest
from django.contrib.auth.models import Group, User
from django.urls import reverse

from tests.helpers import free_port

pytestmark = pytest.mark.django_db


def test_healthz_is_ok_when_the_database_and_redis_answer(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_healthz_names_redis_when_it_is_down(client, settings):
    settings.REDIS_URL = f"redis://:s3cret-password@127.0.0.1:{free_port()}/0"

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert list(body["down"]) == ["redis"]
    assert "s3cret-password" not in response.content.decode()


def test_the_dashboard_sends_strangers_to_sign_in(client):
    response = client.get(reverse("dashboard"))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_a_person_signs_in_and_sees_the_dashboard(client):
    User.objects.create_user("dana", password="a-long-passphrase").groups.add(Group.objects.get(name="viewer"))

    response = client.post(reverse("login"), {"username": "dana", "password": "a-long-passphrase"}, follow=True)

    assert response.status_code == 200
    assert b"Dashboard" in response.content
    assert b"dana" in response.content


def test_a_wrong_password_is_refused_with_a_message(client):
    User.objects.create_user("dana", password="a-long-passphrase")

    response = client.post(reverse("login"), {"username": "dana", "password": "nope"})

    assert response.status_code == 200
    assert b"Please enter a correct username and password" in response.content
    assert "_auth_user_id" not in client.session


def test_signing_out_ends_the_session(client):
    user = User.objects.create_user("dana", password="a-long-passphrase")
    client.force_login(user)

    client.post(reverse("logout"))

    assert client.get(reverse("dashboard")).status_code == 302


def test_the_four_roles_exist_as_groups():
    assert set(Group.objects.values_list("name", flat=True)) >= {"viewer", "deployer", "approver", "maintainer"}


def test_the_admin_is_there_for_staff(admin_client):
    assert admin_client.get("/admin/").status_code == 200


def test_static_files_are_served_without_debug(client, settings):
    assert settings.DEBUG is False

    response = client.get("/static/css/greenlight.css")

    assert response.status_code == 200
    assert b"--accent" in b"".join(response.streaming_content)
