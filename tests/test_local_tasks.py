"""A recipe's local tasks inside a release on the sandbox: who they run as, and what AWS credentials they get."""

import hashlib
import os
import sys

import pytest

from deployer.errors import AdapterError
from releases import engine, plan, services, steps
from releases.logs import REDACTED
from releases.models import Instance, LogLine, Release
from tests.release_helpers import person

pytestmark = [pytest.mark.sandbox, pytest.mark.django_db(transaction=True)]

# The environment's own keys, read by its credentials reference "env:GLTASK" on the worker.
OWN = {"GLTASK_ACCESS_KEY_ID": "AKIDGLTASKOWN0000001", "GLTASK_SECRET_ACCESS_KEY": "gl-task-own-secret-0123456789",
       "GLTASK_SESSION_TOKEN": "gl-task-own-session-token-0123456789"}
# The worker's own credential chain: never a task's.
WORKER = {"AWS_ACCESS_KEY_ID": "AKIDWORKER0000000001", "AWS_SECRET_ACCESS_KEY": "worker-own-secret-0123456789",
          "AWS_SESSION_TOKEN": "worker-own-session-token-0123456789",
          "AWS_DEFAULT_REGION": "eu-north-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:1/"}

# Prints the names of the AWS_ variables it got, a hash of each value, the
# secret itself (which the log must redact), and calls the endpoint with them.
# Braces are doubled: a recipe's command is a template.
REPORT = """
import hashlib, os, boto3
names = sorted(n for n in os.environ if n.startswith("AWS_"))
print("names=" + ",".join(names))
for name in names:
    print("sha256 " + name + " " + hashlib.sha256(os.environ[name].encode()).hexdigest())
if "AWS_SECRET_ACCESS_KEY" in os.environ:
    print("the secret is " + os.environ["AWS_SECRET_ACCESS_KEY"])
    groups = boto3.client("ec2").describe_security_groups(GroupIds=[os.environ["GROUP"]])["SecurityGroups"]
    print("found " + groups[0]["GroupId"])
"""


@pytest.fixture
def prepan(release_sandbox):
    return services.environment_import_sandbox(info=release_sandbox.info)


def run_deploy(environment, tasks: dict, *, credentials: str | None = None) -> list[LogLine]:
    """The deploy phase of a release made of `tasks`, run as the engine runs a step (its log redacts the
    environment's secrets); the lines it logged."""
    frozen = plan.freeze(environment, strategy="bake", revision="v2", fleet_size=1)
    if credentials is not None:
        frozen["environment"]["aws_credentials"] = credentials
    frozen["recipe"] = {"params": {"python": sys.executable, "group": environment.verify_security_group_id},
                        "tasks": tasks, "phases": {"deploy": list(tasks)}}
    # cancelled from the start, so no worker takes it up
    release = Release.objects.create(environment=environment, revision="v2", fleet_size=1, plan=frozen,
                                     requested_by=person("dana", "deployer"), status=Release.Status.CANCELLED)
    step = release.steps.create(position=0, key="deploy", kind="action")
    row = Instance.objects.create(release=release, instance_id="i-0local", name="app-9", role="canary", address="127.77.0.99")
    with engine.writer_for(release) as log:
        context = steps.Context(release=release, step=step, cloud=engine.release_cloud(release), log=log)
        steps.run_phase(context, "deploy", [row])
    return list(LogLine.objects.filter(release=release).order_by("seq"))


def report_task(**declared) -> dict:
    return {"run": "local", "commands": ["GROUP={group} {python} -c " + _quoted(REPORT)], **declared}


def _quoted(code: str) -> str:
    return "'" + code.replace("{", "{{").replace("}", "}}").replace("'", "'\\''") + "'"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def stdout(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines if line.stream == "stdout"]


