"""Ask a repository whether a revision exists, without cloning it."""

from __future__ import annotations

import re
import subprocess
from urllib.parse import urlsplit

from .errors import AdapterError

_SHA = re.compile(r"^[0-9a-f]{7,40}$")
# git@host:path, the scp-like form of ssh (no "-" first: git would read an option)
_SCP = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s-][^\s]*$")


def check_repository(repository: str, *, allow_file: bool = False) -> str:
    """The repository if git may fetch it: https://, ssh://, git@host:path,
    and file:// only when allowed. Anything else (http://, a bare path,
    ext::, a leading "-") would let a person make a server fetch or read
    what it should not; raises AdapterError saying what is accepted."""
    accepted = "https://, ssh:// or git@host:path" + (" or file://" if allow_file else "")
    refused = AdapterError(f"{(repository or '')[:100]!r} is not a repository Greenlight fetches: use {accepted}")
    if not repository or any(c.isspace() or ord(c) < 32 for c in repository):
        raise refused
    try:
        url = urlsplit(repository)
        host = url.hostname
    except ValueError:  # a bracketed host that is no IPv6 address, say
        raise refused from None
    if url.scheme in ("https", "ssh") and host and not host.startswith("-"):
        return repository
    if url.scheme == "file" and allow_file and url.path and not url.netloc:
        return repository
    if not url.scheme and _SCP.match(repository):
        return repository
    raise refused


def _ls_remote(repository: str, *refs: str, timeout: float, allow_file: bool) -> str:
    check_repository(repository, allow_file=allow_file)
    # git itself refuses any other transport, redirects to one included
    protocols = "https:ssh" + (":file" if allow_file else "")
    try:
        found = subprocess.run(
            ["git", "ls-remote", "--", repository, *refs],
            capture_output=True, text=True, timeout=timeout, env={"GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": protocols, "PATH": "/usr/bin:/bin:/usr/local/bin"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AdapterError(f"cannot ask {repository} about {' '.join(refs) or 'its revisions'}: {exc}") from None
    if found.returncode != 0:
        raise AdapterError(f"cannot read {repository}: {found.stderr.strip()[:200]}")
    return found.stdout


def revisions(repository: str, timeout: float = 15, *, allow_file: bool = False) -> dict[str, list[str]]:
    """The branches and tags a repository lists, without cloning it:
    {"branches": [...], "tags": [...]}; the default branch (HEAD's) first."""
    listed = [line.split("\t")[::-1] for line in _ls_remote(
        repository, timeout=timeout, allow_file=allow_file).splitlines() if "\t" in line]
    refs = dict(listed)
    head = refs.get("HEAD")
    branches = [name.removeprefix("refs/heads/") for name, _ in listed if name.startswith("refs/heads/")]
    branches.sort(key=lambda b: refs[f"refs/heads/{b}"] != head)
    tags = [name.removeprefix("refs/tags/") for name, _ in listed if name.startswith("refs/tags/") and not name.endswith("^{}")]
    return {"branches": branches, "tags": tags}


def resolve(repository: str, revision: str, timeout: float = 15, *, allow_file: bool = False) -> str | None:
    """The commit a branch or tag names; the revision itself if it looks like a
    commit (a remote cannot be asked for one); None if the remote has no such ref."""
    check_repository(repository, allow_file=allow_file)
    if _SHA.match(revision):
        return revision
    stdout = _ls_remote(repository, revision, f"refs/tags/{revision}^{{}}", timeout=timeout, allow_file=allow_file)
    refs = dict(reversed(line.split("\t")) for line in stdout.splitlines() if "\t" in line)
    for name in (f"refs/tags/{revision}^{{}}", f"refs/heads/{revision}", f"refs/tags/{revision}", revision):
        if name in refs:
            return refs[name]
    return None
