"""A trial's checkpoints: what training changes (trainable parameters and buffers), restored strictly, with
the resolved config that wrote them (a resume under another config is refused).

Each checkpoint folder ends with ``MANIFEST_FILE``: the step it holds and the size and SHA-256 of every
other file in it. Ray copies the folder into the sweep's storage before it registers it, but a driver or
node that dies mid-copy leaves a partial folder, and Tune's saved experiment state can name an older
checkpoint than the newest on disk (its snapshot lags by up to ~10 s) or one already rotated away. After a
trial resumed from such an unregistered checkpoint, Tune names its next one as it would have, so the copy
can land in the existing folder of that name: a copy cut short there leaves files of two checkpoints, of
the same sizes. :func:`newest_complete` picks, among candidate folders, the one with the highest step
whose files are all there with their digests.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smear.configs import flatten, to_dict

STATE_FILE, BEST_FILE, MANIFEST_FILE = "state.pt", "best.pt", "manifest.json"
REPORT_FILE = "report.json"  # the metrics reported with the checkpoint: replayed on a restore (see replay_report)


class CheckpointMismatch(RuntimeError):
    """A checkpoint that does not belong to this trial's config or model; never restored in part."""


def _partial_keys(model: nn.Module) -> set[str]:
    """What training changes: trainable parameters and all buffers (BN statistics, hash tables)."""
    return {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}


def _partial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    keys = _partial_keys(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keys}


def _restore(model: nn.Module, saved: dict[str, torch.Tensor], what: str) -> None:
    """Load a partial state with ``strict=True``: exactly the model's trainable parameters and buffers,
    no key missing, none unexpected (a partial restore would silently train from a mix)."""
    expected = _partial_keys(model)
    missing, unexpected = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
    if missing or unexpected:
        raise CheckpointMismatch(f"{what} does not match the model: {len(missing)} missing keys "
                                 f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    full = model.state_dict()
    full.update(saved)
    model.load_state_dict(full, strict=True)


def _config_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first flattened key whose value differs between two resolved configs, as 'key: a != b'."""
    a, b = flatten(saved), flatten(current)
    for k in sorted(a.keys() | b.keys()):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            return f"{k}: {a.get(k, '<absent>')!r} in the checkpoint != {b.get(k, '<absent>')!r} now"
    return None


def _report_with_checkpoint(session, metrics, cfg, core, opt, best_state, **counters) -> None:
    if session.world_rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": _partial_state(core), "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    "config": to_dict(cfg), **counters}, Path(d) / STATE_FILE)
        if best_state is not None:
            torch.save(best_state, Path(d) / BEST_FILE)
        (Path(d) / REPORT_FILE).write_text(json.dumps(metrics))
        _write_manifest(Path(d), counters["step"])
        session.report(metrics, d)


@dataclass
class TrialState:
    """What a trial's checkpoint holds besides the weights and the optimiser: where training is, and the best
    validation score and weights so far. :meth:`load` restores a checkpoint into a trial's model, optimiser,
    scheduler and RNG and returns its state; :meth:`save` reports metrics with a checkpoint of it."""

    step: int = 0
    best_val: float = -math.inf
    best_state: dict[str, torch.Tensor] | None = None
    epoch: int = 0
    batch_in_epoch: int = 0          # batches of ``epoch`` already trained on (a resume skips them)
    bf16: bool | None = None         # the precision the reports recorded so far (None: nothing reported yet)

    @classmethod
    def load(cls, ckpt_dir: str | Path, cfg, core: nn.Module, opt, sched) -> tuple["TrialState", dict | None]:
        """The state of the checkpoint in ``ckpt_dir``, restored strictly into ``core``, ``opt``, ``sched`` and
        torch's RNG (refused, :class:`CheckpointMismatch`, when written under another config), and the metrics
        reported with it (:func:`replay_report`). Everything is read into memory: the folder can go after."""
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
        diff = _config_difference(state.get("config", {}), to_dict(cfg))
        if diff is not None:  # what ran must be what is recorded: no resume under another config
            raise CheckpointMismatch(f"checkpoint {ckpt_dir} was written under another config ({diff})")
        _restore(core, state["model"], f"checkpoint {ckpt_dir}")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        best = Path(ckpt_dir) / BEST_FILE
        best_state = torch.load(best, map_location="cpu", weights_only=True) if best.exists() else None
        return cls(step=state["step"], best_val=state["best_val"], best_state=best_state, epoch=state["epoch"],
                   batch_in_epoch=state["batch_in_epoch"], bf16=state.get("bf16")), replay_report(ckpt_dir)

    def save(self, session, metrics: dict, cfg, core: nn.Module, opt, sched, *, bf16: bool) -> None:
        """Report ``metrics`` with a checkpoint of this state (rank 0; other ranks report the metrics only);
        ``bf16``: the precision that ran."""
        _report_with_checkpoint(session, metrics, cfg, core, opt, self.best_state, scheduler=sched.state_dict(),
                                step=self.step, best_val=self.best_val, epoch=self.epoch,
                                batch_in_epoch=self.batch_in_epoch, bf16=bf16)


def replay_report(ckpt_dir: str | Path) -> dict | None:
    """The metrics reported with the checkpoint in ``ckpt_dir`` (None for one written without them).

    A restore reports them again before training on: the checkpoint's own evaluation may never have reached
    the record (a driver killed between the trial's report and the tracker's write, a checkpoint found on
    disk newer than the one Tune registered). The tracker logs each step once, so a replayed step already
    recorded is skipped, and a missing one fills the hole."""
    try:
        return json.loads((Path(ckpt_dir) / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, step: int) -> None:
    files = [f for f in folder.iterdir() if f.is_file()]
    (folder / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": {f.name: f.stat().st_size for f in files},
                                                    "sha256": {f.name: _sha256(f) for f in files}}))


def checkpoint_step(folder: str | Path) -> int | None:
    """The step a checkpoint folder holds if it is complete (its manifest, and every file it lists at its
    size and, for manifests that have digests, with its SHA-256), else None."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files, digests = manifest["files"], manifest.get("sha256", {})
        complete = all((folder / name).is_file() and (folder / name).stat().st_size == size
                       for name, size in files.items())
        complete = complete and all(_sha256(folder / name) == digests[name] for name in files if name in digests)
        return int(manifest["step"]) if complete and STATE_FILE in files else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _manifest_step(folder: Path) -> int | None:
    """The step a folder's manifest names (nothing verified), or None without a readable one."""
    try:
        return int(json.loads((folder / MANIFEST_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_complete(folders) -> str | None:
    """The complete checkpoint folder with the highest step among ``folders`` (None if there is none).
    Folders are verified newest first, so the files of older ones are not hashed once a newer one is whole."""
    ranked = sorted(((step, str(f)) for f in folders if (step := _manifest_step(Path(f))) is not None), reverse=True)
    return next((f for _, f in ranked if checkpoint_step(f) is not None), None)
