"""The demo recipe, in Cinnamon's shape: parameters and named tasks.

The provision tasks stand in for chef-solo: they turn a bare instance into an
app server (directories, and a boot script that brings services back on
start the way daemontools would) without deploying the app. Paths are
relative because a sandbox instance's commands run in its own directory.
`cookbook_recipe` is the same recipe provisioned from the worker's side.
"""

from pathlib import Path

# One service: a run script under etc/service/<name>/, started detached, its
# pid kept so the next start replaces it. The boot script starts them all.
_START = (
    "mkdir -p var/run var/log && "
    "if [ -f var/run/{service}.pid ]; then kill $(cat var/run/{service}.pid) 2>/dev/null; fi; "
    "setsid sh etc/service/{service}/run >> var/log/{service}.log 2>&1 < /dev/null & "
    "echo $! > var/run/{service}.pid"
)
_RC_LOCAL = (
    "printf '%s\\n' '#!/bin/sh' 'mkdir -p var/run var/log' "
    "'for run in etc/service/*/run; do [ -f \"$run\" ] || continue; "
    "name=$(basename $(dirname \"$run\")); "
    "setsid sh \"$run\" >> var/log/$name.log 2>&1 < /dev/null & echo $! > var/run/$name.pid; done' "
    "> etc/rc.local"
)


def _literal(text: str) -> str:
    """Escape a shell snippet's braces so only {parameters} are filled in."""
    return text.replace("{", "{{").replace("}", "}}")


RECIPE = {
    "params": {"deploy_to": "srv/prepan"},
    "tasks": {
        "provision:prepare": {
            "run": "remote",
            "commands": ["mkdir -p etc/service var/run var/log", "command -v git python3"],
        },
        "provision:cook": {"run": "remote", "commands": [_literal(_RC_LOCAL)]},
        "deploy:setup:dir": {"run": "remote", "commands": ["mkdir -p {deploy_to}/shared"]},
        "deploy:config": {
            "run": "remote",
            "commands": [
                "printf 'port=%s\\nenvironment=%s\\ndb=%s/shared/app.db\\n' "
                "{app_port} {environment} {deploy_to} > {deploy_to}/shared/app.conf"
            ],
        },
        "deploy:update": {
            "run": "remote",
            "commands": [
                "test -d {deploy_to}/repo/.git || git clone --quiet --no-checkout {repository} {deploy_to}/repo",
                "git -C {deploy_to}/repo fetch --quiet --force --tags --update-head-ok origin "
                "'+refs/heads/*:refs/heads/*'",
                "git -C {deploy_to}/repo checkout --quiet --force --detach {revision}",
                "git -C {deploy_to}/repo log -1 --format='deployed %h %s'",
                "printf '%s\\n' {revision} > {deploy_to}/shared/REVISION",
            ],
        },
        "deploy:setup:db": {
            "run": "remote",
            "commands": ["python3 {deploy_to}/repo/app.py --config {deploy_to}/shared/app.conf --setup-db"],
        },
        "web:start": {
            "run": "remote",
            "commands": [
                "mkdir -p etc/service/web",
                "printf 'exec python3 %s/repo/app.py --config %s/shared/app.conf\\n' "
                "{deploy_to} {deploy_to} > etc/service/web/run",
                _literal(_START.format(service="web")),
                "python3 {deploy_to}/repo/app.py --config {deploy_to}/shared/app.conf --wait-ready",
            ],
        },
        "worker:start": {
            "run": "remote",
            "commands": [
                "mkdir -p etc/service/worker",
                "printf 'exec python3 %s/repo/worker.py %s/shared/worker.heartbeat\\n' "
                "{deploy_to} {deploy_to} > etc/service/worker/run",
                _literal(_START.format(service="worker")),
            ],
        },
    },
    "phases": {
        "provision": ["provision:prepare", "provision:cook"],
        "deploy": [
            "deploy:setup:dir",
            "deploy:config",
            "deploy:update",
            "deploy:setup:db",
            "web:start",
            "worker:start",
        ],
    },
}


# The same app server, provisioned from the operator's side the way
# `knife solo prepare` and `knife solo cook` do: local tasks on the worker
# copy a cookbook directory to the instance over SSH and run it there. They
# reach the instance with the generated {ssh_config} (its pinned key, the
# bastion if there is one), never trusting a key they were not given.
COOKBOOK = Path(__file__).resolve().parent / "demo_cookbook"


def cookbook_recipe(cookbook: Path = COOKBOOK) -> dict:
    return {
        **RECIPE,
        "params": {**RECIPE["params"], "cookbook": str(cookbook)},
        "tasks": {
            **{name: task for name, task in RECIPE["tasks"].items() if not name.startswith("provision:")},
            "provision:prepare": {
                "run": "local",
                "commands": ["ssh -F {ssh_config} {host} 'mkdir -p cookbook && command -v tar sh'"],
            },
            "provision:cook": {
                "run": "local",
                "timeout": 600,
                "commands": [
                    "tar -C {cookbook} -cf - . | ssh -F {ssh_config} {host} 'rm -rf cookbook && mkdir cookbook && tar -C cookbook -xf -'",
                    "ssh -F {ssh_config} {host} 'sh cookbook/cook.sh'",
                ],
            },
        },
    }
