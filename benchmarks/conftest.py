# Benchmarks reuse the tests' fixtures (a test database, helpers).
from tests.conftest import *  # noqa: F401,F403
