"""TrainConfig: the typed configuration of one trial, validated once where it enters (CLI / search space).

This module holds what every setting shares; each setting (``trainables/settings/``) subclasses
``TrainConfig`` with its own sections and fields, and ``trainables.settings.make_config`` builds the subclass
its ``setting`` names."""
from __future__ import annotations

import os
from dataclasses import dataclass, field as dc_field

from smear.configs import ConfigError, field
from smear.routing import RoutingConfig


@dataclass
class DataConfig:
    """What every setting's data section has; a setting's own section extends it (``data.domains``, ...)."""

    root: str = field("", doc="dataset root; '' = the setting's offline stand-in (generated on each node)")
    loader_workers: int = field(0, ge=-1, doc="DataLoader worker processes; -1 = the trial's CPUs minus one (at "
                                               "least 0). Workers persist across epochs")

    def workers(self, cpus: float | None) -> int:
        """``loader_workers`` resolved: -1 -> ``cpus`` (the trial's CPUs; None: this process's usable CPUs) - 1."""
        if self.loader_workers >= 0:
            return self.loader_workers
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(int(cpus) - 1, 0)


@dataclass
class TrainConfig:
    setting: str = field("", doc="registry key of the setting (trainables/settings/); make_config fills in the "
                                   "default setting")
    seed: int = field(42, ge=0, le=2**32 - 1, doc="0 to 2**32 - 1 (numpy's seed range; torch's generators are "
                                                    "seeded with multiples of it)")
    steps: int = field(100_000, ge=1, doc="optimizer steps (paper: 100k ResNet)")
    eval_every: int = field(1_000, ge=1, doc="steps between validation + checkpoint (paper: 1k ResNet)")
    batch_size: int = field(128, ge=1, doc="global batch size, split over data-parallel workers")
    eval_batch_size: int = field(256, ge=1)
    optimizer: str = field("adam", choices=("adam", "adamw"))
    lr: float = field(1e-3, gt=0.0, doc="learning rate (paper: Adam 1e-3 ResNet; AdamW 3e-4 T5)")
    warmup_steps: int = field(0, ge=0, doc="linear warmup, then constant (paper: 2,000 T5)")
    grad_clip: float = field(1.0, ge=0.0, doc="max global grad norm, 0 = off")
    label_smoothing: float = field(0.0, ge=0.0, le=0.5, doc="paper: 0.1 T5")
    batch_loss: str = field("mean", choices=("mean", "sum"),
                            doc="task loss over the batch: sum (T5 reference: sets the scale of every auxiliary "
                                "weight) or mean (ResNet reference)")
    num_workers: int = field(1, ge=1, doc="data-parallel Ray Train workers; 1 = run directly as a Tune trial")
    use_gpu: bool = field(False)
    precision: str = field("auto", choices=("auto", "fp32", "bf16"),
                           doc="forward passes (training and evaluation): auto = bf16 autocast on a CUDA device that "
                               "supports bf16, else fp32 (the CPU default); bf16 = autocast on any device, the CPU "
                               "included; fp32 = no autocast. Losses and routing math stay float32")
    nonfinite_check_every: int = field(50, ge=1, doc="steps between reads of the device-side non-finite-loss flag "
                                                      "(the only host sync of those steps; also at every evaluation)")
    torch_threads: int = field(0, ge=0, doc="torch intra-op threads per worker; 0 = torch default")
    routing: RoutingConfig = dc_field(default_factory=RoutingConfig)
    data: DataConfig = dc_field(default_factory=DataConfig)

    def validate(self) -> None:
        if self.eval_every > self.steps:
            raise ConfigError(f"eval_every={self.eval_every} exceeds steps={self.steps}; valid: 1 to {self.steps}")
        if self.num_workers > 1 and self.batch_size % self.num_workers:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}")
