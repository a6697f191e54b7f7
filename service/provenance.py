"""What code a sweep ran: the git commit, its tree and whether the tree had uncommitted changes, recorded on
every run (tags ``git_commit``, ``git_tree``, ``git_dirty``).

Run from a checkout, it asks git (``git_tree`` is ``HEAD^{tree}``). Under ``ray job submit`` the job runs an
uploaded copy of the working directory without ``.git``, so the submitting side records the answer first:

    python -m service.provenance            # writes .smear-provenance.json (git-excluded, so Ray uploads it)
    ray job submit --working-dir . -- python service/launch.py ...

(``make submit ARGS="..."`` does both.) The launcher reads, in order: git, that file, the environment
variables SMEAR_GIT_COMMIT / SMEAR_GIT_DIRTY (/ SMEAR_GIT_TREE). Where none says the commit (a plain
``ray job submit``), ``git_commit`` is ``unknown`` and ``git_tree`` is computed from the files themselves
(:func:`tree_hash`): the hash ``git rev-parse HEAD^{tree}`` gives in the checkout the upload came from, when
that checkout was clean (``git rev-parse <commit>^{tree}`` or ``git log --format='%T %H'`` then finds the
commit); the launcher says so on stderr, once (:func:`note`).

What the computed tree cannot see: files git tracks though a ``.gitignore`` rule matches them (Ray did not
upload them), symlinks (Ray's upload stores what they point to), submodules, a tracked file named ``.venv``,
``venv`` or ``__pycache__`` anywhere (Ray's default excludes), and untracked files that no ``.gitignore``
excludes (Ray uploads them, and they are counted).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

FILE = ".smear-provenance.json"
UNKNOWN = "unknown"


def _git(repo: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except Exception:
        return None


def from_git(repo: Path) -> dict[str, str] | None:
    """Git's answer for ``repo``, or None when ``repo`` is not the top of a git checkout (a folder inside some
    other repository, e.g. a job's working directory under a checkout, is not taken for it)."""
    out = _git(repo, "rev-parse", "--show-toplevel", "HEAD", "HEAD^{tree}")
    lines = out.split() if out else []
    if len(lines) != 3 or Path(lines[0]).resolve() != repo.resolve():
        return None
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {"git_commit": lines[1], "git_tree": lines[2],
            "git_dirty": UNKNOWN if status is None else str(bool(status.strip())).lower()}


def provenance(repo: str | Path) -> dict[str, str]:
    """{"git_commit": sha or "unknown", "git_tree": sha or "unknown", "git_dirty": "true" | "false" |
    "unknown"} for the code in ``repo``."""
    repo = Path(repo)
    found = from_git(repo)
    if found is None and (repo / FILE).is_file():
        try:
            data = json.loads((repo / FILE).read_text())
            found = {"git_commit": str(data["git_commit"]), "git_dirty": str(data.get("git_dirty", UNKNOWN))}
            found.update({"git_tree": str(data["git_tree"])} if "git_tree" in data else {})
        except (ValueError, KeyError, TypeError):
            found = None
    if found is None and os.environ.get("SMEAR_GIT_COMMIT"):
        found = {"git_commit": os.environ["SMEAR_GIT_COMMIT"], "git_dirty": os.environ.get("SMEAR_GIT_DIRTY", UNKNOWN)}
        found.update({"git_tree": os.environ["SMEAR_GIT_TREE"]} if os.environ.get("SMEAR_GIT_TREE") else {})
    found = found or {"git_commit": UNKNOWN, "git_dirty": UNKNOWN}
    if "git_tree" not in found:  # no git: the tree of the files this process runs
        try:
            found["git_tree"] = tree_hash(repo)
        except Exception:  # an unreadable file, a Ray without its pathspec: provenance never stops a sweep
            found["git_tree"] = UNKNOWN
    return {k: found[k] for k in ("git_commit", "git_tree", "git_dirty")}


