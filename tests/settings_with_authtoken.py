"""The settings as they were before API tokens were hashed: DRF's authtoken app
installed. Only the token migration's test uses them, to build an old database."""

from deployer.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "rest_framework.authtoken"]  # noqa: F405
