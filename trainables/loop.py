"""The train loop of one trial, independent of how it is run (Tune trial, Ray Train worker, plain call).

Reads a TrainConfig once, builds model + data, restores from a checkpoint when given one, trains for
``steps`` optimizer steps, evaluates every ``eval_every`` steps (validation accuracy overall and per
domain, routing statistics), reports metrics with a checkpoint, and at the end reports the test
accuracy of the best-validation weights. Nothing method-specific lives here: routing methods add their
losses through ``smear.routing.aux_loss`` and friends.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import smear.routing as routing
from smear.backbones.resnet import build_routed_resnet18
from smear.configs import build, to_dict
from smear.data.domainnet import DomainNetDataset, num_classes
from trainables.config import TrainConfig

STATE_FILE, BEST_FILE = "state.pt", "best.pt"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or inf; the trial fails at once with this reason."""


class Session(Protocol):
    """Where a train loop reports: Ray Tune, Ray Train, or a plain local run."""

    world_rank: int
    world_size: int

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...
    def latest_checkpoint_dir(self) -> str | None: ...


@dataclass
class LocalSession:
    """A session without Ray (tests, benchmarks): keeps reports in memory, checkpoints in ``root``."""

    root: str
    world_rank: int = 0
    world_size: int = 1

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Setting(Protocol):
    """What the loop needs from a setting (ResNet-DomainNet now, T5-GLUE later)."""

    group_names: list[str]  # tasks or domains, indexed by task id

    def build_model(self) -> nn.Module: ...
    def dataset(self, split: str) -> Dataset: ...
    def batch_to_model(self, batch, device) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]: ...
    def per_example_loss(self, model: nn.Module, inputs: dict[str, Any], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def predict(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor: ...


class ResNetDomainNet:
    """ResNet-18 on DomainNet (methods.md section 2): images -> class logits, task id = domain id."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.group_names = list(cfg.data.domains)
        self.num_classes = num_classes(cfg.data.root, cfg.data.domains)

    def build_model(self) -> nn.Module:
        return build_routed_resnet18(self.cfg.routing, num_classes=self.num_classes, num_tasks=len(self.group_names),
                                     pretrained=self.cfg.pretrained, backbone_bn=self.cfg.backbone_bn)

    def dataset(self, split: str) -> Dataset:
        d = self.cfg.data
        return DomainNetDataset(d.root, d.domains, split, resolution=d.resolution, augment=d.augment, cache=d.cache)

    def batch_to_model(self, batch, device):
        images, labels, domains, ids = batch
        return {"images": images.to(device, non_blocking=True)}, labels.to(device), (domains.to(device), ids.to(device))

    def per_example_loss(self, model, inputs, targets):
        logits = model(inputs["images"])                                    # (b, classes)
        return F.cross_entropy(logits, targets, reduction="none"), logits  # (b,), (b, classes)

    def predict(self, model, inputs):
        return model(inputs["images"]).argmax(-1)                           # (b,)


SETTINGS: dict[str, Callable[[TrainConfig], Setting]] = {"resnet_domainnet": ResNetDomainNet}


def _partial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters and all buffers (BN statistics, hash tables)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in trainable or k in buffers}


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters, with the learning-rate multipliers methods declare (latent skills)."""
    return torch.optim.Adam(routing.optimizer_param_groups(model, cfg.lr), lr=cfg.lr)


class _EvalAccumulator:
    """Accuracy overall and per group, and per-block routing statistics over an evaluation pass."""

    def __init__(self, groups: list[str]):
        self.groups = groups
        self.correct = torch.zeros(len(groups), dtype=torch.float64)
        self.total = torch.zeros(len(groups), dtype=torch.float64)
        self.route_sum: dict[str, torch.Tensor] = {}   # block -> (groups, n) sum of routing probs
        self.entropy_sum: dict[str, float] = {}

    def add(self, pred, target, group, probs: dict[str, torch.Tensor]) -> None:
        g = group.cpu()
        hit = (pred == target).cpu().double()
        self.correct.index_add_(0, g, hit)
        self.total.index_add_(0, g, torch.ones_like(hit))
        for name, p in probs.items():
            p = p.float().cpu()                                            # (b, n)
            acc = self.route_sum.setdefault(name, torch.zeros(len(self.groups), p.shape[1], dtype=torch.float64))
            acc.index_add_(0, g, p.double())
            self.entropy_sum[name] = self.entropy_sum.get(name, 0.0) + float(routing.entropy(p).sum())

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for t in [self.correct, self.total, *[self.route_sum[k] for k in sorted(self.route_sum)]]:
            dist.all_reduce(t)
        for k in sorted(self.entropy_sum):
            e = torch.tensor([self.entropy_sum[k]], dtype=torch.float64)
            dist.all_reduce(e)
            self.entropy_sum[k] = float(e)

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/accuracy": float(self.correct.sum() / self.total.sum().clamp_min(1))}
        for i, g in enumerate(self.groups):
            if self.total[i] > 0:
                out[f"{prefix}/{g}/accuracy"] = float(self.correct[i] / self.total[i])
        if prefix == "val":
            n_items = float(self.total.sum().clamp_min(1))
            for name, s in self.route_sum.items():
                short = name.replace("backbone.", "").replace(".routing", "")
                out[f"routing/{short}/entropy"] = self.entropy_sum[name] / n_items
                load = s.sum(0) / n_items
                for e, v in enumerate(load.tolist()):
                    out[f"routing/{short}/load_{e}"] = v
        return out

    def heatmaps(self) -> dict[str, list[list[float]]]:
        """Per block: group x expert mean routing probability."""
        return {k: (s / self.total.clamp_min(1)[:, None]).tolist() for k, s in self.route_sum.items()}


@torch.no_grad()
def evaluate(setting: Setting, model: nn.Module, loader: DataLoader, device, prefix: str) -> tuple[dict[str, float], dict]:
    model.eval()
    acc = _EvalAccumulator(setting.group_names)
    for batch in loader:
        inputs, targets, (groups, ids) = setting.batch_to_model(batch, device)
        routing.set_context(model, task_ids=groups, example_ids=ids)
        pred = setting.predict(model, inputs)
        acc.add(pred, targets, groups, routing.routing_probs(model))
    acc.all_reduce()
    model.train()
    return acc.metrics(prefix), acc.heatmaps()


def _loader(ds: Dataset, cfg: TrainConfig, session: Session, *, train: bool, epoch: int = 0,
            curriculum: routing.Top2Curriculum | None = None) -> DataLoader:
    bs = (cfg.batch_size // session.world_size) if train else cfg.eval_batch_size
    sampler = None
    if train and curriculum is not None:  # adaptive gating's curriculum orders the epoch (single worker)
        curriculum.set_epoch(epoch)
        sampler = curriculum
    elif session.world_size > 1:
        sampler = DistributedSampler(ds, num_replicas=session.world_size, rank=session.world_rank,
                                     shuffle=train, seed=cfg.seed, drop_last=train)
        sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(ds, batch_size=bs, shuffle=train and sampler is None, sampler=sampler, drop_last=train,
                      num_workers=cfg.data.loader_workers, generator=gen, persistent_workers=False)


def _hash_table_size(cfg: TrainConfig, n_train: int) -> TrainConfig:
    if "hash_num_examples" in type(cfg.routing).__dataclass_fields__:
        cfg.routing.hash_num_examples = max(int(getattr(cfg.routing, "hash_num_examples") or 0), n_train)
    return cfg


def train_loop(config: dict[str, Any] | TrainConfig, session: Session,
               wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, float]:
    """Run one trial. ``wrap_model`` is Ray Train's ``prepare_model`` (DDP) in data-parallel runs."""
    cfg = config if isinstance(config, TrainConfig) else build(TrainConfig, config)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed)
    device = _device(cfg)
    setting = SETTINGS[cfg.setting](cfg)
    train_ds, val_ds, test_ds = (setting.dataset(s) for s in ("train", "val", "test"))
    cfg = _hash_table_size(cfg, len(train_ds) + len(val_ds) + len(test_ds))
    core = setting.build_model().to(device)
    model = wrap_model(core) if wrap_model is not None else core
    opt = _optimizer(core, cfg)

    step, best_val, best_state, epoch, skip = 0, -math.inf, None, 0, 0
    ckpt_dir = session.latest_checkpoint_dir()
    if ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=False)
        core.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step, best_val, epoch, skip = state["step"], state["best_val"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        if (Path(ckpt_dir) / BEST_FILE).exists():
            best_state = torch.load(Path(ckpt_dir) / BEST_FILE, map_location="cpu")

    val_loader = _loader(val_ds, cfg, session, train=False)
    two_passes = routing.needs_two_passes(core)
    curriculum = None
    if cfg.routing.adaptive_curriculum and session.world_size == 1:
        curriculum = routing.Top2Curriculum(len(train_ds), len(routing.routing_blocks(core)), seed=cfg.seed)
    model.train()
    running, n_running = 0.0, 0
    while step < cfg.steps:
        for i, batch in enumerate(_loader(train_ds, cfg, session, train=True, epoch=epoch,
                                              curriculum=curriculum)):
            if i < skip:  # resumed mid-epoch: the same order, without the batches already trained on
                continue
            inputs, targets, (groups, ids) = setting.batch_to_model(batch, device)
            routing.set_context(core, task_ids=groups, example_ids=ids, step=step)
            per_ex, logits = setting.per_example_loss(model, inputs, targets)
            loss = per_ex.mean() + routing.aux_loss(core, per_ex.detach())
            if two_passes:  # AdaMix: a second stochastic pass and a consistency loss between the two
                per_ex2, logits2 = setting.per_example_loss(model, inputs, targets)
                loss = 0.5 * (loss + per_ex2.mean() + routing.aux_loss(core, per_ex2.detach()))
                loss = loss + routing.consistency_loss(core, logits, logits2)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite training loss {loss.item()} at step {step}")
            if curriculum is not None and (fractions := routing.top2_fractions(core)) is not None:
                curriculum.update(ids, fractions)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_([p for p in core.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            step += 1
            running += float(loss.detach())
            n_running += 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics, _ = evaluate(setting, core, val_loader, device, "val")
                metrics.update({"train/loss": running / max(n_running, 1), "step": step, "epoch": epoch})
                temp = routing.current_temperature(core)
                if temp is not None:
                    metrics["routing/temperature"] = temp
                running, n_running = 0.0, 0
                if metrics["val/accuracy"] > best_val:
                    best_val, best_state = metrics["val/accuracy"], _partial_state(core)
                metrics["val/best_accuracy"] = best_val
                _report_with_checkpoint(session, metrics, core, opt, best_state, step=step, best_val=best_val,
                                        epoch=epoch, batch_in_epoch=i + 1)
            if step >= cfg.steps:
                break
        epoch, skip = epoch + 1, 0

    # test accuracy of the best validation weights
    if best_state is not None:
        core.load_state_dict(best_state, strict=False)
    final, _ = evaluate(setting, core, _loader(test_ds, cfg, session, train=False), device, "test")
    final.update({"step": step, "val/best_accuracy": best_val, "done": 1.0})
    session.report(final, None)
    return final


def _report_with_checkpoint(session, metrics, core, opt, best_state, **counters) -> None:
    if session.world_rank != 0:
        session.report(metrics, None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": _partial_state(core), "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    **counters}, Path(d) / STATE_FILE)
        if best_state is not None:
            torch.save(best_state, Path(d) / BEST_FILE)
        session.report(metrics, d)
