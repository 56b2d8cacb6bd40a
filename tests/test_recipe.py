"""Recipes: validation with clear errors, and values that cannot add commands."""

import pytest

from deployer.recipe import RecipeError, render, validate
from deployer.sandbox.demo_recipe import RECIPE


def recipe_with(*commands, params=None):
    return {
        "params": params or {"deploy_to": "/srv/app"},
        "tasks": {"deploy:update": {"run": "remote", "commands": list(commands)}},
        "phases": {"deploy": ["deploy:update"]},
    }


def test_the_demo_recipe_is_valid():
    assert validate(RECIPE) is RECIPE


def test_every_value_is_shell_quoted():
    recipe = validate(recipe_with("git checkout {revision}"))

    [command] = render(recipe, "deploy", {"revision": "v2; touch pwned"})

    assert command.text == "git checkout 'v2; touch pwned'"


def test_it_names_an_undeclared_parameter():
    with pytest.raises(RecipeError, match="deploy:update: undeclared parameter brnach"):
        validate(recipe_with("git checkout {brnach}"))


@pytest.mark.parametrize("template", ["echo {deploy_to.__class__}", "echo {deploy_to!r}", "echo {deploy_to:>9}", "echo {0}"])
def test_it_allows_only_plain_parameters(template):
    with pytest.raises(RecipeError, match="only plain"):
        validate(recipe_with(template))


def test_it_explains_a_stray_brace():
    with pytest.raises(RecipeError, match="write {{ for a literal brace"):
        validate(recipe_with("awk '{print $1'"))


def test_a_phase_must_name_existing_tasks():
    recipe = recipe_with("true")
    recipe["phases"]["deploy"].append("web:strat")
    with pytest.raises(RecipeError, match="phase deploy: unknown task web:strat"):
        validate(recipe)


def test_params_cannot_shadow_built_ins():
    with pytest.raises(RecipeError, match="redefine built-ins: revision"):
        validate(recipe_with("true", params={"revision": "main"}))


def test_a_remote_or_local_kind_is_required():
    recipe = recipe_with("true")
    recipe["tasks"]["deploy:update"]["run"] = "elsewhere"
    with pytest.raises(RecipeError, match="run must be remote or local"):
        validate(recipe)


def test_a_role_sets_its_own_parameter_values():
    recipe = recipe_with("git checkout {branch} in {deploy_to}", params={"deploy_to": "/srv/app", "branch": "main"})
    recipe["roles"] = {"canary": {"branch": "release candidate"}}
    validate(recipe)

    [canary] = render(recipe, "deploy", {}, role="canary")
    [other] = render(recipe, "deploy", {}, role="new")

    assert canary.text == "git checkout 'release candidate' in /srv/app"
    assert other.text == "git checkout main in /srv/app"


def test_a_parameter_known_only_to_a_role_has_no_value_elsewhere():
    recipe = validate({**recipe_with("echo {color}"), "roles": {"canary": {"color": "green"}}})

    assert render(recipe, "deploy", {}, role="canary")[0].text == "echo green"
    with pytest.raises(RecipeError, match="no value for color"):
        render(recipe, "deploy", {}, role="old")


def test_a_task_s_timeout_reaches_its_commands():
    recipe = recipe_with("knife solo cook {deploy_to}", "true")
    recipe["tasks"]["deploy:update"]["timeout"] = 1800

    commands = render(validate(recipe), "deploy", {})

    assert [c.timeout for c in commands] == [1800, 1800]


def test_a_task_without_a_timeout_leaves_it_to_the_environment():
    [command] = render(validate(recipe_with("true")), "deploy", {})

    assert command.timeout is None


@pytest.mark.parametrize("timeout", [0, -5, 86401, 1.5, "60", True, None])
def test_a_timeout_is_a_whole_number_of_seconds_up_to_a_day(timeout):
    recipe = recipe_with("true")
    recipe["tasks"]["deploy:update"]["timeout"] = timeout

    with pytest.raises(RecipeError, match="deploy:update: timeout is a whole number of seconds from 1 to 86400"):
        validate(recipe)


def test_a_day_is_the_longest_timeout():
    recipe = recipe_with("true")
    recipe["tasks"]["deploy:update"]["timeout"] = 86400

    assert validate(recipe) is recipe


def test_it_names_an_unknown_task_key():
    recipe = recipe_with("true")
    recipe["tasks"]["deploy:update"]["timout"] = 60

    with pytest.raises(RecipeError, match=r"deploy:update: unknown keys timout \(a task has run, commands, timeout, aws\)"):
        validate(recipe)


def test_a_local_task_that_declares_aws_says_so_on_its_commands():
    recipe = recipe_with("aws s3 ls", "true")
    recipe["tasks"]["deploy:update"].update(run="local", aws=True)

    commands = render(validate(recipe), "deploy", {})

    assert [c.aws for c in commands] == [True, True]


def test_a_task_that_declares_nothing_gets_no_aws():
    [command] = render(validate(recipe_with("true")), "deploy", {})

    assert command.aws is False


@pytest.mark.parametrize("value", ["true", 1, None, "yes"])
def test_aws_is_true_or_false(value):
    recipe = recipe_with("true")
    recipe["tasks"]["deploy:update"].update(run="local", aws=value)

    with pytest.raises(RecipeError, match="deploy:update: aws is true or false"):
        validate(recipe)


def test_a_remote_task_cannot_declare_aws():
    recipe = recipe_with("true")
    recipe["tasks"]["deploy:update"]["aws"] = True

    with pytest.raises(RecipeError, match=r"deploy:update: aws is for local tasks \(a remote task runs on the instance"):
        validate(recipe)
