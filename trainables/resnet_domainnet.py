"""The ResNet-DomainNet setting: routed ResNet-18 on DomainNet images, task id = domain id."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from smear.backbones.resnet import build_routed_resnet18
from smear.data import offline_digits_domainnet
from smear.routing import RoutingConfig
from smear.data.domainnet import DomainNetDataset, num_classes
from trainables.config import PRIMARY_METRIC, TrainConfig
from trainables.setting import Batch


class ResNetDomainNet:
    """methods.md section 2: images -> class logits; metric: top-1 accuracy overall and per domain."""

    primary_metric = PRIMARY_METRIC["resnet_domainnet"]

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.root = cfg.data.root or offline_digits_domainnet()  # "" = the offline stand-in, made on this node
        self.group_names = list(cfg.data.domains)
        self.num_classes = num_classes(self.root, cfg.data.domains)

    def build_model(self, routing: RoutingConfig) -> nn.Module:
        return build_routed_resnet18(routing, num_classes=self.num_classes, num_tasks=len(self.group_names),
                                     pretrained=self.cfg.pretrained, backbone_bn=self.cfg.backbone_bn)

    def dataset(self, split: str) -> Dataset:
        d = self.cfg.data
        return DomainNetDataset(self.root, d.domains, split, resolution=d.resolution, augment=d.augment, cache=d.cache)

    collate = None  # torch's default collate

    def batch_to_model(self, batch, device) -> Batch:
        images, labels, domains, ids = batch
        return Batch({"images": images.to(device, non_blocking=True)}, labels.to(device), domains.to(device), ids.to(device))

    def per_example_loss(self, model, batch: Batch):
        logits = model(batch.inputs["images"])                                            # (b, classes)
        per_ex = F.cross_entropy(logits, batch.targets, reduction="none", label_smoothing=self.cfg.label_smoothing)
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
