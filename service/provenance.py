"""What code a sweep ran: the git commit and whether the tree had uncommitted changes, recorded on every run.

Run from a checkout, it asks git. Under ``ray job submit`` the job runs an uploaded copy of the working
directory without ``.git``, so the submitting side records the answer first:

    python -m service.provenance            # writes .smear-provenance.json (git-excluded, so Ray uploads it)
    ray job submit --working-dir . -- python service/launch.py ...

(``make submit ARGS="..."`` does both.) The launcher reads, in order: git, that file, the environment
variables SMEAR_GIT_COMMIT / SMEAR_GIT_DIRTY, and otherwise records ``unknown``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FILE = ".smear-provenance.json"


def _git(repo: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except Exception:
        return None


def from_git(repo: Path) -> dict[str, str] | None:
    commit = _git(repo, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit.strip(), "git_dirty": "unknown" if status is None else str(bool(status.strip())).lower()}


def provenance(repo: str | Path) -> dict[str, str]:
    """{"git_commit": sha or "unknown", "git_dirty": "true" | "false" | "unknown"} for the code in ``repo``."""
    repo = Path(repo)
    found = from_git(repo)
    if found is None and (repo / FILE).is_file():
        try:
            data = json.loads((repo / FILE).read_text())
            found = {"git_commit": str(data["git_commit"]), "git_dirty": str(data.get("git_dirty", "unknown"))}
        except (ValueError, KeyError):
            found = None
    if found is None and os.environ.get("SMEAR_GIT_COMMIT"):
        found = {"git_commit": os.environ["SMEAR_GIT_COMMIT"], "git_dirty": os.environ.get("SMEAR_GIT_DIRTY", "unknown")}
    return found or {"git_commit": "unknown", "git_dirty": "unknown"}


def record(repo: str | Path) -> Path:
    """Write ``repo``/.smear-provenance.json from git, and keep it out of git (``.git/info/exclude``, which Ray's
    upload does not read, unlike ``.gitignore``)."""
    repo = Path(repo)
    found = from_git(repo)
    if found is None:
        raise SystemExit(f"provenance: {repo} is not a git checkout; nothing recorded")
    path = repo / FILE
    path.write_text(json.dumps(found) + "\n")
    exclude = repo / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and FILE not in (exclude.read_text().split() if exclude.exists() else []):
        with exclude.open("a") as f:
            f.write(f"\n{FILE}\n")
    return path


if __name__ == "__main__":
    print(record(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent))
