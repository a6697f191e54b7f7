"""One optimiser step of a trial: the loss it minimises (task loss + the routing methods' terms), backward,
clipping, the optimiser and scheduler steps; and :class:`LossMonitor`, which watches the losses on the device.

Used by the train loop, the throughput measurement and the compute accounting alike, so that what is timed
and counted is what trains. No host sync here: a step returns its loss on the device.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import smear.routing as routing
from trainables.config import TrainConfig
from trainables.precision import Precision
from trainables.settings import Setting


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf; the trial fails at once with this reason."""


class LossMonitor:
    """The training loss between evaluations, kept on the device, so that a step costs no host sync.

    :meth:`add` accumulates each step's loss (in float64, as the Python float sum it replaces) and keeps the
    first step whose loss is NaN or inf, and that loss, with ``torch.where`` against a step counter on the
    device. :meth:`check` reads that back (the one host sync) and raises :class:`NonFiniteLoss` naming the
    step; the loop calls it every ``nonfinite_check_every`` steps and before each evaluation, so that
    non-finite weights are never evaluated, reported or checkpointed.
    """

    def __init__(self, device: torch.device, step: int):
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0                                                          # added since the last mean
        self._step = torch.full((), step, dtype=torch.long, device=device)       # the step the next add() is
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)   # -1: every loss finite so far
        self._bad_value = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, loss: torch.Tensor) -> None:
        """Record one step's loss (a scalar) without reading it."""
        value = loss.detach().float()
        self._sum += value
        new = ~torch.isfinite(value) & (self._first_bad < 0)
        self._first_bad = torch.where(new, self._step, self._first_bad)
        self._bad_value = torch.where(new, value, self._bad_value)
        self._step += 1
        self.steps += 1

    def check(self) -> None:
        """Raise :class:`NonFiniteLoss` when a recorded loss was not finite (reads one number from the device)."""
        first = int(self._first_bad)
        if first >= 0:
            raise NonFiniteLoss(f"non-finite training loss {float(self._bad_value)} at step {first}")

    def mean_and_reset(self) -> float:
        """The mean loss since the last call (reads one number from the device), then start over."""
        mean = float(self._sum) / max(self.steps, 1)
        self._sum.zero_()
        self.steps = 0
        return mean


def task_loss(per_ex: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The task loss over the batch: sum (T5 reference, ``label_smoothed_nll_loss``) or mean (ResNet reference)."""
    return per_ex.sum() if cfg.batch_loss == "sum" else per_ex.mean()


def training_loss(setting: Setting, model: nn.Module, core: nn.Module, batch, cfg: TrainConfig, *,
                  two_passes: bool, precision: Precision | None = None) -> torch.Tensor:
    """The loss one optimiser step minimises: the task loss plus the methods' terms (``smear.routing.aux_loss``).

    With a two-pass method (AdaMix) a second stochastic forward adds the consistency loss; the task loss is
    the first pass's only, as in the official trainers (``adamix_task_loss="mean"`` averages both passes).
    The forward passes run under ``precision``'s autocast (None: float32); every loss term is float32 and is
    combined outside the autocast.
    """
    amp = precision.autocast if precision is not None else contextlib.nullcontext
    with amp():
        per_ex, logits, _ = setting.per_example_loss(model, batch)
    per_ex = per_ex.float()
    loss = task_loss(per_ex, cfg) + routing.aux_loss(core, per_ex.detach())
    if two_passes:
        with amp():
            per_ex2, logits2, _ = setting.per_example_loss(model, batch)
        per_ex2 = per_ex2.float()
        if cfg.routing.adamix_task_loss == "mean":
            loss = 0.5 * (loss + task_loss(per_ex2, cfg) + routing.aux_loss(core, per_ex2.detach()))
        loss = loss + routing.consistency_loss(core, logits, logits2)
    return loss


def train_step(setting: Setting, model: nn.Module, core: nn.Module, b, cfg: TrainConfig, opt, sched, step: int, *,
               order: routing.EpochSampler | None, two_passes: bool, precision: Precision) -> torch.Tensor:
    """One optimiser step on the model-ready batch ``b``: routing context, loss, backward, clipping, step.
    Returns the loss, still on the device (no host sync)."""
    routing.set_context(core, task_ids=b.groups, example_ids=b.ids, step=step)
    loss = training_loss(setting, model, core, b, cfg, two_passes=two_passes, precision=precision)
    if order is not None:
        order.observe(routing.routing_blocks(core), b.ids)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], cfg.grad_clip)
    opt.step()
    sched.step()
    return loss
