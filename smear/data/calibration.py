"""Data in the real formats at the paper's sizes, for measuring a trial's throughput (``trainables/throughput.py``,
``--dry-run --estimate``): DomainNet's layout with photo-sized JPEGs, and GLUE's Hub layout with sources long
enough that every batch is the full ``max_source_len`` tokens. Not for training: the content is noise."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np


def _image_pool(n: int, rng: np.random.Generator, sides: tuple[int, int]) -> list[bytes]:
    """``n`` distinct JPEGs of photo-like content (smooth colour fields plus grain), sides in ``sides`` px."""
    from PIL import Image

    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_domainnet_jpegs(root: str | os.PathLike, train_lines: int, *, test_lines: int = 64,
                          sides: tuple[int, int] = (300, 500), classes: int = 345, seed: int = 0) -> Path:
    """A root in DomainNet's official layout (``<domain>/<class>/<file>.jpg``, ``<domain>_{train,test}.txt``,
    345 classes, the six domains) with ``train_lines`` training lines in all, each its own JPEG file (copies
    of 64 distinct photo-like images, sides drawn in ``sides``; DomainNet's photos are a few hundred pixels a
    side). Idempotent for the same arguments."""
    from smear.data.domainnet import DOMAINS

    root = Path(root)
    stamp = f"{train_lines} {test_lines} {sides} {classes} {seed}"
    marker = root / "THROUGHPUT_ROOT_OK"
    if marker.exists() and marker.read_text() == stamp:
        return root
    rng = np.random.default_rng(seed)
    pool = _image_pool(64, rng, sides)
    written = 0
    for di, domain in enumerate(DOMAINS):
        for split, total in (("train", train_lines), ("test", test_lines)):
            k = math.ceil(total / len(DOMAINS))
            lines = []
            for i in range(k):
                # the last train line of a domain has the last class: num_classes() = 345, as in DomainNet
                c = classes - 1 if split == "train" and i == k - 1 else (i * 7 + di) % classes
                rel = f"{domain}/c{c:03d}/{domain}_{split}_{i:06d}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(pool[written % len(pool)])
                written += 1
                lines.append(f"{rel} {c}\n")
            (root / f"{domain}_{split}.txt").write_text("".join(lines))
    marker.write_text(stamp)
    return root


_WORDS = ("the", "a", "river", "quiet", "engine", "market", "council", "studied", "report", "between", "under",
          "north", "seven", "bright", "measured", "policy", "garden", "signal", "across", "winter", "library")


def write_glue_long(root: str | os.PathLike, examples: int, *, chars: int = 400, seed: int = 0) -> Path:
    """A GLUE root in the Hub's layout (``<task>/<split>-00000-of-00001.parquet``, the Hub's columns and dtypes)
    for the eight tasks, ``examples`` training rows each, every text field about ``chars`` characters: every
    source is at least ``max_source_len`` tokens, so a batch is the full 128 source tokens. Idempotent."""
    from datasets import ClassLabel, Dataset, Features, Value

    from smear.data.glue import COLUMNS, LABEL_NAMES, TASKS, _quiet_datasets, source_splits

    root = Path(root)
    marker = root / "THROUGHPUT_ROOT_OK"
    stamp = f"{examples} {chars} {seed}"
    if marker.exists() and marker.read_text() == stamp:
        return root
    rng = np.random.default_rng(seed)

    def text() -> str:
        words = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append(_WORDS[int(rng.integers(len(_WORDS)))])
        return " ".join(words) + "."

    for task in TASKS:
        names = LABEL_NAMES[task]
        label = Value("float32") if names is None else ClassLabel(names=list(names))
        feats = Features({c: label if c == "label" else Value("int32") if c == "idx" else Value("string")
                          for c in COLUMNS[task]})
        (root / task).mkdir(parents=True, exist_ok=True)
        for split in source_splits(task):
            n = examples if split == "train" else 16
            cols: dict[str, list] = {c: [] for c in COLUMNS[task]}
            for i in range(n):
                for c in COLUMNS[task]:
                    cols[c].append(i if c == "idx" else (float(i % 26) / 5 if names is None else i % len(names))
                                   if c == "label" else text())
            with _quiet_datasets():
                Dataset.from_dict(cols, features=feats).to_parquet(str(root / task / f"{split}-00000-of-00001.parquet"))
    marker.write_text(stamp)
    return root
