"""DomainNet in its official layout: ``ROOT/<domain>_{train,test}.txt`` lines ``<relative path> <label>``.

Splits (methods.md section 2): train = 80% of each domain's official train list (shuffled with
seed 42), validation = the other 20%, test = the official ``<domain>_test.txt``.
Each item is ``(image, label, domain id, example id, draw)`` (see :class:`DomainNetDataset`); the example
id indexes the concatenated split (for hash routing). Images become 8-bit RGB as
``smear.data.images.to_rgb`` makes them: alpha is composited on white and 16-bit greys are scaled to 8 bits.
``python -m smear.data.prepare`` writes a pre-resized copy of a root, in the same format.
``check_root`` is the light start-up check. ``smear.data.check.check_domainnet`` checks every line and
every image before training.
"""
from __future__ import annotations

import codecs
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from smear.data import pipeline
from smear.data.images import plain_format

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
Split = Literal["train", "val", "test"]


class DataError(ValueError):
    """A missing or malformed dataset; one-line message naming the bad path or value."""


@dataclass(frozen=True)
class Record:
    path: str
    label: int
    domain: int


_LABEL = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also take "+3", "3_0" and "٣"
Entry = tuple[int, str, int]       # (line number, relative path, label)


def parse_list(data: bytes, name: str) -> tuple[list[Entry], list[tuple[int, str]]]:
    """Parse a split file's bytes into ``(line, path, label)`` entries and ``(line, message)`` problems.

    UTF-8 with or without a BOM; LF or CRLF line ends; blank (or whitespace-only) lines are skipped.
    Each other line is ``<relative path> <label>``, split at its last run of whitespace, the label a
    base-10 integer (negative labels parse, range is checked elsewhere). A UTF-16 file is one problem
    at line 1; a non-UTF-8 line is a problem and the other lines are still parsed. Messages are one
    line and start with ``"<name> line <n>: "``.
    """
    problems: list[tuple[int, str]] = []
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return [], [(1, f"{name} line 1: is UTF-16 (byte-order mark 0x{data[:2].hex()}); expected UTF-8")]
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = []
        for n, raw in enumerate(data.split(b"\n"), 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems.append((n, f"{name} line {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
                lines.append("")
    entries: list[Entry] = []
    for n, line in enumerate(lines, 1):
        parts = line.rsplit(None, 1)
        if not parts:
            continue
        if len(parts) != 2:
            shown = line.strip()
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            problems.append((n, f"{name} line {n}: expected '<relative path> <label>', got {shown!r}"))
        elif not _LABEL.fullmatch(parts[1]):
            problems.append((n, f"{name} line {n}: label {parts[1]!r} is not an integer"))
        else:
            entries.append((n, parts[0].lstrip(), int(parts[1])))
    return entries, problems


def _read_list(root: Path, domain: str, which: str) -> list[Record]:
    f = root / f"{domain}_{which}.txt"
    if not f.is_file():
        raise DataError(f"missing list file {f} for domain {domain!r}")
    entries, problems = parse_list(f.read_bytes(), f.name)
    if problems:
        raise DataError(min(problems)[1])
    d = DOMAINS.index(domain) if domain in DOMAINS else -1
    return [Record(path, label, d) for _, path, label in entries]


def check_root(root: str | Path, domains: tuple[str, ...] | list[str]) -> Path:
    """The light check: the root is a folder, the domains are DomainNet's and both split files exist.

    Raise DataError naming what is missing. It reads no file, so every dataset runs it on construction.
    ``smear.data.check.check_domainnet`` is the thorough check, run once before training.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist or is not a directory")
    for d in domains:
        if d not in DOMAINS:
            raise DataError(f"unknown domain {d!r}; valid: {', '.join(DOMAINS)}")
        for which in ("train", "test"):
            if not (root / f"{d}_{which}.txt").is_file():
                raise DataError(f"data root {str(root)!r} has no {d}_{which}.txt")
    return root


def split_records(root: str | Path, domains: list[str] | tuple[str, ...], split: Split, *,
                  val_fraction: float = 0.2, seed: int = 42) -> list[Record]:
    """The records of ``split`` over ``domains``, domain ids renumbered 0..len(domains)-1 in the given order."""
    root = check_root(root, domains)
    out: list[Record] = []
    for di, d in enumerate(domains):
        if split == "test":
            recs = _read_list(root, d, "test")
        else:
            recs = _read_list(root, d, "train")
            order = list(range(len(recs)))
            random.Random(seed).shuffle(order)
            n_val = int(round(len(recs) * val_fraction))
            keep = order[:n_val] if split == "val" else order[n_val:]
            recs = [recs[i] for i in sorted(keep)]
        out.extend(Record(r.path, r.label, di) for r in recs)
    return out


def num_classes(root: str | Path, domains: list[str] | tuple[str, ...]) -> int:
    """1 + the largest label in the domains' official train lists (345 for DomainNet)."""
    return 1 + max(r.label for d in domains for r in _read_list(Path(root), d, "train"))


class DomainNetDataset(Dataset):
    """One split of DomainNet over the chosen domains (decoding and cropping: ``smear.data.pipeline``).

    An item is ``(image, label, domain id, example id, draw)``. With ``decode_on="workers"`` the image is the
    (3, resolution, resolution) uint8 crop; with ``"device"`` it is the file's bytes (a plain JPEG) or its
    full (3, H, W) uint8 pixels (other files), which ``pipeline.to_model_input`` decodes and crops on the
    model's device. The draw seeds the training augmentation (``pipeline.NO_DRAW`` when the transform is
    deterministic). The key is an index, or ``(index, draw)`` from a ``pipeline.DrawSampler`` (the trial's
    loaders; ``seeded_draws``); a bare index draws from torch's global RNG. ``cache=True`` keeps each file's
    decoded pixels (or bytes) in memory, per loader worker.
    """

    seeded_draws = True

    def __init__(self, root: str | Path, domains: list[str] | tuple[str, ...], split: Split, *,
                 resolution: int = 224, augment: Literal["paper", "none"] = "paper",
                 decode_on: Literal["workers", "device"] = "workers", cache: bool = False):
        self.root, self.domains, self.split = Path(root), tuple(domains), split
        self.records = split_records(root, domains, split)
        self.resolution, self.augment, self.decode_on = resolution, augment, decode_on
        self.random = split == "train" and augment == "paper"   # RandomResizedCrop + flip; else deterministic
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def _data(self, i: int) -> torch.Tensor:
        """Full (3, H, W) uint8 pixels, or with ``decode_on="device"`` a plain JPEG's bytes (1-D uint8)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path = self.root / self.records[i].path
        try:
            data = pipeline.read_bytes(str(path))
        except FileNotFoundError:
            raise DataError(f"image {str(path)!r} listed in {self.domains[self.records[i].domain]}_*.txt is missing") from None
        if self.decode_on == "workers" or plain_format(data.numpy()) != "JPEG":
            data = pipeline.decode(data)
        if self._cache is not None:
            self._cache[i] = data
        return data

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int, int]:
        i, draw = key if isinstance(key, tuple) else (key, int(torch.randint(pipeline.DRAW_HIGH, ())))
        draw = draw if self.random else pipeline.NO_DRAW
        data, r = self._data(i), self.records[i]
        if self.decode_on == "workers":
            data = pipeline.resize_crop(data, draw, self.resolution, self.augment)
        return data, r.label, r.domain, i, draw
