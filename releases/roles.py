"""The three roles people hold. They are Django groups, created by a migration."""

VIEWER = "viewer"  # reads everything: environments, releases, logs, audit
DEPLOYER = "deployer"  # starts, cancels, retries and rolls back releases
APPROVER = "approver"  # decides gates

ALL = (VIEWER, DEPLOYER, APPROVER)
