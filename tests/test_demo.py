"""`manage.py demo` (what `make demo` runs) brings the whole product up and down."""

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from deployer.sandbox.hosts import processes_marked
from tests.helpers import ROOT, free_port, wait_for

pytestmark = pytest.mark.sandbox


def test_the_demo_serves_a_login_and_the_seeded_environment_then_stops_cleanly(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "GREENLIGHT_VAR_DIR": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",  # the zero-setup default
        "DEMO_ADMIN_PASSWORD": "demo-password-for-tests",
        "DEMO_REVIEWER_PASSWORD": "reviewer-password-for-tests",
        "SANDBOX_AWS_PORT": "0",
        "SANDBOX_LB_PORT": "0",
        "SANDBOX_NETWORK": "127.99.0.0/16",
    }
    env.pop("ALLOW_FILE_REPOSITORIES", None)  # the demo allows its sandbox's file:// repository itself
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True)
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen([sys.executable, "manage.py", "demo", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def login_page():
            try:
                return requests.get(f"{base}/accounts/login/", timeout=2)
            except requests.ConnectionError:
                assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]

        page = wait_for(login_page, 120, 0.5, "the login page")
        assert page.status_code == 200 and "Sign in" in page.text

        for username, password in (("admin", "demo-password-for-tests"), ("reviewer", "reviewer-password-for-tests")):
            session = requests.Session()
            session.get(f"{base}/accounts/login/")
            signed_in = session.post(
                f"{base}/accounts/login/",
                data={"username": username, "password": password, "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                headers={"Referer": f"{base}/accounts/login/"},
            )
            assert signed_in.status_code == 200 and "Dashboard" in signed_in.text, username
        environments = session.get(f"{base}/environments/")
        assert "prepan" in environments.text  # the sandbox's environment, stored for releases

        info = json.loads((tmp_path / "sandbox.json").read_text())
        revisions = {requests.get(info["load_balancer_url"], timeout=5).headers["X-Revision"] for _ in range(4)}
        assert revisions == {"v1"}
        assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        demo.send_signal(signal.SIGINT)
        status = demo.wait(60)
    assert status == 0
    assert processes_marked(tmp_path / "sandbox") == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
