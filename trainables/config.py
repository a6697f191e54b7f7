"""TrainConfig: the typed configuration of one trial, validated once where it enters (CLI / search space)."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field

from smear.configs import ConfigError, field
from smear.data.domainnet import DOMAINS
from smear.routing import RoutingConfig

SETTINGS = ("resnet_domainnet",)


@dataclass
class DataConfig:
    root: str = field("", doc="DomainNet root in the official layout; '' = the offline digits stand-in (generated)")
    domains: list[str] = field(list(DOMAINS), doc="domains to train and evaluate on (DomainNet names)")
    resolution: int = field(224, ge=8, doc="image side in pixels (paper 224)")
    augment: str = field("paper", choices=("paper", "none"),
                         doc="paper: RandomResizedCrop+flip / Resize+CenterCrop; none: resize only")
    cache: bool = field(False, doc="keep decoded images in memory (small datasets)")
    loader_workers: int = field(0, ge=0)

    def validate(self) -> None:
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise ConfigError(f"data.domains has unknown domain {bad[0]!r}; valid: {', '.join(DOMAINS)}")
        if not self.domains:
            raise ConfigError(f"data.domains is empty; valid: {', '.join(DOMAINS)}")


@dataclass
class TrainConfig:
    setting: str = field("resnet_domainnet", choices=SETTINGS)
    seed: int = field(42, ge=0)
    steps: int = field(100_000, ge=1, doc="optimizer steps (paper: 100k ResNet)")
    eval_every: int = field(1_000, ge=1, doc="steps between validation + checkpoint (paper: 1k ResNet)")
    batch_size: int = field(128, ge=1, doc="global batch size, split over data-parallel workers")
    eval_batch_size: int = field(256, ge=1)
    lr: float = field(1e-3, gt=0.0, doc="Adam learning rate (paper: 1e-3 ResNet, no schedule)")
    grad_clip: float = field(1.0, ge=0.0, doc="max global grad norm, 0 = off")
    pretrained: str = field("none", choices=("none", "imagenet"), doc="backbone weights; imagenet needs a download or cache")
    backbone_bn: str = field("update", choices=("update", "frozen"),
                             doc="frozen backbone's BN running stats: update in training (reference) or frozen")
    num_workers: int = field(1, ge=1, doc="data-parallel Ray Train workers; 1 = run directly as a Tune trial")
    use_gpu: bool = field(False)
    torch_threads: int = field(0, ge=0, doc="torch intra-op threads per worker; 0 = torch default")
    routing: RoutingConfig = dc_field(default_factory=RoutingConfig)
    data: DataConfig = dc_field(default_factory=DataConfig)

    def validate(self) -> None:
        if self.num_workers > 1 and self.batch_size % self.num_workers:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}")