def test_a_task_that_declares_aws_gets_exactly_the_environment_s_own_credentials(prepan, monkeypatch):
    for name, value in {**OWN, **WORKER}.items():
        monkeypatch.setenv(name, value)

    lines = run_deploy(prepan, {"deploy:aws": report_task(aws=True)}, credentials="env:GLTASK")

    out = stdout(lines)
    assert out[0] == "names=AWS_ACCESS_KEY_ID,AWS_DEFAULT_REGION,AWS_ENDPOINT_URL,AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN"
    assert out[1:6] == [
        f"sha256 AWS_ACCESS_KEY_ID {sha(OWN['GLTASK_ACCESS_KEY_ID'])}",
        f"sha256 AWS_DEFAULT_REGION {sha(prepan.region)}",
        f"sha256 AWS_ENDPOINT_URL {sha(prepan.aws_endpoint_url)}",
        f"sha256 AWS_SECRET_ACCESS_KEY {sha(OWN['GLTASK_SECRET_ACCESS_KEY'])}",
        f"sha256 AWS_SESSION_TOKEN {sha(OWN['GLTASK_SESSION_TOKEN'])}",
    ]
    assert out[6] == f"the secret is {REDACTED}"
    assert out[7] == f"found {prepan.verify_security_group_id}"  # they work against the environment's endpoint
    everything = "\n".join(line.text for line in lines)
    assert not [value for value in (*OWN.values(), *WORKER.values()) if value in everything]


def test_a_task_that_declares_nothing_gets_no_aws_variable_at_all(prepan, monkeypatch):
    for name, value in {**OWN, **WORKER}.items():
        monkeypatch.setenv(name, value)

    lines = run_deploy(prepan, {"deploy:plain": report_task(),
                                "deploy:env": {"run": "local", "commands": ["env"]}}, credentials="env:GLTASK")

    out = stdout(lines)
    assert out[0] == "names="
    assert not [text for text in out[1:] if text.startswith("AWS_") or "GLTASK" in text], out


def test_the_sandbox_s_own_credentials_reach_a_task_that_declares_aws(prepan):
    lines = run_deploy(prepan, {"deploy:aws": report_task(aws=True)})

    out = stdout(lines)
    assert out[0] == "names=AWS_ACCESS_KEY_ID,AWS_DEFAULT_REGION,AWS_ENDPOINT_URL,AWS_SECRET_ACCESS_KEY"
    assert out[-1] == f"found {prepan.verify_security_group_id}"


def test_an_environment_on_the_worker_s_default_chain_gives_a_declaring_task_nothing(prepan, monkeypatch):
    for name, value in WORKER.items():
        monkeypatch.setenv(name, value)

    # the step names the task and the instance around the reason
    with pytest.raises((AdapterError, steps.StepFailed), match="this environment uses the worker's default credential chain: give it a "
                                           r"credentials reference \(profile:NAME or env:PREFIX\)"):
        run_deploy(prepan, {"deploy:aws": report_task(aws=True)}, credentials="")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users takes root")
@pytest.mark.parametrize("user, uid", [("nobody", "65534"), ("", str(os.geteuid()))])
def test_local_tasks_run_as_local_task_user_when_one_is_set(prepan, settings, monkeypatch, user, uid):
    settings.LOCAL_TASK_USER = user
    for name, value in OWN.items():
        monkeypatch.setenv(name, value)

    # the shell only: the worker's own python may live where that user cannot reach
    lines = run_deploy(prepan, {
        "deploy:who": {"run": "local", "commands": ["id -u", "stat -c %u \"$HOME\""]},
        "deploy:aws": {"run": "local", "aws": True, "commands": [
            "env | grep ^AWS_ | cut -d= -f1 | sort | tr '\\n' ' '; echo",
            "printf %s \"$AWS_SECRET_ACCESS_KEY\" | sha256sum"]},
    }, credentials="env:GLTASK")

    out = stdout(lines)
    assert out[:2] == [uid, uid]  # and HOME is that user's
    assert out[2] == "AWS_ACCESS_KEY_ID AWS_DEFAULT_REGION AWS_ENDPOINT_URL AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN "
    assert out[3] == f"{sha(OWN['GLTASK_SECRET_ACCESS_KEY'])}  -"
