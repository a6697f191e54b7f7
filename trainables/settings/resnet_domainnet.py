"""The ResNet-DomainNet setting: routed ResNet-18 on DomainNet images, task id = domain id (methods.md
section 2). Its config: the common ``TrainConfig`` plus ``data.domains`` / ``resolution`` / ``augment`` /
``cache`` / ``decode_on``, ``pretrained`` and ``backbone_bn``. Its data path is ``smear.data.pipeline``: the
loader workers hand uint8 crops (or, decoding on the device, file bytes) to :meth:`batch_to_model`, which
flips and normalises on the model's device."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from smear.backbones.resnet import RESNET18_WIDTHS, build_routed_resnet18, check_imagenet_weights
from smear.configs import ConfigError, field
from smear.data import offline_digits_domainnet, pipeline
from smear.data.check import check_domainnet, check_domainnet_once
from smear.data.domainnet import DOMAINS, DomainNetDataset, num_classes
from smear.routing import RoutingConfig
from trainables.config import DataConfig, TrainConfig
from trainables.settings import Batch, Setting, register_setting


@dataclass
class DomainNetData(DataConfig):
    root: str = field("", doc="DomainNet root in the official layout; '' = the offline digits stand-in (generated)")
    domains: list[str] = field(list(DOMAINS), doc="domains to train and evaluate on (DomainNet names)")
    resolution: int = field(224, ge=8, doc="image side in pixels (paper 224)")
    augment: str = field("paper", choices=("paper", "none"),
                         doc="paper: RandomResizedCrop+flip / Resize+CenterCrop; none: resize only")
    cache: bool = field(False, doc="keep decoded images in memory (small datasets), per loader worker")
    loader_workers: int = field(-1, ge=-1, doc="as the common data.loader_workers; here -1 by default: the trial's "
                                                "CPUs minus one decode and crop")
    decode_on: str = field("auto", choices=("auto", "workers", "device"),
                           doc="where JPEGs are decoded and cropped: workers (torchvision on the CPU), device (the "
                               "model's device, batched: nvJPEG on a GPU; workers only read bytes); auto = device "
                               "when the trial uses a GPU, else workers. Flip and normalisation run on the device")

    def validate(self) -> None:
        bad = [d for d in self.domains if d not in DOMAINS]
        if bad:
            raise ConfigError(f"data.domains has unknown domain {bad[0]!r}; valid: {', '.join(DOMAINS)}")
        if not self.domains:
            raise ConfigError(f"data.domains is empty; valid: {', '.join(DOMAINS)}")
        dup = next((d for i, d in enumerate(self.domains) if d in self.domains[:i]), None)
        if dup is not None:
            raise ConfigError(f"data.domains has {dup!r} twice; valid: each domain once")


@dataclass
class ResNetConfig(TrainConfig):
    pretrained: str = field("none", choices=("none", "imagenet"), doc="backbone weights; imagenet needs a download or cache")
    backbone_bn: str = field("update", choices=("update", "frozen"),
                             doc="frozen backbone's BN running stats: update in training (reference) or frozen")
    data: DomainNetData = dc_field(default_factory=DomainNetData)

    def validate(self) -> None:
        super().validate()
        narrowest = min(RESNET18_WIDTHS)
        if self.routing.rank > narrowest:  # an expert's bottleneck wider than the block it adapts
            raise ConfigError(f"routing.rank={self.routing.rank} exceeds the narrowest routing block's width "
                              f"{narrowest} (ResNet-18 layer1); valid: 1 to {narrowest}")


def _progress(done: int, total: int) -> None:
    """--check-images: a progress line on stderr, every 5% and at the end."""
    if total and (done == total or done % max(1, total // 20) == 0):
        print(f"\rchecking images: {done}/{total} ({100 * done // total}%)", end="\n" if done == total else "",
              file=sys.stderr, flush=True)


@register_setting
class ResNetDomainNet(Setting):
    """methods.md section 2: images -> class logits; metric: top-1 accuracy overall and per domain."""

    name = "resnet_domainnet"
    config_class = ResNetConfig
    defaults = {  # the paper's values (methods.md section 2; the official cvl/src/utils/Config.py)
        "steps": 100_000, "eval_every": 1_000, "batch_size": 128, "optimizer": "adam", "lr": 1e-3,
        "warmup_steps": 0, "grad_clip": 1.0, "label_smoothing": 0.0, "batch_loss": "mean",
        "routing": {"num_experts": 6, "rank": 32, "gumbel_anneal_rate": 1e-4, "gumbel_update_every": 1_000,
                    "gumbel_step_offset": 0},
    }
    smoke = {  # random backbone, the digits stand-in, small images, CPU; a declaration's smoke sets the budget
        "pretrained": "none", "data.root": "", "data.resolution": 16, "data.augment": "none",
        "data.loader_workers": 0, "use_gpu": False, "torch_threads": 1,
    }
    primary_metric, group_metric, group_kind = "accuracy", "accuracy", "domain"
    paper_shape = {"batch_size": 128, "data": {"resolution": 224, "augment": "paper"}}  # methods.md section 2
    work_unit = "images"

    @classmethod
    def groups_of(cls, config: dict[str, Any]) -> list[str]:
        return list(config["data"]["domains"])

    @classmethod
    def prepare_data(cls, config: dict[str, Any], *, create: bool, images: str = "header") -> None:
        """Every split line, path, label and image header of the listed domains (``smear.data.check``);
        "" = the digits stand-in, generated (and checked) here. On a cluster (RAY_ADDRESS set) a root that
        does not exist on this machine is checked by each trial first instead (:meth:`verify_data`)."""
        import os

        root = config["data"]["root"]
        if root == "":
            if not create:
                return
            root = offline_digits_domainnet()
        elif os.environ.get("RAY_ADDRESS") and not Path(root).exists():
            return  # the worker nodes' disk: each trial checks it before training
        if create:
            check_domainnet_once(root, config["data"]["domains"], decode=images,
                                 workers=(os.cpu_count() or 1) if images == "full" else 1,
                                 progress=_progress if images == "full" else None)
        else:  # --dry-run: the same check, but nothing written (no marker)
            check_domainnet(root, config["data"]["domains"], decode=images)

    @classmethod
    def calibration_config(cls, config: dict[str, Any], *, data_dir: Path, lines: int, local: bool) -> dict[str, Any]:
        """Random weights of ResNet-18's shapes in place of ImageNet's; photo-sized JPEGs in DomainNet's layout."""
        config["pretrained"] = "none"
        if not local:
            from smear.data.calibration import write_domainnet_jpegs

            config["data"]["root"] = str(write_domainnet_jpegs(data_dir / "domainnet", lines))
        return config

    @classmethod
    def check_reachable(cls, configs: list[dict[str, Any]]) -> None:
        if any(c["pretrained"] == "imagenet" for c in configs):
            check_imagenet_weights()

    def verify_data(self) -> None:
        check_domainnet_once(self.root, self.cfg.data.domains)

    def __init__(self, cfg: ResNetConfig):
        super().__init__(cfg)
        self.root = cfg.data.root or offline_digits_domainnet()  # "" = the offline stand-in, made on this node
        self.group_names = list(cfg.data.domains)
        self.num_classes = num_classes(self.root, cfg.data.domains)
        d = cfg.data
        self.decode_on = d.decode_on if d.decode_on != "auto" else "device" if cfg.use_gpu else "workers"
        self.collate = pipeline.collate if self.decode_on == "workers" else pipeline.collate_raw

    def build_model(self, routing: RoutingConfig) -> nn.Module:
        return build_routed_resnet18(routing, num_classes=self.num_classes, num_tasks=len(self.group_names),
                                     pretrained=self.cfg.pretrained, backbone_bn=self.cfg.backbone_bn)

    def dataset(self, split: str) -> Dataset:
        d = self.cfg.data
        return DomainNetDataset(self.root, d.domains, split, resolution=d.resolution, augment=d.augment,
                                decode_on=self.decode_on, cache=d.cache)

    def place_model(self, model: nn.Module, device) -> nn.Module:
        """On CUDA the convolutions run channels_last (NHWC), with the input; the routing blocks' (b, h*w, c)
        token view of an NHWC tensor is contiguous. On the CPU the default layout."""
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else model

    def batch_to_model(self, batch, device) -> Batch:
        """uint8 crops (or bytes / pixels to decode and crop here) -> flipped, normalised float images on
        ``device`` (``smear.data.pipeline.to_model_input``), channels_last on CUDA."""
        images, labels, domains, ids, draws = batch
        fmt = torch.channels_last if torch.device(device).type == "cuda" else torch.preserve_format
        x = pipeline.to_model_input(images, draws, device, self.cfg.data.resolution, self.cfg.data.augment, fmt)
        return Batch({"images": x}, labels.to(device, non_blocking=True), domains.to(device, non_blocking=True),
                     ids.to(device, non_blocking=True))

    def per_example_loss(self, model, batch: Batch):
        logits = model(batch.inputs["images"])                                            # (b, classes)
        per_ex = F.cross_entropy(logits.float(), batch.targets, reduction="none",         # float32 under autocast
                                 label_smoothing=self.cfg.label_smoothing)
        return per_ex, logits, None                                                       # (b,), (b, classes)

    @torch.no_grad()
    def predict(self, model, batch: Batch) -> list:
        return model(batch.inputs["images"]).argmax(-1).tolist()

    def metrics(self, preds: list, targets: list, groups: list[int], prefix: str) -> dict[str, float]:
        hits = torch.tensor([p == t for p, t in zip(preds, targets)], dtype=torch.float64)
        g = torch.tensor(groups)
        out = {f"{prefix}/accuracy": float(hits.mean()) if len(hits) else 0.0}
        for i, name in enumerate(self.group_names):
            sel = g == i
            if sel.any():
                out[f"{prefix}/{name}/accuracy"] = float(hits[sel].mean())
        return out
