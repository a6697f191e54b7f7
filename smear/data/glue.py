"""GLUE for T5 text-to-text: loading (Hub or a local copy of ``nyu-mll/glue``), the SMEAR split protocol,
T5-style formatting, a multi-task ``GlueMixture`` dataset and its collate function.

Local layout = the Hub repository layout of ``nyu-mll/glue``: ``ROOT/<task>/<split>-00000-of-00001.parquet``
(any ``<split>-*.parquet`` shards), columns and dtypes as on the Hub (label: ClassLabel stored as int64,
float32 for STS-B; idx: int32; test labels -1), e.g. what
``huggingface-cli download nyu-mll/glue --repo-type dataset --local-dir ROOT`` leaves.
``smear.data.synthetic_glue`` writes an offline stand-in in the same layout.

Splits (methods.md section 2; the permutation is the reference's ``torch.randperm(n)`` with a
generator seeded 42):
- small sets (cola, rte, mrpc, stsb): train = original train; the original validation is permuted;
  validation = the first ``n // 2`` of the permutation, test = the remaining ``n - n // 2``.
- large sets (qqp, qnli, sst2): the original train is permuted; validation = its first ``heldout``
  (1,000), train = the rest; test = the original validation.
- mnli: train = train, validation = validation_mismatched, test = validation_matched.
GLUE's own test splits (no labels) are never used. Indices inside a split keep the file's row order.

Formatting: T5's own text-to-text prefixes (Raffel et al. 2020, appendix D) instead of the reference's
promptsource templates, the documented alternative in methods.md: ``"<task> <field>: <text> ..."``, targets
are T5's label words; STS-B targets are the score rounded to the nearest 0.2 and written ``"%.1f"``.

Mixing: the mixture is the plain concatenation of the tasks' examples, so uniform sampling over it is
examples-proportional mixing (T5 section 3.5.2) without a cap. ``mixing_cap=K`` gives T5's capped rate
``min(n_t, K) / sum_s min(n_s, K)`` per task through ``GlueMixture.sampler()``.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, RandomSampler, Sampler, WeightedRandomSampler

from smear.data.domainnet import DataError

TASKS = ("rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola")
HUB_NAME = "nyu-mll/glue"
SMALL_TASKS = ("cola", "rte", "mrpc", "stsb")   # validation halved into validation / test
LARGE_TASKS = ("qqp", "qnli", "sst2")           # `heldout` train examples = validation, validation = test
SEED = 42
Split = Literal["train", "validation", "test"]

# Text columns in the order T5 writes them, label words (index = class id; None = regression).
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",), "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "qnli": ("question", "sentence"),
    "mnli": ("hypothesis", "premise"),           # T5 puts the hypothesis first
}
COLUMNS: dict[str, tuple[str, ...]] = {          # the Hub schema's column order
    "cola": ("sentence", "label", "idx"), "sst2": ("sentence", "label", "idx"),
    "mrpc": ("sentence1", "sentence2", "label", "idx"), "stsb": ("sentence1", "sentence2", "label", "idx"),
    "rte": ("sentence1", "sentence2", "label", "idx"),
    "qqp": ("question1", "question2", "label", "idx"), "qnli": ("question", "sentence", "label", "idx"),
    "mnli": ("premise", "hypothesis", "label", "idx"),
}
LABEL_NAMES: dict[str, tuple[str, ...] | None] = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
    "stsb": None,
}
SPLITS: dict[str, tuple[str, ...]] = {           # the Hub's split names per task
    t: ("train", "validation", "test") for t in TASKS
} | {"mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown GLUE task {task!r}; valid: {', '.join(TASKS)}")


def source_splits(task: str) -> tuple[str, ...]:
    """The Hub splits the protocol reads for ``task`` (train and the labelled validation split(s))."""
    _check_task(task)
    return ("train", "validation_matched", "validation_mismatched") if task == "mnli" else ("train", "validation")


# ---------------------------------------------------------------------------------------------- loading

def _split_files(root: Path, task: str, split: str) -> list[str]:
    return sorted(str(p) for p in (root / task).glob(f"{split}-*.parquet"))


def check_root(root: str | Path, tasks: Sequence[str]) -> Path:
    """Validate a local GLUE root (Hub layout) for ``tasks``; raise DataError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"GLUE root {str(root)!r} does not exist or is not a directory")
    if not tasks:
        raise DataError("no GLUE tasks given")
    for t in tasks:
        _check_task(t)
        if not (root / t).is_dir():
            raise DataError(f"GLUE root {str(root)!r} has no folder {t}/ (expected {root / t}/<split>-*.parquet)")
        for s in source_splits(t):
            if not _split_files(root, t, s):
                raise DataError(f"missing {root / t}/{s}-*.parquet for GLUE task {t!r}")
    return root


