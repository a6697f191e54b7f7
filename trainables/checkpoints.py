"""A trial's checkpoints: what training changes (trainable parameters and buffers), restored strictly, with
the resolved config that wrote them (a resume under another config is refused)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smear.configs import flatten, to_dict

STATE_FILE, BEST_FILE = "state.pt", "best.pt"


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
        session.report(metrics, d)
