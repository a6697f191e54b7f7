"""The thorough up-front check of a DomainNet root. Run it once before training, not inside a trial.

``check_domainnet(root, domains)`` reads both split files of every domain (``<domain>_train.txt`` and
``<domain>_test.txt``) and checks, in this order for each line:

1. **Parsing** (``domainnet.parse_list``, which the dataset uses too). The file is UTF-8, with or without
   a BOM. Lines end in LF or CRLF, and blank lines are skipped. Every other line is
   ``<relative path> <label>`` with an integer label. A file with no entries is a problem.
2. **Paths.** A path is relative (no leading ``/`` or ``\\``, no drive letter) and stays inside the root
   after normalisation (``..`` must not climb out). Symbolic links are not resolved, so a root made of
   links to other disks is fine.
3. **Labels.** Every label is in ``[0, K)``. K, the class count, is established as follows:
   - ``num_classes`` if the caller gives it;
   - otherwise 1 + the largest label that at least two of the checked domains use (train and test
     lists together). With one domain, its train and test lists are the two voters instead. Every
     DomainNet domain holds all 345 classes, so a label that only one domain uses, above every label the
     others use, is a wrong label and not a class. If no label is shared, K is 1 + the largest label;
   - capped at 1 + the largest label of the *train* lists. The model's head is sized from those
     (``domainnet.num_classes``), so a larger test label would crash evaluation;
   - capped at DomainNet's 345. Lists that reach past 345 classes are DomainNet with a wrong label,
     such as labels numbered from 1. Another dataset in this layout with more classes must pass
     ``num_classes``.
   A list whose labels stop *below* K, that is a list lacking the top classes, is not flagged. It costs
   training nothing, since the head is sized by K, and a small split may lack a class. The summary
   counts each list's distinct labels so that the caller can see it. When the check passes, every label
   is below K and K equals ``domainnet.num_classes(root, domains)``, the head size.
4. **Class folders.** When a path has the layout's ``<domain>/<class>/<file>`` form, one class folder
   has one label and one label has one class folder, across all domains and splits. A domain whose
   labels are shifted or renumbered fails here.
5. **Images.** Each distinct file listed (checked once, reported at its first listing) exists and is a
   non-empty regular file. With ``decode="header"`` its header must be sound (see
   ``smear.data.images``). With ``decode="full"`` it must decode and convert to RGB, in a process pool
   of ``workers``.

Each line gets at most one problem, the first step it fails. Every problem is one line that names the
split file, the line number and the value, e.g.
``clipart_train.txt line 17: label 345 is out of range; valid: 0..344``. The check always reads
everything. It then raises ``DataCheckError`` (a ``DataError``), whose message is the first problem in
list order (domains as given, train before test, then line number) plus ``(and N more problems)`` when
there are more. ``.problems`` holds the first ``max_problems`` messages and ``.count`` the total. A
missing root, unknown domain or missing split file is raised at once by ``domainnet.check_root``.
"""
from __future__ import annotations

import multiprocessing
import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from smear.data.domainnet import DataError, Entry, check_root, parse_list
from smear.data.images import inspect_images

__all__ = ["DOMAINNET_CLASSES", "CheckSummary", "DataCheckError", "check_domainnet", "check_domainnet_once"]

DOMAINNET_CLASSES = 345
SPLITS = ("train", "test")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")  # C:\ or C:/
Progress = Callable[[int, int], None]  # (images checked so far, images to check)


class DataCheckError(DataError):
    """Problems found by ``check_domainnet``. The message is the first problem, plus a count of the rest.

    ``problems`` holds up to ``max_problems`` messages in list order; ``count`` is the total found.
    """

    def __init__(self, problems: list[str], count: int):
        more = count - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
        super().__init__(problems[0] + suffix)
        self.problems, self.count = problems, count


@dataclass(frozen=True)
class CheckSummary:
    """What a passing check saw.

    ``lines[domain][split]`` is the number of entries in each list, split being ``"train"`` or
    ``"test"``. ``classes[domain][split]`` is the number of distinct labels in it; below
    ``num_classes`` means the list lacks some classes, which is allowed. ``images`` is the number of distinct files checked, and ``formats`` counts them by
    format. ``num_classes`` is K; ``num_classes_from`` says how K was set: ``"argument"``, ``"lists"``
    or ``"DomainNet"`` (the 345 cap).
    """

    root: str
    domains: tuple[str, ...]
    lines: dict[str, dict[str, int]]
    classes: dict[str, dict[str, int]]
    images: int
    formats: dict[str, int]
    num_classes: int
    num_classes_from: str
    decode: str
    seconds: float


