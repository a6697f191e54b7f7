"""Compute accounting of a routed model (issue 14, item 2): parameters, and FLOPs of one training step.

What is measured, for a built model and one real batch of its setting:

- ``compute/params_trainable``, ``compute/params_total``: parameter counts (``model.parameters()``, shared
  tensors once, buffers excluded);
- ``compute/flops_per_example``: FLOPs of one training step of the whole model, forward + backward, on the
  real loss path (``trainables.step.training_loss``: the setting's ``per_example_loss``, the methods'
  auxiliary losses, AdaMix's second pass and consistency loss), in train mode, divided by the batch size;
- ``compute/routing_flops_per_example``: the part of that count spent inside the
  :class:`~smear.routing.ExpertRoutingBlock` s (their forward and the backward of the ops their forward
  created), divided by the batch size;
- ``compute/forward_passes``: forwards per training step, 2 for a two-pass method
  (``smear.routing.needs_two_passes``: AdaMix), else 1. Both FLOP counts are those of the whole step, so they
  include AdaMix's second forward and its backward;
- ``compute/batch_size``: the examples of the measured batch. FLOPs per example depend on the batch only
  through padding: a T5 batch is padded to its longest source and target.

How FLOPs are counted: ``torch.utils.flop_counter.FlopCounterMode``'s formulas, which count matrix products
(mm, addmm, bmm, baddbmm, matmul via these, convolutions, attention kernels) as 2 FLOPs per multiply-add, and
count nothing for elementwise ops, reductions, normalisation (BatchNorm, LayerNorm), softmax, activations,
indexing or the optimizer step. ``addmm`` / ``baddbmm`` count their product only, not the added bias.

Routing attribution: FlopCounterMode's own per-module rows come from ``torch.utils.module_tracker``, which
leaves a module's backward when the gradients of its *inputs* are ready; a block whose inputs need no gradient
(ResNet's ``layer1.0``: frozen backbone below it) is never left, and with AdaMix it collected the whole backward
of the other pass (29.2M instead of 0.79M FLOPs per example, torch 2.14). Here the counter's tracker is replaced
by :class:`_BlockTracker`, which attributes a forward op to the block whose forward is running and a backward op
to the block whose forward created the autograd node being run (by the node's sequence number).

Nothing is changed by measuring: parameters are not stepped, gradients are taken with ``torch.autograd.grad``
(no ``.grad`` is written), and buffers (BatchNorm running statistics, hash tables), module train/eval flags,
the routing context and each block's latest output, and the torch (CPU and CUDA), Python and NumPy RNG states
are restored afterwards.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import smear.routing as routing
from trainables.config import TrainConfig
from trainables.names import (  # the metric names live in trainables/names.py (torch-free, read by the driver)
    BATCH_SIZE, FLOPS_PER_EXAMPLE, FORWARD_PASSES, METRIC_NAMES, PARAMS_TOTAL, PARAMS_TRAINABLE,
    ROUTING_FLOPS_PER_EXAMPLE,
)
from trainables.session import LocalSession
from trainables.settings import Batch, Setting, make_config
from trainables.step import training_loss
from trainables.trial import assemble

__all__ = ["BATCH_SIZE", "FLOPS_PER_EXAMPLE", "FORWARD_PASSES", "METRIC_NAMES", "PARAMS_TOTAL", "PARAMS_TRAINABLE",
           "ROUTING_FLOPS_PER_EXAMPLE", "StepFlops", "build_for_measure", "count_flops", "measure",
           "measure_trial_config", "parameter_counts", "preserved"]

GLOBAL = "Global"  # FlopCounterMode's key of the total count


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one counted step: ``total`` over every op, ``blocks`` per routing block (qualified module name)."""

    total: int
    blocks: dict[str, int]

    @property
    def routing(self) -> int:
        """FLOPs spent inside the routing blocks (forward and backward)."""
        return sum(self.blocks.values())


