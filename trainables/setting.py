"""The contract between the train loop and a setting (ResNet-DomainNet, T5-GLUE)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from smear.routing import RoutingConfig


@dataclass
class Batch:
    inputs: dict[str, Any]   # what the model consumes
    targets: Any             # (b,) labels or (b, t) target token ids
    groups: torch.Tensor     # (b,) task / domain ids
    ids: torch.Tensor        # (b,) example ids (hash routing, curriculum)
    labels: list | None = None  # task labels for metrics when targets are token ids


class Setting(Protocol):
    group_names: list[str]   # tasks or domains, indexed by task id
    primary_metric: str      # val/<primary_metric> selects the best checkpoint
    collate: Callable | None

    def build_model(self, routing: RoutingConfig) -> nn.Module:
        """The routed model; ``routing`` is the trial's routing config sized to the data (hash tables)."""
    def dataset(self, split: str) -> Dataset: ...
    def batch_to_model(self, batch, device) -> Batch: ...
    def per_example_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(per-example loss (b,), output logits, mask over the logits' positions or None)."""
    def predict(self, model: nn.Module, batch: Batch) -> list: ...
    def metrics(self, preds: list, targets: list, groups: list[int], prefix: str) -> dict[str, float]: ...