def _path_problem(path: str) -> str | None:
    """Why a listed path is unsafe, or None: absolute, or escaping the root through ``..``."""
    if path.startswith(("/", "\\")) or _DRIVE.match(path):
        return "is absolute; paths must be relative to the root"
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        return "leaves the root"
    return None


def _shared_top(label_sets: Sequence[set[int]]) -> int:
    """1 + the largest label that at least two of the sets hold (the largest overall if none is shared)."""
    uses = Counter(label for s in label_sets for label in s)
    shared = [label for label, c in uses.items() if c >= 2]
    return 1 + max(shared or uses)


def _class_count(parsed: Sequence[Sequence[Entry]], lists: Sequence[tuple[str, str]],
                 given: int | None) -> tuple[int, str]:
    """K and how it was established (``"argument"``, ``"lists"`` or ``"DomainNet"``); see the module docstring."""
    if given is not None:
        return given, "argument"
    per_list = [{label for _, _, label in entries if label >= 0} for entries in parsed]
    per_domain: dict[str, set[int]] = {}
    for (domain, _), labels in zip(lists, per_list):
        per_domain.setdefault(domain, set()).update(labels)
    voters = [s for s in per_domain.values() if s]
    if len(voters) < 2:
        voters = [s for s in per_list if s]
    if not voters:
        return 0, "lists"
    k = _shared_top(voters) if len(voters) > 1 else 1 + max(voters[0])
    train = [max(s) + 1 for s, (_, split) in zip(per_list, lists) if split == "train" and s]
    if train:
        k = min(k, max(train))
    if k > DOMAINNET_CLASSES:
        return DOMAINNET_CLASSES, "DomainNet"
    return k, "lists"


