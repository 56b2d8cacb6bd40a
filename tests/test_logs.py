"""Secrets never reach a stored log line."""

from releases.logs import REDACTED, Redactor


def test_it_redacts_aws_keys_tokens_and_passwords():
    redact = Redactor()

    assert redact("export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE") == f"export AWS_ACCESS_KEY_ID={REDACTED}"
    assert "wJalrXUtnFEMI" not in redact("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert redact("Authorization: Token 9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b") == f"Authorization: {REDACTED}"
    assert redact("mysql -u app --password=hunter2hunter2") == f"mysql -u app --password={REDACTED}"


def test_a_git_sha_is_not_mistaken_for_a_secret():
    line = "HEAD is now at 9f2c1e0a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e prepan v2"
    assert Redactor()(line) == line


def test_every_line_of_a_private_key_is_redacted():
    redact = Redactor()
    lines = ["-----BEGIN OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ", "AAAAC3NzaC1lZDI1NTE5", "-----END OPENSSH PRIVATE KEY-----", "after"]

    assert [redact(line, ("deploy", "app-3", "stdout")) for line in lines] == [REDACTED] * 4 + ["after"]


def test_the_environment_s_own_secrets_are_redacted_wherever_they_appear():
    redact = Redactor(["s3cr3t-db-pass"])

    assert redact("connecting with s3cr3t-db-pass...") == f"connecting with {REDACTED}..."
