"""The train loop of one trial, independent of how it is run (Tune trial, Ray Train worker, plain call).

Reads a TrainConfig once, builds model + data, restores from a checkpoint when given one, trains for
``steps`` optimizer steps, evaluates every ``eval_every`` steps (validation accuracy overall and per
domain, routing statistics), reports metrics with a checkpoint, and at the end reports the test
accuracy of the best-validation weights. Nothing method-specific lives here: routing methods add their
losses through ``smear.routing.aux_loss`` and friends.

Precision (``precision``): the forward passes, training and evaluation, run under a bf16 autocast when the
resolved precision is bf16 (:func:`resolve_precision`); losses are float32. The first report of a trial
carries ``system/bf16`` (1.0 or 0.0: what ran), again after a resume only if it changed.

No host sync per step: the running loss and the first non-finite loss stay on the device
(:class:`_LossMonitor`); the loop reads them every ``nonfinite_check_every`` steps and at each evaluation.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import smear.routing as routing
from smear.configs import to_dict
from smear.data.pipeline import DrawSampler
from trainables.checkpoints import (
    BEST_FILE, STATE_FILE, CheckpointMismatch, _config_difference, _partial_state, _report_with_checkpoint, _restore,
    replay_report,
)
from trainables.config import TrainConfig, make_config
from trainables.evaluation import evaluate
from trainables.precision import Precision, resolve_precision
from trainables.settings import Setting, get_setting

SECONDS_PER_STEP, TRAIN_HOURS = "compute/seconds_per_step", "compute/train_hours"  # measured, so never bit-equal
ROUTING_HEATMAP = "routing_heatmap"  # key of the final report holding the specialisation heatmaps


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf; the trial fails at once with this reason."""


class NoGPU(RuntimeError):
    """The trial asked for a GPU (use_gpu) on a node where torch sees no CUDA device."""


class Session(Protocol):
    """Where a train loop reports: Ray Tune, Ray Train, or a plain local run. A session may also say how many
    CPUs the trial holds (``cpus``), which ``data.loader_workers: -1`` resolves against; without it, the
    CPUs this process may use."""

    world_rank: int
    world_size: int

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...
    def latest_checkpoint_dir(self) -> str | None: ...
    def release_checkpoint_dir(self, path: str) -> None:
        """The loop has read ``path`` (from :meth:`latest_checkpoint_dir`): a temporary copy can go."""


@dataclass
class LocalSession:
    """A session without Ray (tests, benchmarks): keeps reports in memory, checkpoints in ``root``."""

    root: str
    world_rank: int = 0
    world_size: int = 1
    cpus: float | None = None

    def __post_init__(self) -> None:
        self.reports: list[dict[str, float]] = []
        self._latest: str | None = None
        self._saved = 0

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            self._saved += 1
            dest = Path(self.root) / f"checkpoint_{self._saved:06d}"
            dest.mkdir(parents=True, exist_ok=True)
            for f in Path(checkpoint_dir).iterdir():
                os.replace(f, dest / f.name)
            self._latest = str(dest)

    def latest_checkpoint_dir(self):
        return self._latest

    def release_checkpoint_dir(self, path):
        pass  # its own checkpoint folder, kept


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(cfg: TrainConfig) -> torch.device:
    if not cfg.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # never train silently on the CPU of a GPU trial
        raise NoGPU(f"use_gpu=True but torch sees no CUDA device on this node "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); "
                    "give the trial a GPU (resources.gpu / --gpus-per-trial) or set use_gpu: false")
    return torch.device("cuda", torch.cuda.current_device())


class _LossMonitor:
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


def _task_loss(per_ex: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
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
    loss = _task_loss(per_ex, cfg) + routing.aux_loss(core, per_ex.detach())
    if two_passes:
        with amp():
            per_ex2, logits2, _ = setting.per_example_loss(model, batch)
        per_ex2 = per_ex2.float()
        if cfg.routing.adamix_task_loss == "mean":
            loss = 0.5 * (loss + _task_loss(per_ex2, cfg) + routing.aux_loss(core, per_ex2.detach()))
        loss = loss + routing.consistency_loss(core, logits, logits2)
    return loss


def build_data_and_model(setting: Setting, cfg: TrainConfig) -> tuple[tuple[Dataset, Dataset, Dataset], nn.Module]:
    """The train, val and test datasets and the routed model (on the CPU) of ``setting``. Hash routing gets a
    table entry for every example id of every split (ids index each split from 0), sized on a copy of the
    routing config, so that ``cfg`` stays what was validated, logged and checkpointed."""
    splits = tuple(setting.dataset(s) for s in ("train", "val", "test"))
    return splits, setting.build_model(cfg.routing.sized_for(max(len(d) for d in splits)))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam / AdamW over the trainable parameters, with the learning-rate multipliers methods declare
    (latent skills); linear warmup over ``warmup_steps``, then constant (methods.md section 2)."""
    groups = routing.optimizer_param_groups(model, cfg.lr)
    opt = (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(groups, lr=cfg.lr)
    warm = max(cfg.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


class _Shuffle(Sampler):
    """A random permutation per epoch, from (seed, epoch) alone: a resumed epoch gets the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)).tolist()

    def __len__(self) -> int:
        return self.size