def _check_images(root: str, paths: list[str], full: bool, workers: int,
                  progress: Progress | None) -> list[tuple[str | None, str]]:
    """``inspect_images`` over ``paths`` in chunks, in this process or a spawned pool; results in order."""
    size = max(1, min(256 if full else 2048, -(-len(paths) // workers)))   # every worker gets a chunk
    chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
    out: list[list[tuple[str | None, str]]] = [[] for _ in chunks]
    done, total = 0, len(paths)
    if progress:
        progress(0, total)
    if workers == 1 or len(chunks) <= 1:
        for ci, chunk in enumerate(chunks):
            out[ci] = inspect_images(root, chunk, full)
            done += len(chunk)
            if progress:
                progress(done, total)
    else:
        # spawn, not fork: the caller (a launcher) may hold threads that fork would copy mid-flight
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
            futures = {pool.submit(inspect_images, root, chunk, full): ci for ci, chunk in enumerate(chunks)}
            for fut in as_completed(futures):
                ci = futures[fut]
                out[ci] = fut.result()
                done += len(chunks[ci])
                if progress:
                    progress(done, total)
    return [r for chunk in out for r in chunk]


def check_domainnet(root: str | Path, domains: Sequence[str], *,
                    decode: Literal["header", "full"] = "header", workers: int = 1,
                    progress: Progress | None = None, num_classes: int | None = None,
                    max_problems: int = 20) -> CheckSummary:
    """Check a DomainNet root's split files and images for ``domains``; see the module docstring.

    ``progress(done, total)`` is called as images are checked (from this process). Raises
    ``DataCheckError`` naming the first problem, ``DataError`` for a missing root, domain or split file,
    and ``ValueError`` for bad arguments. Returns a ``CheckSummary`` when all is well.
    """
    start = time.perf_counter()
    if decode not in ("header", "full"):
        raise ValueError(f"decode={decode!r}; valid: header, full")
    if workers < 1 or max_problems < 1 or (num_classes is not None and num_classes < 1):
        raise ValueError("workers, max_problems and num_classes must be >= 1")
    domains = tuple(dict.fromkeys(domains))
    root_path = check_root(root, domains)
    lists = [(d, s) for d in domains for s in SPLITS]
    names = [f"{d}_{s}.txt" for d, s in lists]
    problems: list[tuple[int, int, str]] = []   # (list index, line, message)

    parsed: list[list[Entry]] = []
    for li, name in enumerate(names):
        try:
            data = (root_path / name).read_bytes()
        except OSError as e:
            raise DataError(f"{name}: cannot be read ({e.strerror or e})") from None
        entries, bad = parse_list(data, name)
        problems.extend((li, n, msg) for n, msg in bad)
        if not entries and not bad:
            problems.append((li, 0, f"{name}: no '<relative path> <label>' lines"))
        parsed.append(entries)

    k, k_from = _class_count(parsed, lists, num_classes)
    valid = f"valid: 0..{k - 1}" if k > 0 else "no label is valid (no list has a label >= 0)"
    folder_label: dict[str, tuple[int, str, int]] = {}   # class folder -> (label, list name, line)
    label_folder: dict[int, tuple[str, str, int]] = {}   # label -> (class folder, list name, line)
    first_listing: dict[str, tuple[int, int]] = {}       # path -> (list index, line)
    for li, entries in enumerate(parsed):
        name = names[li]
        for n, path, label in entries:
            why = _path_problem(path)
            if why:
                problems.append((li, n, f"{name} line {n}: path {path!r} {why}"))
                continue
            if not 0 <= label < k:
                problems.append((li, n, f"{name} line {n}: label {label} is out of range; {valid}"))
                continue
            parts = path.split("/")
            if len(parts) >= 3:
                folder = parts[-2]
                seen = folder_label.setdefault(folder, (label, name, n))
                if seen[0] != label:
                    problems.append((li, n, f"{name} line {n}: class folder {folder!r} has label {label}, "
                                            f"but {seen[1]} line {seen[2]} gives it label {seen[0]}"))
                    continue
                other = label_folder.setdefault(label, (folder, name, n))
                if other[0] != folder:
                    problems.append((li, n, f"{name} line {n}: label {label} is class folder {folder!r}, "
                                            f"but {other[1]} line {other[2]} gives label {label} to {other[0]!r}"))
                    continue
            first_listing.setdefault(path, (li, n))

    paths = list(first_listing)
    formats: Counter[str] = Counter()
    for path, (why, fmt) in zip(paths, _check_images(str(root_path), paths, decode == "full", workers, progress)):
        if why:
            li, n = first_listing[path]
            problems.append((li, n, f"{names[li]} line {n}: image {path!r} {why}"))
        else:
            formats[fmt] += 1

    if problems:
        problems.sort(key=lambda p: (p[0], p[1]))
        raise DataCheckError([msg for _, _, msg in problems[:max_problems]], len(problems))
    lines: dict[str, dict[str, int]] = {d: {} for d in domains}
    classes: dict[str, dict[str, int]] = {d: {} for d in domains}
    for (d, s), entries in zip(lists, parsed):
        lines[d][s] = len(entries)
        classes[d][s] = len({label for _, _, label in entries})
    return CheckSummary(root=str(root_path), domains=domains, lines=lines, classes=classes, images=len(paths),
                        formats=dict(formats), num_classes=k, num_classes_from=k_from, decode=decode,
                        seconds=time.perf_counter() - start)


def _marker(root: Path, domains: Sequence[str], decode: str) -> Path:
    """This node's record that ``root`` passed the check as its split files are now (path, size, mtime)."""
    import hashlib
    import os

    h = hashlib.sha1(f"{root.resolve()}|{','.join(domains)}|{decode}".encode())
    for d in domains:
        for which in ("train", "test"):
            st = (root / f"{d}_{which}.txt").stat()
            h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    cache = Path(os.environ.get("SMEAR_CACHE_DIR", Path.home() / ".cache" / "smear-sweep"))
    return cache / "data-checked" / h.hexdigest()


def check_domainnet_once(root: str | Path, domains: Sequence[str], *, decode: Literal["header", "full"] = "header",
                         **kwargs) -> CheckSummary | None:
    """:func:`check_domainnet`, skipped when this node has already passed the same root with unchanged split
    files (a marker under ``$SMEAR_CACHE_DIR`` or ``~/.cache/smear-sweep``). Returns None when skipped.

    The launcher checks a root it can see before any trial starts; on a cluster whose data only the worker
    nodes see, each trial runs this as its first act, and the node's later trials skip it.
    """
    root = Path(root)
    check_root(root, domains)
    marker = _marker(root, domains, decode)
    if marker.exists() or (decode == "header" and _marker(root, domains, "full").exists()):
        return None
    summary = check_domainnet(root, domains, decode=decode, **kwargs)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{summary.images} images, {summary.num_classes} classes, {summary.seconds:.1f} s\n")
    except OSError:  # a read-only home: the check simply runs again next time
        pass
    return summary
