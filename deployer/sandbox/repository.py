"""The demo app's git repository, with one tagged commit per revision."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "demo_app"
REVISIONS = ("v1", "v2")
DEFAULT_BRANCH = "main"


def _git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Greenlight sandbox",
        "GIT_AUTHOR_EMAIL": "sandbox@greenlight.invalid",
        "GIT_COMMITTER_NAME": "Greenlight sandbox",
        "GIT_COMMITTER_EMAIL": "sandbox@greenlight.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(cwd),
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def ensure(path: Path) -> str:
    """Create the bare repository at `path` unless it already has every revision."""
    fingerprint = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(SOURCE.iterdir()) if f.is_file())).hexdigest()
    marker = path / "greenlight-source"
    if path.exists():
        tags = _git("tag", "--list", cwd=path).split()
        current = marker.exists() and marker.read_text() == fingerprint
        if current and all(revision in tags for revision in REVISIONS):
            return path.as_uri()
        shutil.rmtree(path)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        _git("init", "--quiet", f"--initial-branch={DEFAULT_BRANCH}", cwd=work)
        for revision in REVISIONS:
            for source in SOURCE.iterdir():
                if source.is_file():
                    text = source.read_text().replace("{revision}", revision)
                    (work / source.name).write_text(text)
            _git("add", "--all", cwd=work)
            _git("commit", "--quiet", "-m", f"prepan {revision}", cwd=work)
            _git("tag", revision, cwd=work)
        path.parent.mkdir(parents=True, exist_ok=True)
        _git("clone", "--quiet", "--bare", str(work), str(path), cwd=work.parent)
    marker.write_text(fingerprint)
    return path.as_uri()
