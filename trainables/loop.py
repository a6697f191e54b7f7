"""The train loop of one trial, independent of how it is run (Tune trial, Ray Train worker, plain call).

Assembles the trial (``trainables/trial.py``), restores it from a checkpoint when the session has one,
trains for ``steps`` optimizer steps, evaluates every ``eval_every`` steps (validation metrics overall and
per group, routing statistics), reports metrics with a checkpoint, and at the end reports the test metrics
of the best-validation weights. Nothing setting- or method-specific lives here: settings build the model and
data, routing methods add their losses through ``smear.routing``.

Precision (``precision``): the forward passes, training and evaluation, run under a bf16 autocast when the
resolved precision is bf16 (``trainables.precision.resolve_precision``); losses are float32. The first report
of a trial carries ``system/bf16`` (1.0 or 0.0: what ran), again after a resume only if it changed.

No host sync per step: the running loss and the first non-finite loss stay on the device
(``trainables.step.LossMonitor``); the loop reads them every ``nonfinite_check_every`` steps and at each
evaluation.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from torch import nn

import smear.routing as routing
from trainables import accounting
from trainables.checkpoints import CheckpointMismatch, _partial_state, _restore
from trainables.config import TrainConfig
from trainables.evaluation import evaluate
from trainables.names import (
    DONE, EPOCH, HEATMAP_FILE, ROUTING_HEATMAP, SECONDS_PER_STEP, STEP, SYSTEM_BF16, TRAIN_HOURS, TRAIN_LOSS, TRAIN_LR, best,
)
from trainables.session import LocalSession, Session
from trainables.step import LossMonitor, NonFiniteLoss
from trainables.trial import NoGPU, assemble, set_epoch

__all__ = ["CheckpointMismatch", "LocalSession", "NoGPU", "NonFiniteLoss", "Session", "train_loop"]


def train_loop(config: dict[str, Any] | TrainConfig, session: Session,
               wrap_model: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, float]:
    """Run one trial. ``wrap_model`` is Ray Train's ``prepare_model`` (DDP) in data-parallel runs."""
    trial = assemble(config, session, wrap_model=wrap_model)
    cfg, setting, core = trial.cfg, trial.setting, trial.core
    primary = setting.primary_metric
    state = trial.resume()
    val_loader = trial.loader("val")
    # compute accounting (issue 14): parameters and FLOPs of one training step, in a fresh trial's first report
    compute = accounting.measure(setting, core, trial.first_batch(), cfg) \
        if state.step == 0 and session.world_rank == 0 else {}
    # the resolved precision goes into the first report, and after a resume only when it changed (another node)
    pending = {SYSTEM_BF16: float(trial.precision.bf16)} if state.bf16 != trial.precision.bf16 else {}
    monitor = LossMonitor(trial.device, state.step)
    trial.model.train()
    clock, total_train_s = time.perf_counter(), 0.0  # training time, evaluations left out
    train_loader = trial.loader("train", epoch=state.epoch)
    while state.step < cfg.steps:
        set_epoch(train_loader, state.epoch)
        for i, batch in enumerate(train_loader):
            if i < state.batch_in_epoch:  # resumed mid-epoch: the same order, without the batches trained on
                continue                  # (batch_in_epoch only grows past i from here: set to i + 1 below)
            monitor.add(trial.step(batch, state.step))          # the loss stays on the device: no host sync
            state.step += 1
            evaluating = state.step % cfg.eval_every == 0 or state.step == cfg.steps
            if evaluating or state.step % cfg.nonfinite_check_every == 0:
                monitor.check()                                 # the one host sync of these steps
            if evaluating:
                train_s = time.perf_counter() - clock           # training time since the last evaluation (synced)
                total_train_s += train_s
                seconds_per_step = train_s / max(monitor.steps, 1)
                metrics, _ = evaluate(setting, core, val_loader, trial.device, "val", trial.precision)
                metrics.update({TRAIN_LOSS: monitor.mean_and_reset(), TRAIN_LR: trial.sched.get_last_lr()[0],
                                STEP: state.step, EPOCH: state.epoch, **pending, **compute,
                                SECONDS_PER_STEP: seconds_per_step})
                pending, compute = {}, {}
                metrics.update({f"routing/{k}": v for k, v in routing.step_scalars(core).items()})
                if metrics[f"val/{primary}"] > state.best_val:
                    state.best_val, state.best_state = metrics[f"val/{primary}"], _partial_state(core)
                metrics[best(primary)] = state.best_val
                state.batch_in_epoch = i + 1
                trial.checkpoint(state, metrics)
                clock = time.perf_counter()
            if state.step >= cfg.steps:
                break
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    # test metrics of the best validation weights
    if state.best_state is not None:
        _restore(core, state.best_state, "the best-validation weights")
    del train_loader, val_loader  # their workers end here
    final, heat = evaluate(setting, core, trial.loader("test"), trial.device, "test", trial.precision)
    final.update({STEP: state.step, best(primary): state.best_val, DONE: 1.0, **pending,
                  TRAIN_HOURS: total_train_s / 3600})  # this process's training time (since a restore, if any)
    # specialisation (methods.md section 5): per block, group x expert mean routing weight on test; a file of the
    # trial's, whose location the final report carries (the driver records it as the run's artifact)
    where = session.artifact(HEATMAP_FILE, {"groups": setting.group_names, "blocks": heat}) if heat else None
    if where is not None:
        final[ROUTING_HEATMAP] = where
    session.report(final, None)
    return final