def _loader(ds: Dataset, cfg: TrainConfig, session: Session, *, train: bool, epoch: int = 0,
            order: routing.EpochSampler | None = None, collate: Callable | None = None,
            device: torch.device | None = None, workers: int | None = None) -> DataLoader:
    """A split's DataLoader. Built once per trial and split: its workers (``data.loader_workers``, resolved with
    the session's CPUs; ``workers`` overrides it, e.g. 0 for a one-batch loader) persist across epochs, and
    :func:`_set_epoch` moves a training loader to the next epoch. A dataset with ``seeded_draws`` gets
    ``(index, draw)`` keys (``smear.data.pipeline.DrawSampler``). On CUDA the batches are pinned, so that the
    copies to the device do not block."""
    bs = (cfg.batch_size // session.world_size) if train else cfg.eval_batch_size
    if train and order is not None:  # a method orders the epoch (adaptive gating's curriculum; single worker)
        sampler = order
    elif session.world_size > 1:
        sampler = DistributedSampler(ds, num_replicas=session.world_size, rank=session.world_rank,
                                     shuffle=train, seed=cfg.seed, drop_last=train)
    else:
        sampler = _Shuffle(len(ds), cfg.seed) if train else SequentialSampler(ds)
    if getattr(ds, "seeded_draws", False):
        sampler = DrawSampler(sampler, len(ds), cfg.seed)
    workers = cfg.data.workers(getattr(session, "cpus", None)) if workers is None else workers
    # the generator only seeds the workers' RNGs: the global RNG (dropout, routing noise) is left untouched
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    loader = DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=train, num_workers=workers, generator=gen,
                        persistent_workers=workers > 0, collate_fn=collate,
                        pin_memory=device is not None and device.type == "cuda")
    if train:
        _set_epoch(loader, epoch)
    return loader


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """The training loader's order (and augmentation draws) for ``epoch``: call before iterating it."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def train_step(setting: Setting, model: nn.Module, core: nn.Module, b, cfg: TrainConfig, opt, sched, step: int, *,
               order: routing.EpochSampler | None, two_passes: bool, precision: Precision) -> torch.Tensor:
    """One optimiser step on the model-ready batch ``b`` (the trial's, and the throughput benchmark's): routing
    context, loss, backward, clipping, step. Returns the loss, still on the device (no host sync)."""
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


def train_loop(config: dict[str, Any] | TrainConfig, session: Session,
               wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, float]:
    """Run one trial. ``wrap_model`` is Ray Train's ``prepare_model`` (DDP) in data-parallel runs."""
    cfg = make_config(config)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    device = _device(cfg)
    precision = resolve_precision(cfg.precision, device)
    setting = get_setting(cfg.setting)(cfg)
    setting.verify_data()  # before any training: a bad file fails here, not after hours of steps
    primary = f"val/{setting.primary_metric}"
    (train_ds, val_ds, test_ds), built = build_data_and_model(setting, cfg)
    core = setting.place_model(built, device)
    model = wrap_model(core) if wrap_model is not None else core
    opt, sched = _optimizer(core, cfg)

    step, best_val, best_state, epoch, skip = 0, -math.inf, None, 0, 0
    ran_bf16: bool | None = None  # what the reports have recorded so far (the checkpoint's, on a resume)
    ckpt_dir = session.latest_checkpoint_dir()
    if ckpt_dir:
        try:  # everything is read into memory: the folder (a temporary copy of a remote one) can go after
            state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
            diff = _config_difference(state.get("config", {}), to_dict(cfg))
            if diff is not None:  # what ran must be what is recorded: no resume under another config
                raise CheckpointMismatch(f"checkpoint {ckpt_dir} was written under another config ({diff})")
            _restore(core, state["model"], f"checkpoint {ckpt_dir}")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step, best_val, epoch, skip = state["step"], state["best_val"], state["epoch"], state["batch_in_epoch"]
            ran_bf16 = state.get("bf16")
            torch.set_rng_state(state["torch_rng"])
            if (Path(ckpt_dir) / BEST_FILE).exists():
                best_state = torch.load(Path(ckpt_dir) / BEST_FILE, map_location="cpu", weights_only=True)
            replayed = replay_report(ckpt_dir)
            if replayed is not None and getattr(session, "replays_on_restore", False):
                session.report(replayed, None)  # its evaluation may never have reached the record: once more
        finally:
            session.release_checkpoint_dir(ckpt_dir)

    val_loader = _loader(val_ds, cfg, session, train=False, collate=setting.collate, device=device)
    two_passes = routing.needs_two_passes(core)
    order = routing.epoch_sampler(core, len(train_ds), cfg.seed) if session.world_size == 1 else None
    # compute accounting (issue 14): parameters and FLOPs of one training step, in the first report
    compute = _measure_compute(setting, core, train_ds, cfg, session, device) if step == 0 else {}
    # the resolved precision goes into the first report, and after a resume only when it changed (another node)
    pending = {"system/bf16": float(precision.bf16)} if ran_bf16 != precision.bf16 else {}
    monitor = _LossMonitor(device, step)
    model.train()
    clock, total_train_s = time.perf_counter(), 0.0  # training time, evaluations left out
    train_loader = _loader(train_ds, cfg, session, train=True, epoch=epoch, order=order, collate=setting.collate,
                           device=device)
    while step < cfg.steps:
        _set_epoch(train_loader, epoch)
        for i, batch in enumerate(train_loader):
            if i < skip:  # resumed mid-epoch: the same order, without the batches already trained on
                continue
            loss = train_step(setting, model, core, setting.batch_to_model(batch, device), cfg, opt, sched, step,
                              order=order, two_passes=two_passes, precision=precision)
            monitor.add(loss)                                   # on the device: no host sync
            step += 1
            evaluating = step % cfg.eval_every == 0 or step == cfg.steps
            if evaluating or step % cfg.nonfinite_check_every == 0:
                monitor.check()                                 # the one host sync of these steps
            if evaluating:
                train_s = time.perf_counter() - clock           # training time since the last evaluation (synced)
                total_train_s += train_s
                seconds_per_step = train_s / max(monitor.steps, 1)
                metrics, _ = evaluate(setting, core, val_loader, device, "val", precision)
                metrics.update({"train/loss": monitor.mean_and_reset(), "train/lr": sched.get_last_lr()[0],
                                "step": step, "epoch": epoch, **pending, **compute, SECONDS_PER_STEP: seconds_per_step})
                pending, compute = {}, {}
                metrics.update({f"routing/{k}": v for k, v in routing.step_scalars(core).items()})
                if metrics[primary] > best_val:
                    best_val, best_state = metrics[primary], _partial_state(core)
                metrics[f"val/best_{setting.primary_metric}"] = best_val
                _report_with_checkpoint(session, metrics, cfg, core, opt, best_state, scheduler=sched.state_dict(),
                                        step=step, best_val=best_val, epoch=epoch, batch_in_epoch=i + 1,
                                        bf16=precision.bf16)
                clock = time.perf_counter()
            if step >= cfg.steps:
                break
        epoch, skip = epoch + 1, 0

    # test accuracy of the best validation weights
    if best_state is not None:
        _restore(core, best_state, "the best-validation weights")
    del train_loader, val_loader  # their workers end here
    final, heat = evaluate(setting, core, _loader(test_ds, cfg, session, train=False, collate=setting.collate,
                                                  device=device), device, "test", precision)
    final.update({"step": step, f"val/best_{setting.primary_metric}": best_val, "done": 1.0, **pending,
                  TRAIN_HOURS: total_train_s / 3600,  # this process's training time (since a restore, if any)
                  # specialisation (methods.md section 5): per block, group x expert mean routing weight on test
                  ROUTING_HEATMAP: {"groups": setting.group_names, "blocks": heat}})
    session.report(final, None)
    return final


def _measure_compute(setting: Setting, core: nn.Module, train_ds: Dataset, cfg: TrainConfig, session: Session,
                     device) -> dict[str, float]:
    """trainables.accounting on one training batch (rank 0 only); the batch's augmentation draws and the
    measurement leave training's RNG, weights and buffers exactly as they were."""
    if session.world_rank != 0:
        return {}
    from trainables import accounting

    with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        raw = next(iter(_loader(train_ds, cfg, session, train=True, epoch=0, collate=setting.collate, workers=0)))
    return accounting.measure(setting, core, setting.batch_to_model(raw, device), cfg)


