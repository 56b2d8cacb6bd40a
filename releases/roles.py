"""The four roles people hold. They are Django groups, created by a migration."""

VIEWER = "viewer"  # reads everything: environments, releases, logs, audit
DEPLOYER = "deployer"  # starts, cancels, retries and rolls back releases
APPROVER = "approver"  # decides gates
# changes what runs on the workers and who decides: recipes, and an environment's
# endpoints, credentials, repository, SSH and four eyes (granted by an administrator)
MAINTAINER = "maintainer"

ALL = (VIEWER, DEPLOYER, APPROVER, MAINTAINER)