@contextmanager
def _quiet_datasets():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


@lru_cache(maxsize=64)
def _load(task: str, root: str | None, cache_dir: str | None):
    import datasets

    if root is None:
        try:
            return datasets.load_dataset(HUB_NAME, task, cache_dir=cache_dir)
        except Exception as e:  # network, auth, missing cache: all mean the same thing to the user
            raise DataError(f"could not load {HUB_NAME}/{task} from the Hub (needs internet or a cached copy; "
                            f"or pass a local root in the Hub layout): {_why(e)}") from None
    r = Path(root)
    files = {s: _split_files(r, task, s) for s in SPLITS[task]}
    files = {s: f for s, f in files.items() if f}
    try:
        with _quiet_datasets():
            dd = datasets.load_dataset("parquet", data_files=files, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(f"could not read {r / task}/*.parquet: {_why(e)}") from None
    for s, d in dd.items():
        missing = [c for c in COLUMNS[task] if c not in d.column_names]
        if missing:
            raise DataError(f"{files[s][0]} lacks column(s) {', '.join(missing)} of GLUE {task!r} "
                            f"(expected {', '.join(COLUMNS[task])})")
    return dd


def load_raw(task: str, root: str | Path | None = None, *, cache_dir: str | Path | None = None):
    """The task's Hub splits as a ``datasets.DatasetDict``: from the Hub when ``root`` is None (online),
    else from ``ROOT/<task>/<split>-*.parquet``. Cached per process."""
    _check_task(task)
    if root is not None:
        check_root(root, (task,))
        root = str(Path(root).resolve())
    return _load(task, root, None if cache_dir is None else str(cache_dir))


# ---------------------------------------------------------------------------------------------- splits

def _perm(n: int, seed: int) -> np.ndarray:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def effective_heldout(n_train: int, heldout: int = 1000) -> int:
    """Held-out count for a large task: ``heldout`` clamped to a fifth of the training split, so a tiny local
    copy keeps 80% for training (full GLUE, >= 67k examples, always gets exactly ``heldout``)."""
    if heldout < 1:
        raise DataError(f"heldout must be >= 1, got {heldout}")
    k = min(heldout, n_train // 5)
    if k < 1:
        raise DataError(f"a training split of {n_train} examples is too small to hold out a validation set "
                        f"(need >= 5)")
    return k


def split_indices(task: str, split: Split, sizes: Mapping[str, int], *, heldout: int = 1000,
                  seed: int = SEED) -> tuple[str, np.ndarray]:
    """(Hub split to read, sorted row indices into it) for ``split`` of ``task`` under the protocol.
    ``sizes`` maps Hub split names to row counts."""
    _check_task(task)
    if split not in ("train", "validation", "test"):
        raise DataError(f"unknown split {split!r}; valid: train, validation, test")
    if task == "mnli":
        src = {"train": "train", "validation": "validation_mismatched", "test": "validation_matched"}[split]
        return src, np.arange(sizes[src])
    if task in SMALL_TASKS:
        if split == "train":
            return "train", np.arange(sizes["train"])
        n = sizes["validation"]
        p = _perm(n, seed)
        half = p[: n // 2] if split == "validation" else p[n // 2:]
        return "validation", np.sort(half)
    # large tasks
    if split == "test":
        return "validation", np.arange(sizes["validation"])
    n = sizes["train"]
    k = effective_heldout(n, heldout)
    p = _perm(n, seed)
    return "train", np.sort(p[:k] if split == "validation" else p[k:])


# ---------------------------------------------------------------------------------------------- format

def target_text(task: str, label: int | float) -> str:
    """The T5 target for a gold label: the label word, or for STS-B the score rounded to 0.2 as ``"%.1f"``."""
    _check_task(task)
    names = LABEL_NAMES[task]
    if names is None:
        x = float(label)
        if not (math.isfinite(x) and 0.0 <= x <= 5.0):
            raise DataError(f"stsb label {label!r} is not a score in [0, 5]")
        return "%.1f" % (round(x * 5) / 5)
    if isinstance(label, bool) or int(label) != label or not 0 <= int(label) < len(names):
        raise DataError(f"{task} label {label!r} is not a class id in 0..{len(names) - 1}")
    return names[int(label)]


def format_example(task: str, row: Mapping[str, Any]) -> tuple[str, str]:
    """(source, target) in T5's format, e.g. ``"rte sentence1: A. sentence2: B."`` -> ``"not_entailment"``."""
    _check_task(task)
    try:
        parts = [task] + [f"{f}: {' '.join(str(row[f]).split())}" for f in TEXT_FIELDS[task]]
        label = row["label"]
    except KeyError as e:
        raise DataError(f"{task} row lacks field {e.args[0]!r}") from None
    return " ".join(parts), target_text(task, label)


def parse_prediction(task: str, text: str) -> int | float | None:
    """Decoded text -> class id (exact label word after stripping whitespace) or STS-B float; None when the
    text maps to no label (metrics count it wrong)."""
    _check_task(task)
    s = text.strip()
    names = LABEL_NAMES[task]
    if names is None:
        try:
            x = float(s)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return names.index(s) if s in names else None


# ---------------------------------------------------------------------------------------------- dataset

class GlueMixture(Dataset):
    """One split of the chosen GLUE tasks, concatenated in the given order (task id = position in ``tasks``).

    Items: ``{"source", "target", "task_id", "label", "example_id"}``; ``example_id`` indexes the
    concatenation (for hash routing and for matching predictions). ``task_slices[task]`` is that task's
    slice of the concatenation. ``limit`` keeps the first ``limit`` examples of each task's split
    (smoke tests, quick evaluation). ``mixing_cap`` is T5's K for ``sampler()`` (None = uncapped).
    """

    def __init__(self, root: str | Path | None, tasks: Sequence[str], split: Split, *, heldout: int = 1000,
                 limit: int | None = None, mixing_cap: int | None = None, seed: int = SEED,
                 cache_dir: str | Path | None = None):
        tasks = tuple(tasks)
        if not tasks:
            raise DataError("no GLUE tasks given")
        for t in tasks:
            _check_task(t)
        if len(set(tasks)) != len(tasks):
            raise DataError(f"duplicate GLUE task in {list(tasks)}")
        if root is not None:
            check_root(root, tasks)
        if limit is not None and limit < 1:
            raise DataError(f"limit must be >= 1 or None, got {limit}")
        if mixing_cap is not None and mixing_cap < 1:
            raise DataError(f"mixing_cap must be >= 1 or None, got {mixing_cap}")
        self.root, self.tasks, self.split, self.mixing_cap = root, tasks, split, mixing_cap
        self._data, self._idx, self._labels = [], [], []
        self.task_slices: dict[str, slice] = {}
        start = 0
        for t in tasks:
            dd = load_raw(t, root, cache_dir=cache_dir)
            src, idx = split_indices(t, split, {s: len(d) for s, d in dd.items()}, heldout=heldout, seed=seed)
            idx = idx[:limit] if limit is not None else idx
            if len(idx) == 0:
                raise DataError(f"GLUE {t!r} split {split!r} (from {src!r}) is empty under {root or HUB_NAME}")
            d = dd[src]
            lab = d.data.column("label").to_numpy()[idx]
            bad = (lab < 0) if LABEL_NAMES[t] is not None else ~((lab >= 0) & (lab <= 5))
            if bad.any():
                raise DataError(f"GLUE {t!r} {src!r} has unlabelled rows (label {lab[bad][0]}) under "
                                f"{root or HUB_NAME}; the protocol needs labels")
            self._data.append(d)
            self._idx.append(idx)
            self._labels.append(lab)
            self.task_slices[t] = slice(start, start + len(idx))
            start += len(idx)
        self._starts = [s.start for s in self.task_slices.values()]
        self._len = start

    def __len__(self) -> int:
        return self._len

    def locate(self, i: int) -> tuple[int, int]:
        """Example id -> (task id, row index in that task's Hub split)."""
        if not 0 <= i < self._len:
            raise IndexError(f"example id {i} out of range for {self._len} examples")
        t = bisect.bisect_right(self._starts, i) - 1
        return t, int(self._idx[t][i - self._starts[t]])

    def __getitem__(self, i: int) -> dict[str, Any]:
        t, row_i = self.locate(int(i))
        task = self.tasks[t]
        row = self._data[t][row_i]
        source, target = format_example(task, row)
        label = round(float(row["label"]), 6) if LABEL_NAMES[task] is None else int(row["label"])
        return {"source": source, "target": target, "task_id": t, "label": label, "example_id": int(i)}

    def labels(self, task: str) -> list[int | float]:
        """Gold labels of ``task`` in example-id order (STS-B: floats rounded to 6 decimals)."""
        lab = self._labels[self.tasks.index(task)]
        return [round(float(x), 6) for x in lab] if LABEL_NAMES[task] is None else [int(x) for x in lab]

    def task_sizes(self) -> dict[str, int]:
        return {t: s.stop - s.start for t, s in self.task_slices.items()}

    def sampler(self, *, num_samples: int | None = None, generator: torch.Generator | None = None) -> Sampler:
        """Examples-proportional mixing: uniform over the concatenation, or with ``mixing_cap`` K each task
        drawn at rate min(n_t, K) / sum_s min(n_s, K) (with replacement)."""
        if self.mixing_cap is None:
            return RandomSampler(self, num_samples=num_samples, generator=generator)
        w = torch.cat([torch.full((n,), min(n, self.mixing_cap) / n, dtype=torch.double)
                       for n in self.task_sizes().values()])
        return WeightedRandomSampler(w, num_samples or len(self), replacement=True, generator=generator)


def score_predictions(mixture: GlueMixture, texts: Mapping[int, str] | Sequence[str]) -> dict[str, dict[str, float]]:
    """Decoded texts (indexed by example id; every example needed) -> ``{task: {metric: value}}``."""
    from smear.metrics import glue_task_metrics

    if len(texts) != len(mixture):
        raise ValueError(f"got {len(texts)} predictions for {len(mixture)} examples")
    out = {}
    for t, sl in mixture.task_slices.items():
        preds = [parse_prediction(t, texts[i]) for i in range(sl.start, sl.stop)]
        out[t] = glue_task_metrics(t, preds, mixture.labels(t))
    return out


# ---------------------------------------------------------------------------------------------- collate

def make_collate(tokenizer, max_source_len: int = 128, max_target_len: int = 16) -> Callable[[list[dict]], dict]:
    """Collate GlueMixture items into ``input_ids``/``attention_mask`` (B, S), ``labels`` (B, T) with padding
    set to -100, ``task_ids``/``example_ids`` (B,) long, and the lists ``target_texts`` and ``gold``.
    Sources are truncated to ``max_source_len`` tokens; a target longer than ``max_target_len`` is an error
    (a truncated label word could never be parsed back). Padding is to the longest in the batch."""

    def collate(batch: list[dict]) -> dict[str, Any]:
        src = tokenizer([b["source"] for b in batch], max_length=max_source_len, truncation=True,
                        padding="longest", return_tensors="pt")
        tgt = tokenizer([b["target"] for b in batch], padding="longest", return_tensors="pt")
        if tgt["input_ids"].shape[1] > max_target_len:
            longest = batch[int(tgt["attention_mask"].sum(1).argmax())]["target"]
            raise DataError(f"target {longest!r} is longer than max_target_len={max_target_len} tokens")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)   # (B, T)
        return {
            "input_ids": src["input_ids"],                                        # (B, S)
            "attention_mask": src["attention_mask"],                              # (B, S)
            "labels": labels,
            "task_ids": torch.tensor([b["task_id"] for b in batch], dtype=torch.long),
            "example_ids": torch.tensor([b["example_id"] for b in batch], dtype=torch.long),
            "target_texts": [b["target"] for b in batch],
            "gold": [b["label"] for b in batch],
        }

    return collate
