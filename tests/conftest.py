import pytest

from tests.helpers import SandboxProcess


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    """One seeded sandbox for the session, stopped (and checked) at the end."""
    process = SandboxProcess(tmp_path_factory.mktemp("sandbox"))
    process.start()
    yield process
    assert process.stop() == 0
