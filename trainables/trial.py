"""Assembling one trial: everything a training step needs, built once from the trial's config.

:func:`assemble` is the one place where a config becomes a runnable trial: threads -> seed -> device ->
precision -> setting -> data check -> datasets and routed model -> placement -> optimizer -> the method's
two-pass flag and epoch order. The train loop (``trainables/loop.py``), the throughput measurement
(``trainables/throughput.py``) and the compute accounting (``trainables/accounting.py``) all start from it,
so what is timed and counted is what trains.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import smear.routing as routing
from smear.data.pipeline import DrawSampler
from trainables.checkpoints import TrialState
from trainables.config import TrainConfig
from trainables.precision import Precision, resolve_precision
from trainables.session import Session
from trainables.settings import Batch, Setting, get_setting, make_config
from trainables.step import train_step

SPLITS = ("train", "val", "test")


class NoGPU(RuntimeError):
    """The trial asked for a GPU (use_gpu) on a node where torch sees no CUDA device."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(cfg: TrainConfig) -> torch.device:
    if not cfg.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():  # never train silently on the CPU of a GPU trial
        raise NoGPU(f"use_gpu=True but torch sees no CUDA device on this node "
                    f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); "
                    "give the trial a GPU (resources.gpu / --gpus-per-trial) or set use_gpu: false")
    return torch.device("cuda", torch.cuda.current_device())


def build_data_and_model(setting: Setting, cfg: TrainConfig) -> tuple[tuple[Dataset, Dataset, Dataset], nn.Module]:
    """The train, val and test datasets and the routed model (on the CPU) of ``setting``. Hash routing gets a
    table entry for every example id of every split (ids index each split from 0), sized on a copy of the
    routing config, so that ``cfg`` stays what was validated, logged and checkpointed."""
    splits = tuple(setting.dataset(s) for s in SPLITS)
    return splits, setting.build_model(cfg.routing.sized_for(max(len(d) for d in splits)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
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


def make_loader(ds: Dataset, cfg: TrainConfig, session: Session, *, train: bool, epoch: int = 0,
                order: routing.EpochSampler | None = None, collate: Callable | None = None,
                device: torch.device | None = None, workers: int | None = None) -> DataLoader:
    """A split's DataLoader. Built once per trial and split: its workers (``data.loader_workers``, resolved with
    the session's CPUs; ``workers`` overrides it, e.g. 0 for a one-batch loader) persist across epochs, and
    :func:`set_epoch` moves a training loader to the next epoch. A dataset with ``seeded_draws`` gets
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
        set_epoch(loader, epoch)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """The training loader's order (and augmentation draws) for ``epoch``: call before iterating it."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


@dataclass
class Trial:
    """A trial assembled (:func:`assemble`): its config, setting, device and precision, datasets, the routed
    model (``core``; ``model`` is it wrapped for data parallelism, else the same), the optimiser and scheduler,
    and what its routing methods ask of the loop (a second pass, an epoch order)."""

    cfg: TrainConfig
    session: Session
    setting: Setting
    device: torch.device
    precision: Precision
    datasets: dict[str, Dataset]
    core: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    two_passes: bool
    order: routing.EpochSampler | None      # the method's epoch order (single worker), else None

    def loader(self, split: str, *, epoch: int = 0, workers: int | None = None) -> DataLoader:
        """The split's DataLoader (training: in the trial's epoch order, from ``epoch``)."""
        return make_loader(self.datasets[split], self.cfg, self.session, train=split == "train", epoch=epoch,
                           order=self.order, collate=self.setting.collate, device=self.device, workers=workers)

    def step(self, raw, step: int) -> torch.Tensor:
        """One optimiser step on a raw batch of the training loader; the loss stays on the device."""
        return train_step(self.setting, self.model, self.core, self.setting.batch_to_model(raw, self.device),
                          self.cfg, self.opt, self.sched, step, order=self.order, two_passes=self.two_passes,
                          precision=self.precision)

    def first_batch(self) -> Batch:
        """The first training batch of epoch 0, on the trial's device, as a fresh trial's first step gets it
        (in a fresh copy of the method's epoch order, on one loader process). Its augmentation draws leave the
        trial's RNG and its epoch order as they were."""
        order = routing.epoch_sampler(self.core, len(self.datasets["train"]), self.cfg.seed) \
            if self.session.world_size == 1 else None
        with torch.random.fork_rng(devices=[self.device.index] if self.device.type == "cuda" else []):
            raw = next(iter(make_loader(self.datasets["train"], self.cfg, self.session, train=True, epoch=0,
                                        order=order, collate=self.setting.collate, workers=0)))
        return self.setting.batch_to_model(raw, self.device)

    def resume(self) -> TrialState:
        """The trial's state: a fresh one, or the newest checkpoint's (the session's), loaded into the model,
        optimiser, scheduler and RNG. A session that replays on restore gets the checkpoint's evaluation once
        more (it may never have reached the record)."""
        ckpt_dir = self.session.latest_checkpoint_dir()
        if not ckpt_dir:
            return TrialState()
        try:  # everything is read into memory: the folder (a temporary copy of a remote one) can go after
            state, replayed = TrialState.load(ckpt_dir, self.cfg, self.core, self.opt, self.sched)
            if replayed is not None and getattr(self.session, "replays_on_restore", False):
                self.session.report(replayed, None)
            return state
        finally:
            self.session.release_checkpoint_dir(ckpt_dir)

    def checkpoint(self, state: TrialState, metrics: dict[str, Any]) -> None:
        """Report ``metrics`` with a checkpoint of ``state`` (rank 0; the other ranks report the metrics only)."""
        state.save(self.session, metrics, self.cfg, self.core, self.opt, self.sched, bf16=self.precision.bf16)


def assemble(config: dict[str, Any] | TrainConfig, session: Session, *,
             wrap_model: Callable[[nn.Module], nn.Module] | None = None, device: str | torch.device | None = None,
             verify_data: bool = True) -> Trial:
    """Build the trial ``config`` for ``session``. ``wrap_model``: Ray Train's ``prepare_model`` (DDP) in
    data-parallel runs; ``device``: this device instead of the config's (the compute accounting counts on the
    CPU); ``verify_data``: run the setting's data check first (the trial's first act, before any training)."""
    cfg = make_config(config)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    dev = select_device(cfg) if device is None else torch.device(device)
    precision = resolve_precision(cfg.precision, dev)
    setting = get_setting(cfg.setting)(cfg)
    if verify_data:
        setting.verify_data()  # a bad file fails here, not after hours of steps
    splits, built = build_data_and_model(setting, cfg)
    core = setting.place_model(built, dev)
    model = wrap_model(core) if wrap_model is not None else core
    opt, sched = make_optimizer(core, cfg)
    order = routing.epoch_sampler(core, len(splits[0]), cfg.seed) if session.world_size == 1 else None
    return Trial(cfg=cfg, session=session, setting=setting, device=dev, precision=precision,
                 datasets=dict(zip(SPLITS, splits)), core=core, model=model, opt=opt, sched=sched,
                 two_passes=routing.needs_two_passes(core), order=order)
