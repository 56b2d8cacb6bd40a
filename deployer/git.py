"""Ask a repository whether a revision exists, without cloning it."""

from __future__ import annotations

import re
import subprocess

from .errors import AdapterError

_SHA = re.compile(r"^[0-9a-f]{7,40}$")


def resolve(repository: str, revision: str, timeout: float = 15) -> str | None:
    """The commit a branch or tag names; the revision itself if it looks like a
    commit (a remote cannot be asked for one); None if the remote has no such ref."""
    if _SHA.match(revision):
        return revision
    try:
        found = subprocess.run(
            ["git", "ls-remote", "--", repository, revision, f"refs/tags/{revision}^{{}}"],
            capture_output=True, text=True, timeout=timeout, env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AdapterError(f"cannot ask {repository} about {revision}: {exc}") from None
    if found.returncode != 0:
        raise AdapterError(f"cannot read {repository}: {found.stderr.strip()[:200]}")
    refs = dict(reversed(line.split("\t")) for line in found.stdout.splitlines() if "\t" in line)
    for name in (f"refs/tags/{revision}^{{}}", f"refs/heads/{revision}", f"refs/tags/{revision}", revision):
        if name in refs:
            return refs[name]
    return None
