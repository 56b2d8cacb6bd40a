"""Ask a repository whether a revision exists, without cloning it; keep a
bare clone of it for the log of commits."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import AdapterError

_SHA = re.compile(r"^[0-9a-f]{7,40}$")
# git@host:path, the scp-like form of ssh (no "-" first: git would read an option)
_SCP = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s-][^\s]*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
MASK = "***"


def _userinfo(repository: str) -> tuple[str, str, str, str] | None:
    """(scheme, userinfo, host and the rest after it) of a URL with userinfo; None for
    any other value (no "://", no "@" before the path, git@host:path)."""
    scheme, sep, rest = (repository or "").partition("://")
    if not sep or not _SCHEME.match(scheme):
        return None
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")  # as urlsplit reads it: the last "@" ends the userinfo
    return (scheme, userinfo, host, rest[end:]) if at else None


def shown(repository: str) -> str:
    """`repository` as a page, an error or an audit event may show it: a
    password or token in its userinfo replaced by ***. https://user:TOKEN@host/r
    -> https://user:***@host/r; https://TOKEN@host/r -> https://***@host/r (over
    https a lone userinfo is how a token is passed); ssh://user:pw@host/r ->
    ssh://user:***@host/r. An ssh user alone (ssh://git@host/r, git@host:r) is
    a name, not a secret, and stays; so does any value that is no such URL."""
    parts = _userinfo(repository)
    if parts is None:
        return repository
    scheme, userinfo, host, rest = parts
    user, colon, _ = userinfo.partition(":")
    if colon:
        userinfo = f"{user}:{MASK}"
    elif scheme.lower() in ("http", "https"):
        userinfo = MASK
    return f"{scheme}://{userinfo}@{host}{rest}"


def secrets(repository: str) -> list[str]:
    """The password or token of `repository` (what shown() hides), as written
    and percent-decoded: values a log or an error must never show by themselves."""
    parts = _userinfo(repository)
    if parts is None:
        return []
    scheme, userinfo, _, _ = parts
    user, colon, password = userinfo.partition(":")
    secret = password if colon else user if scheme.lower() in ("http", "https") else ""
    return sorted({s for s in (secret, unquote(secret)) if s and s != MASK})


def scrubbed(text: str, repository: str) -> str:
    """`text` (git's output, say) with `repository` shown as shown() shows it
    and its password or token taken out wherever else it appears."""
    text = text.replace(repository, shown(repository))
    for secret in secrets(repository):
        if len(secret) >= 6:  # a shorter one would mask pieces of words (the URL itself is masked above)
            text = text.replace(secret, MASK)
    return text


def _refused_shown(value: str) -> str:
    """A refused value as its error shows it: shown()'s mask for a URL; for anything else with an
    "@" (user:TOKEN@host:path, which is no URL), all before the last "@" is hidden: it may be a token."""
    masked = shown(value)
    if masked == value and "@" in value and not _SCP.match(value):
        return MASK + "@" + value.rpartition("@")[2]
    return masked


def check_repository(repository: str, *, allow_file: bool = False) -> str:
    """The repository if git may fetch it: https://, ssh://, git@host:path,
    and file:// only when allowed. Anything else (http://, a bare path,
    ext::, a leading "-") would let a person make a server fetch or read
    what it should not; raises AdapterError saying what is accepted."""
    accepted = "https://, ssh:// or git@host:path" + (" or file://" if allow_file else "")
    refused = AdapterError(f"{_refused_shown(repository or '')[:100]!r} is not a repository Greenlight fetches: use {accepted}")
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
        raise AdapterError(scrubbed(f"cannot ask {shown(repository)} about {' '.join(refs) or 'its revisions'}: {exc}",
                                    repository)) from None
    if found.returncode != 0:
        # git may echo the URL it was given: scrubbed before it is cut, so no token is cut in two
        raise AdapterError(f"cannot read {shown(repository)}: {scrubbed(found.stderr.strip(), repository)[:200]}")
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


def _git(args: list[str], *, cwd=None, timeout: float, allow_file: bool, what: str, repository: str = "") -> str:
    """git's output; AdapterError saying `what` could not be done, with git's
    stderr (`repository`, when given, scrubbed out of both: the command and
    git's messages may hold it)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(allow_file))
    except (OSError, subprocess.TimeoutExpired) as exc:
        message = f"cannot {what}: {exc}"
        raise AdapterError(scrubbed(message, repository) if repository else message) from None
    if done.returncode != 0:
        stderr = done.stderr.strip()
        raise AdapterError(f"cannot {what}: {(scrubbed(stderr, repository) if repository else stderr)[:200]}")
    return done.stdout


def mirror_name(repository: str) -> str:
    """The name of `repository`'s bare clone (and of what is kept about it): a hash, never the URL."""
    return hashlib.sha256(repository.encode()).hexdigest()[:24]


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".fetched")  # touched after each clone or fetch that succeeded


def fresh_mirror(repository: str, cache_dir, fresh_for: float) -> Path | None:
    """The bare clone of `repository` under `cache_dir` if one was cloned or
    fetched less than `fresh_for` seconds ago; else None. Never runs git."""
    path = Path(cache_dir) / (mirror_name(repository) + ".git")
    try:
        fetched = _stamp(path).stat().st_mtime
    except OSError:
        return None
    return path if (path / "HEAD").exists() and time.time() - fetched < fresh_for else None


def _has(path: Path, revision: str, timeout: float) -> bool:
    """Whether the bare clone at `path` has the commit `revision` names (validated by the caller)."""
    try:
        _git(["rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], cwd=path, timeout=timeout, allow_file=False,
             what="look for a revision")
    except AdapterError:
        return False
    return True


def mirror(repository: str, cache_dir, timeout: float = 60, *, allow_file: bool = False, fresh_for: float = 0,
           needs: str = "") -> Path:
    """A bare clone of `repository` under `cache_dir` (one per repository URL),
    the log's source, never a work tree. Returns its path.

    Fetched afresh unless it was cloned or fetched less than `fresh_for`
    seconds ago and has the commit `needs` names (a branch, tag or commit,
    validated by the caller: a tag pushed a moment ago is fetched for)."""
    import fcntl

    check_repository(repository, allow_file=allow_file)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / (mirror_name(repository) + ".git")
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch at a time per repository, across processes
        if fresh_for > 0 and fresh_mirror(repository, cache_dir, fresh_for) and (not needs or _has(path, needs, timeout)):
            return path
        if not (path / "HEAD").exists():
            _git(["clone", "--bare", "--quiet", "--filter=blob:none", "--", repository, str(path)], timeout=timeout,
                 allow_file=allow_file, what=f"clone {shown(repository)}", repository=repository)
        else:
            _git(["fetch", "--quiet", "--prune", "--force", "--", repository, "+refs/heads/*:refs/heads/*",
                  "+refs/tags/*:refs/tags/*"], cwd=path, timeout=timeout, allow_file=allow_file,
                 what=f"fetch {shown(repository)}", repository=repository)
        _stamp(path).touch()
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
