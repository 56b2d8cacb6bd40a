"""Cinnamon-sized recipes: named parameters, and tasks of command templates.

A recipe is plain data (it is stored as JSON on the Recipe model)::

    {
      "params": {"deploy_to": "srv/prepan", "branch": "main"},
      "roles": {"canary": {"branch": "release"}},
      "tasks": {
        "deploy:update": {"run": "remote", "commands": ["git -C {deploy_to} checkout {revision}"]},
        "provision:prepare": {"run": "local", "commands": ["knife solo prepare {ssh_user}@{host} -i {ssh_key_file}"],
                              "timeout": 1800}
      },
      "phases": {"provision": ["provision:prepare"], "deploy": ["deploy:update"]}
    }

A role names the hosts a step targets (`canary`, `new`, `old`) and may set
its own parameter values, like a Cinnamon role. A *remote* task runs over
SSH on every host of the role; a *local* task runs on the worker once per
host. A task may set `timeout`, the seconds each of its commands may take
(a whole number from 1 to 86400: a cookbook run may need far longer than a
`git checkout`); without one, the environment's command timeout applies.
A local task that drives a tool over SSH (`knife solo cook`, `scp`, `rsync`)
gets `{ssh_config}`, an ssh_config for its host with the bastion as ProxyJump,
and `{known_hosts}` with the host's pinned key, so the tool never trusts a key
it has not been given: `ssh -F {ssh_config} {host} ...`.
A local task gets no AWS credentials unless it declares `"aws": true`; then
it gets the environment's own (never the worker's), for a tool that calls
AWS itself.
Templates may use only the recipe's declared parameters and the built-ins
below, and every value is shell-quoted when it is filled in, so a parameter
can never add a command.
"""

from __future__ import annotations

import shlex
import string
from dataclasses import dataclass

# Filled in by whoever runs the recipe, for each host.
BUILTIN_PARAMS = frozenset(
    {
        "host",  # the address the worker reaches the host at
        "instance_id",
        "name",  # the instance's Name tag
        "ssh_user",
        "ssh_port",
        "ssh_key_file",  # for a local task: a copy its user may read, while the phase runs
        "ssh_config",  # local tasks only: an ssh_config for this host (bastion included): ssh -F {ssh_config} {host}
        "known_hosts",  # local tasks only: the host's pinned key, for a tool that takes a known_hosts file
        "revision",
        "repository",
        "app_port",
        "environment",
    }
)
LOCAL_ONLY_PARAMS = frozenset({"ssh_config", "known_hosts"})  # files on the worker: nothing on the host has them
RUN_KINDS = ("remote", "local")
TASK_KEYS = frozenset({"run", "commands", "timeout", "aws"})
MAX_TIMEOUT = 86400  # a day: longer is a command that hangs, not one that works


class RecipeError(ValueError):
    """The recipe is malformed; the message says where."""


@dataclass(frozen=True)
class Command:
    task: str
    run: str  # "remote" or "local"
    text: str  # the rendered, quoted shell command
    timeout: int | None = None  # seconds; None: the environment's command timeout
    aws: bool = False  # a local task that gets the environment's AWS credentials