def note(repo: str | Path, found: dict[str, str]) -> str | None:
    """The one stderr line for a sweep whose commit is unknown (a plain ``ray job submit``), else None."""
    if found["git_commit"] != UNKNOWN:
        return None
    where = "has no .git (as under `ray job submit`)" if not (Path(repo) / ".git").exists() else "is not a git checkout"
    return (f"provenance: {repo} {where}: every run records git_tree={found['git_tree']} (the git tree hash of "
            "these files) and git_commit=unknown; to record the commit, run `python -m service.provenance` "
            "before `ray job submit`, or `make submit`, or set SMEAR_GIT_COMMIT in the job's env")


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


# -- git's tree hash of a folder, without git ----------------------------------------------------------------
# The files counted are those Ray's working_dir upload takes (ray/_private/runtime_env/packaging.py: every
# folder's .gitignore and .rayignore, relative to that folder, and the default excludes .git, .venv, venv,
# __pycache__ or RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES; no size rule but the 512 MiB total), matched as
# Ray matches them: with Ray's own copy of pathspec (no gitignore library is installed in this project's
# environment, and that copy is the matcher whose verdict made the upload). Leaving out what git ignores keeps
# out what the job itself writes there (__pycache__, ./results, ./mlflow.db) and .smear-provenance.json.

_EXEC, _FILE_MODE, _LINK, _TREE = b"100755", b"100644", b"120000", b"40000"


def _object(kind: bytes, body: bytes) -> bytes:
    """A git object's id (sha1 of "<kind> <size>\\0<body>"), as 20 bytes."""
    return hashlib.sha1(kind + b" %d\0" % len(body) + body).digest()


def _blob(path: Path) -> bytes:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def _spec(lines):
    from ray._private.thirdparty.pathspec import PathSpec  # Ray's upload's own matcher (see above)

    return PathSpec.from_lines("gitwildmatch", lines)


def tree_hash(root: str | Path) -> str:
    """The id git gives the tree of the files under ``root`` as git would track them (``git rev-parse
    HEAD^{tree}`` of a clean checkout of them): blobs "blob <size>\\0<content>", trees of "<mode> <name>\\0<id>"
    entries sorted by name as bytes with a folder's name compared as if it ended in "/", modes 100644, 100755
    (owner-executable), 120000 (a symlink: its target is the blob) and 40000 (a folder); a folder without a
    counted file is left out, as git does."""
    from ray._private.ray_constants import get_runtime_env_default_excludes

    root = Path(root).absolute()
    top = _tree(root, [(root, _spec(get_runtime_env_default_excludes()))], top=True)
    return (top or _object(b"tree", b"")).hex()


def _tree(folder: Path, rules: list, top: bool = False) -> bytes | None:
    rules = rules + [(folder, _spec((folder / name).read_text().splitlines()))
                     for name in (".gitignore", ".rayignore") if (folder / name).is_file()]
    entries = []
    for entry in os.scandir(folder):
        path = Path(entry.path)
        if (top and entry.name == FILE) or any(spec.match_file(str(path.relative_to(base))) for base, spec in rules):
            continue
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            entries.append((os.fsencode(entry.name), _LINK, _object(b"blob", os.fsencode(os.readlink(path)))))
        elif stat.S_ISDIR(mode):
            sub = _tree(path, rules)
            if sub is not None:
                entries.append((os.fsencode(entry.name), _TREE, sub))
        elif stat.S_ISREG(mode):
            entries.append((os.fsencode(entry.name), _EXEC if mode & stat.S_IXUSR else _FILE_MODE, _blob(path)))
    if not entries:
        return None
    entries.sort(key=lambda e: e[0] + b"/" if e[1] == _TREE else e[0])
    return _object(b"tree", b"".join(m + b" " + name + b"\0" + sha for name, m, sha in entries))


if __name__ == "__main__":
    print(record(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent))
