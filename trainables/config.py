"""TrainConfig: the typed configuration of one trial, validated once where it enters (CLI / search space)."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Any

from smear.configs import ConfigError, build, field
from smear.data.domainnet import DOMAINS
from smear.routing import RoutingConfig

SETTINGS = ("resnet_domainnet", "t5_glue")
PRIMARY_METRIC = {"resnet_domainnet": "accuracy", "t5_glue": "average"}  # val/<this> picks the best checkpoint

# The paper's values per setting (methods.md section 2), applied under whatever a declaration sets.
SETTING_DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet_domainnet": {
        "steps": 100_000, "eval_every": 1_000, "batch_size": 128, "optimizer": "adam", "lr": 1e-3,
        "warmup_steps": 0, "grad_clip": 1.0, "label_smoothing": 0.0, "batch_loss": "mean",
        "routing": {"num_experts": 6, "rank": 32, "gumbel_anneal_rate": 1e-4, "gumbel_update_every": 1_000,
                    "gumbel_step_offset": 0},
    },
    "t5_glue": {
        "steps": 600_000, "eval_every": 5_000, "batch_size": 128, "optimizer": "adamw", "lr": 3e-4,
        "warmup_steps": 2_000, "grad_clip": 1.0, "label_smoothing": 0.1, "batch_loss": "sum",
        "routing": {"num_experts": 8, "rank": 24, "gumbel_anneal_rate": 1e-6, "gumbel_update_every": 5_000,
                    "gumbel_step_offset": 1},
    },
}


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
class T5Settings:
    model: str = field("tiny", doc="'tiny' (random T5 v1.1-shaped, offline) or a name/path, e.g. google/t5-v1_1-base")
    tokenizer: str = field("byt5", doc="'byt5' (ByT5Tokenizer, no files needed) or a name/path")
    d_model: int = field(64, ge=8, doc="tiny model only")
    d_ff: int = field(128, ge=8, doc="tiny model only")
    num_layers: int = field(2, ge=1, doc="tiny model only: encoder and decoder layers each")
    num_heads: int = field(4, ge=1, doc="tiny model only")
    tasks: list[str] = field(["rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola"])
    max_source_len: int = field(128, ge=8)
    max_target_len: int = field(16, ge=2)
    loss_reduction: str = field("sum", choices=("sum", "mean"), doc="over target tokens: sum (reference) or mean")
    rte_to_mnli: bool = field(True, doc="tag routing: RTE uses MNLI's expert in encoder blocks (official: "
                                        "task_routing_same_rte_mnli_onlyencoder.json); false = RTE's own expert")
    val_holdout: int = field(1000, ge=1, doc="training examples held out as validation for qqp, qnli, sst2")
    eval_limit: int = field(0, ge=0, doc="evaluate on the first N examples of each task's split; 0 = all")

    def validate(self) -> None:
        valid = ("rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola")
        bad = [t for t in self.tasks if t not in valid]
        if bad or not self.tasks:
            raise ConfigError(f"t5.tasks has unknown task {(bad or [''])[0]!r}; valid: {', '.join(valid)}")
        if self.rte_to_mnli and "rte" in self.tasks and "mnli" not in self.tasks:
            raise ConfigError("t5.rte_to_mnli=True routes RTE with MNLI's expert, but mnli is not in t5.tasks; "
                              "valid: add mnli to t5.tasks, or set t5.rte_to_mnli: false")


@dataclass
class TrainConfig:
    setting: str = field("resnet_domainnet", choices=SETTINGS)
    seed: int = field(42, ge=0)
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
    pretrained: str = field("none", choices=("none", "imagenet"), doc="backbone weights; imagenet needs a download or cache")
    backbone_bn: str = field("update", choices=("update", "frozen"),
                             doc="frozen backbone's BN running stats: update in training (reference) or frozen")
    num_workers: int = field(1, ge=1, doc="data-parallel Ray Train workers; 1 = run directly as a Tune trial")
    use_gpu: bool = field(False)
    torch_threads: int = field(0, ge=0, doc="torch intra-op threads per worker; 0 = torch default")
    routing: RoutingConfig = dc_field(default_factory=RoutingConfig)
    data: DataConfig = dc_field(default_factory=DataConfig)
    t5: T5Settings = dc_field(default_factory=lambda: T5Settings())

    def validate(self) -> None:
        if self.setting == "t5_glue":
            from smear.backbones.t5 import check_decoder_support

            check_decoder_support(self.routing)
        if self.num_workers > 1 and self.batch_size % self.num_workers:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by num_workers={self.num_workers}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(values: dict[str, Any] | TrainConfig | None = None) -> TrainConfig:
    """The one way to build a TrainConfig: the setting's paper defaults, then ``values``, validated."""
    if isinstance(values, TrainConfig):
        return values
    values = dict(values or {})
    setting = values.get("setting", "resnet_domainnet")
    if setting not in SETTING_DEFAULTS:
        raise ConfigError(f"setting={setting!r} is not valid; valid: {', '.join(SETTINGS)}")
    return build(TrainConfig, _merge(SETTING_DEFAULTS[setting], values))