def template_fields(template: str) -> list[str]:
    """The parameter names a template uses; rejects anything but `{name}`."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RecipeError(f"bad braces in {template!r}: {exc} (write {{{{ for a literal brace)")
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise RecipeError(
                f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                f"in {template!r}: only plain {{name}} parameters are allowed"
            )
        fields.append(field)
    return fields


def valid_timeout(value: object) -> bool:
    # bool is an int to Python, and JSON's 1.5 or "60" would hide a typo
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_TIMEOUT


def validate(recipe: object) -> dict:
    """Return the recipe if it is well formed, else raise RecipeError."""
    if not isinstance(recipe, dict):
        raise RecipeError("a recipe is an object with params, tasks and phases")
    unknown = set(recipe) - {"params", "roles", "tasks", "phases"}
    if unknown:
        raise RecipeError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
    params = recipe.get("params", {})
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, (str, int)) for k, v in params.items()
    ):
        raise RecipeError("params maps parameter names to strings or numbers")
    if clash := set(params) & BUILTIN_PARAMS:
        raise RecipeError(f"params may not redefine built-ins: {', '.join(sorted(clash))}")
    roles = recipe.get("roles", {})
    if not isinstance(roles, dict) or not all(
        isinstance(r, str) and isinstance(v, dict)
        and all(isinstance(k, str) and k.isidentifier() and isinstance(x, (str, int)) for k, x in v.items())
        for r, v in roles.items()
    ):
        raise RecipeError("roles maps a role name to its parameter values")
    for role, values in roles.items():
        if clash := set(values) & BUILTIN_PARAMS:
            raise RecipeError(f"role {role} may not redefine built-ins: {', '.join(sorted(clash))}")
    known = set(params) | BUILTIN_PARAMS | {k for values in roles.values() for k in values}
    tasks = recipe.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise RecipeError("tasks maps task names to {run, commands}")
    for name, task in tasks.items():
        if not isinstance(task, dict):
            raise RecipeError(f"task {name}: expected {{run, commands, timeout, aws}}")
        if unknown := set(task) - TASK_KEYS:
            raise RecipeError(f"task {name}: unknown keys {', '.join(sorted(unknown))} (a task has run, commands, timeout, aws)")
        if task.get("run", "remote") not in RUN_KINDS:
            raise RecipeError(f"task {name}: run must be remote or local")
        if "timeout" in task and not valid_timeout(task["timeout"]):
            raise RecipeError(f"task {name}: timeout is a whole number of seconds from 1 to {MAX_TIMEOUT}")
        if "aws" in task and not isinstance(task["aws"], bool):
            raise RecipeError(f"task {name}: aws is true or false")
        if task.get("aws") and task.get("run", "remote") != "local":
            raise RecipeError(f"task {name}: aws is for local tasks (a remote task runs on the instance, with its own role)")
        commands = task.get("commands")
        if not isinstance(commands, list) or not commands or not all(isinstance(c, str) and c.strip() for c in commands):
            raise RecipeError(f"task {name}: commands is a non-empty list of strings")
        for command in commands:
            try:
                fields = template_fields(command)
            except RecipeError as exc:
                raise RecipeError(f"task {name}: {exc}") from None
            if undeclared := sorted(set(fields) - known):
                raise RecipeError(f"task {name}: undeclared parameter {', '.join(undeclared)}")
            if task.get("run", "remote") == "remote" and (local_only := sorted(set(fields) & LOCAL_ONLY_PARAMS)):
                raise RecipeError(f"task {name}: {', '.join(local_only)} is for local tasks (a file on the worker, "
                                  "not on the host)")
    phases = recipe.get("phases", {})
    if not isinstance(phases, dict):
        raise RecipeError("phases maps a phase (provision, deploy) to a list of task names")
    for phase, names in phases.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RecipeError(f"phase {phase}: a list of task names")
        if missing := [n for n in names if n not in tasks]:
            raise RecipeError(f"phase {phase}: unknown task {', '.join(missing)}")
    return recipe


SSH_FILE_PARAMS = frozenset({"ssh_key_file", "ssh_config", "known_hosts"})


def local_ssh_params(recipe: dict, phase: str) -> set[str]:
    """The SSH files the phase's local tasks refer to: the worker makes them for those tasks only."""
    return {field for name in recipe.get("phases", {}).get(phase, []) if recipe["tasks"][name].get("run") == "local"
            for command in recipe["tasks"][name]["commands"] for field in template_fields(command)} & SSH_FILE_PARAMS


def render(recipe: dict, phase: str, values: dict, role: str = "") -> list[Command]:
    """The commands of one phase for one host of `role`, every value shell-quoted."""
    params = {**recipe.get("params", {}), **recipe.get("roles", {}).get(role, {}), **values}
    quoted = {key: shlex.quote(str(value)) for key, value in params.items()}
    commands = []
    for task_name in recipe.get("phases", {}).get(phase, []):
        task = recipe["tasks"][task_name]
        for template in task["commands"]:
            missing = [f for f in template_fields(template) if f not in quoted]
            if missing:
                raise RecipeError(f"task {task_name}: no value for {', '.join(missing)}")
            commands.append(Command(task_name, task.get("run", "remote"), template.format(**quoted), task.get("timeout"),
                                    task.get("aws", False)))
    return commands