class _BlockTracker:
    """Stands in for FlopCounterMode's ``ModuleTracker``: ``parents`` is ``{"Global"}`` plus the routing block
    the current op belongs to.

    Forward: the block whose forward is running (forward pre/post hooks on the blocks). Backward: the block
    whose forward created the autograd node now running; each block call records the half-open range of
    autograd sequence numbers its forward assigned, and the running node's sequence number is looked up in
    them. Blocks do not nest.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self._blocks = blocks
        self._current: str | None = None
        self._start = 0
        self._starts: list[int] = []                 # sorted: blocks run one after the other
        self._spans: list[tuple[int, int, str]] = []  # (first, end) sequence numbers of one block call, name
        self._handles: list[Any] = []

    @property
    def parents(self) -> set[str]:
        node = torch._C._current_autograd_node()
        if node is None:  # forward
            return {GLOBAL} if self._current is None else {GLOBAL, self._current}
        name = self._owner(node._sequence_nr())
        return {GLOBAL} if name is None else {GLOBAL, name}

    def _owner(self, seq: int) -> str | None:
        i = bisect.bisect_right(self._starts, seq) - 1
        if i >= 0:
            first, end, name = self._spans[i]
            if first <= seq < end:
                return name
        return None

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            assert self._current is None, f"routing block {name} runs inside {self._current}"
            self._current, self._start = name, torch._C._autograd._get_sequence_nr()
        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            end = torch._C._autograd._get_sequence_nr()
            if end > self._start:
                self._starts.append(self._start)
                self._spans.append((self._start, end, name))
            self._current = None
        return hook

    def __enter__(self) -> "_BlockTracker":
        for name, block in self._blocks:
            self._handles.append(block.register_forward_pre_hook(self._pre(name)))
            self._handles.append(block.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *args: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current = None


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore on exit what running ``model`` can change: buffers (values, in place), every module's train flag,
    the routing context's fields and each routing block's latest output, and the torch (CPU and the model's
    CUDA devices), Python and NumPy RNG states. Parameters and their ``.grad`` are not saved: code run inside
    must not step or accumulate into them (:func:`count_flops` does neither)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    blocks = [b for _, b in routing.routing_blocks(model)]
    lasts = [(b, b.last) for b in blocks]
    contexts = {id(b.context): (b.context, dataclasses.replace(b.context)) for b in blocks}
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, flag in flags:
            m.training = flag
        for b, last in lasts:
            b.last = last
        for ctx, saved_ctx in contexts.values():
            for f in dataclasses.fields(saved_ctx):
                setattr(ctx, f.name, getattr(saved_ctx, f.name))


def count_flops(model: nn.Module, loss_fn: Callable[[], Tensor], *, backward: bool = True) -> StepFlops:
    """FLOPs of ``loss_fn()`` (a scalar loss computed with ``model``) and, when ``backward``, of the gradients
    of every trainable parameter of ``model`` (``torch.autograd.grad``: the ops ``loss.backward()`` runs, no
    ``.grad`` written). Counted with ``FlopCounterMode`` (see the module docstring for what it counts);
    ``blocks`` holds the FLOPs of each routing block of ``model`` by qualified module name (``""`` when
    ``model`` is itself a block). Runs under :func:`preserved`: nothing of ``model`` or the RNGs changes."""
    blocks = routing.routing_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _BlockTracker(blocks)  # the attribution described in the module docstring
    with preserved(model), counter:
        loss = loss_fn()
        if backward:
            torch.autograd.grad(loss, params, allow_unused=True)
    counts = counter.get_flop_counts()
    return StepFlops(total=int(sum(counts.get(GLOBAL, {}).values())),
                     blocks={name: int(sum(counts.get(name, {}).values())) for name, _ in blocks})


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements of ``model``; a tensor shared by several modules counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def measure(setting: Setting, model: nn.Module, batch: Batch, cfg: TrainConfig) -> dict[str, float]:
    """The compute metrics (:data:`METRIC_NAMES`) of ``model`` (the unwrapped routed model of ``setting``) on
    ``batch`` (``setting.batch_to_model`` output): parameter counts, and FLOPs of one training step as
    ``trainables.loop.train_loop`` runs it: train mode, the routing context set from the batch, the loss of
    ``trainables.step.training_loss`` (two forwards for a two-pass method: AdaMix), and its backward to the
    trainable parameters; per example = divided by the batch size. The model, its buffers and the RNG states
    are left as they were (:func:`preserved`)."""
    two_passes = routing.needs_two_passes(model)
    n = int(batch.ids.shape[0])

    def step() -> Tensor:
        model.train()
        routing.set_context(model, task_ids=batch.groups, example_ids=batch.ids)
        return training_loss(setting, model, model, batch, cfg, two_passes=two_passes)

    flops = count_flops(model, step)
    trainable, total = parameter_counts(model)
    return {PARAMS_TRAINABLE: float(trainable), PARAMS_TOTAL: float(total),
            FLOPS_PER_EXAMPLE: flops.total / n, ROUTING_FLOPS_PER_EXAMPLE: flops.routing / n,
            FORWARD_PASSES: 2.0 if two_passes else 1.0, BATCH_SIZE: float(n)}


def build_for_measure(config: dict[str, Any] | TrainConfig) -> tuple[Setting, nn.Module, Batch, TrainConfig]:
    """The setting, model and first training batch of a trial, assembled as ``trainables.loop.train_loop``
    assembles it (``trainables.trial.assemble``: seeded with the trial's seed, hash tables sized to the largest
    split; the first batch of epoch 0 in the method's epoch order), on the CPU and on one worker
    (``batch_size`` examples), without the data check (the launcher's). Changes the global RNG states
    (seeding) and the thread count, as the loop does; :func:`measure_trial_config` restores them."""
    trial = assemble(config, LocalSession(root=""), device="cpu", verify_data=False)
    return trial.setting, trial.core, trial.first_batch(), trial.cfg


def measure_trial_config(config: dict[str, Any] | TrainConfig) -> dict[str, float]:
    """:func:`measure` for a trial's config (a resolved config dict or a ``TrainConfig``), built by
    :func:`build_for_measure`, with the trial's ``torch_threads`` when set: for a report or a dry run. The
    caller's torch, Python and NumPy RNG states and thread count are left as they were."""
    cfg = make_config(config)
    py_state, np_state, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # assemble sets the trial's intra-op threads, as the loop
            return measure(*build_for_measure(cfg))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads(threads)
