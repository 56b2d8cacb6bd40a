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


def _env(allow_file: bool) -> dict:
    return {"GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": "https:ssh" + (":file" if allow_file else ""),
            "PATH": "/usr/bin:/bin:/usr/local/bin", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def _git(args: list[str], *, cwd=None, timeout: float, allow_file: bool, what: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(allow_file))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AdapterError(f"cannot {what}: {exc}") from None
    if done.returncode != 0:
        raise AdapterError(f"cannot {what}: {done.stderr.strip()[:200]}")
    return done.stdout


def mirror(repository: str, cache_dir, timeout: float = 60, *, allow_file: bool = False):
    """A bare clone of `repository` under `cache_dir` (one per repository URL),
    fetched afresh on every call: the log's source, never a work tree. Returns its path."""
    import fcntl
    import hashlib
    from pathlib import Path

    check_repository(repository, allow_file=allow_file)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / (hashlib.sha256(repository.encode()).hexdigest()[:24] + ".git")
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time per repository, across processes
        if not (path / "HEAD").exists():
            _git(["clone", "--bare", "--quiet", "--filter=blob:none", "--", repository, str(path)], timeout=timeout, allow_file=allow_file,
                 what=f"clone {repository}")
        else:
            _git(["fetch", "--quiet", "--prune", "--force", "--", repository, "+refs/heads/*:refs/heads/*",
                  "+refs/tags/*:refs/tags/*"], cwd=path, timeout=timeout, allow_file=allow_file, what=f"fetch {repository}")
    return path


_FIELDS = "%H%x1f%s%x1f%an%x1f%aI"


def log(mirror_path, revision: str, since: str = "", limit: int = 50, *, timeout: float = 30) -> list[dict]:
    """Commits reachable from `revision` and not from `since` (every one when
    `since` is empty), newest first, at most `limit`: {sha, subject, author, date}.
    Both are names the caller validated (no leading "-")."""
    spec = [f"{since}..{revision}"] if since else [revision]
    out = _git(["log", f"--format={_FIELDS}", f"-n{int(limit)}", *spec, "--"], cwd=mirror_path, timeout=timeout,
               allow_file=False, what=f"read the log of {revision}")
    commits = []
    for line in out.splitlines():
        sha, subject, author, date = (line.split("\x1f") + ["", "", ""])[:4]
        commits.append({"sha": sha, "subject": subject, "author": author, "date": date})
    return commits
