"""service/provenance.py without git: the tree hash computed from the files is git's own (``HEAD^{tree}``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

from service.provenance import FILE, from_git, note, provenance, tree_hash

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # `git hash-object -t tree /dev/null`


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _checkout(root):
    """A git checkout with what makes git's tree format differ from a naive hash, committed with `git add -A`."""
    repo = root / "repo"
    for rel, text in {"README": "top\n", "a.txt": "file a.txt\n", "a-b": "dash\n", "a0": "zero\n",
                      "a/inner.txt": "in a/\n", "a/b/c/deep.py": "print('deep')\n", "run.sh": "#!/bin/sh\necho hi\n",
                      ".gitignore": "*.log\n/data/\n__pycache__/\n", "sub/.gitignore": "local.tmp\n",
                      "sub/kept.txt": "kept\n", "sub/local.tmp": "ignored by sub/.gitignore\n",
                      "build.log": "ignored\n", "logs/only.log": "a folder of ignored files only\n",
                      "data/big.bin": "ignored folder\n", "pkg/__pycache__/m.cpython-311.pyc": "bytecode\n",
                      "nested/a/x": "a as a folder\n", "nested/a.b": "a.b as a file\n"}.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (repo / "run.sh").chmod(0o755)                      # 100755
    (repo / "link").symlink_to("a/inner.txt")            # 120000
    (repo / "empty" / "deeper").mkdir(parents=True)      # not in git
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "x")
    return repo


def test_tree_hash_of_a_checkout_without_git_is_head_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("SMEAR_GIT_COMMIT", raising=False)
    repo = _checkout(tmp_path)
    head_tree = _git(repo, "rev-parse", "HEAD^{tree}")
    modes = {line.split()[0] for line in _git(repo, "ls-tree", "-r", "-t", "HEAD").splitlines()}
    assert modes == {"100644", "100755", "120000", "040000"}            # every kind of entry is in the test
    assert "a-b\na.txt\na\na0" in _git(repo, "ls-tree", "--name-only", "HEAD")  # git's order: "a" as "a/"
    copy = tmp_path / "upload"                                         # as Ray's upload: no .git
    shutil.copytree(repo, copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    (copy / FILE).write_text("{}")                                     # never counted
    assert not (copy / ".git").exists() and (copy / "empty" / "deeper").is_dir() and (copy / "build.log").exists()
    assert tree_hash(copy) == head_tree
    assert tree_hash(repo) == head_tree                                # .git itself is never counted
    found = provenance(copy)
    assert found == {"git_commit": "unknown", "git_tree": head_tree, "git_dirty": "unknown"}
    line = note(copy, found)
    assert "\n" not in line and head_tree in line and "has no .git" in line
    assert "python -m service.provenance" in line and "make submit" in line and "SMEAR_GIT_COMMIT" in line
    # a changed, an added and a removed file each give another tree
    seen = {head_tree}
    for change in (lambda: (copy / "a" / "b" / "c" / "deep.py").write_text("changed\n"),
                   lambda: (copy / "new.txt").write_text("untracked, not ignored: uploaded, counted\n"),
                   lambda: (copy / "a-b").unlink(), lambda: (copy / "run.sh").chmod(0o644)):
        change()
        seen.add(tree_hash(copy))
    assert len(seen) == 5
    (tmp_path / "nothing").mkdir()
    assert tree_hash(tmp_path / "nothing") == EMPTY_TREE


def test_git_is_asked_first_and_only_for_the_top_of_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("SMEAR_GIT_COMMIT", raising=False)
    repo = _checkout(tmp_path)
    head, head_tree = _git(repo, "rev-parse", "HEAD"), _git(repo, "rev-parse", "HEAD^{tree}")
    assert provenance(repo) == {"git_commit": head, "git_tree": head_tree, "git_dirty": "false"}
    assert note(repo, provenance(repo)) is None
    assert from_git(repo / "a") is None                   # a folder inside a checkout is not that checkout
    (repo / "README").write_text("changed\n")
    assert provenance(repo)["git_dirty"] == "true" and provenance(repo)["git_tree"] == head_tree  # HEAD's tree
    copy = tmp_path / "upload"
    shutil.copytree(repo, copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    (copy / FILE).write_text(json.dumps({"git_commit": head, "git_tree": head_tree, "git_dirty": "true"}))
    assert provenance(copy) == {"git_commit": head, "git_tree": head_tree, "git_dirty": "true"}  # as recorded
    monkeypatch.setenv("SMEAR_GIT_COMMIT", head)
    os.remove(copy / FILE)
    assert provenance(copy) == {"git_commit": head, "git_tree": tree_hash(copy), "git_dirty": "unknown"}
    assert tree_hash(copy) != head_tree                    # the files' tree: README was changed
