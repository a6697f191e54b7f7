"""One evaluation pass of a trial: the setting's metrics on a split, and per routed block the routing
statistics (entropy, expert load) and the group x expert heatmap, gathered over data-parallel workers."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader

import smear.routing as routing
from trainables.precision import Precision
from trainables.settings import Setting


class _RoutingRecorder:
    """Per-block routing statistics over an evaluation pass: entropy, expert load, group x expert heatmap."""

    def __init__(self, groups: list[str]):
        self.groups = groups
        self.count = torch.zeros(len(groups), dtype=torch.float64)
        self.route_sum: dict[str, torch.Tensor] = {}   # block -> (groups, n) sum of routing probs
        self.entropy_sum: dict[str, torch.Tensor] = {}

    def add(self, group: torch.Tensor, probs: dict[str, torch.Tensor]) -> None:
        """probs: block label -> (b, n) routing distribution of the batch."""
        g = group.cpu()
        self.count.index_add_(0, g, torch.ones(len(g), dtype=torch.float64))
        for name, p in probs.items():
            p = p.double().cpu()                                           # (b, n)
            acc = self.route_sum.setdefault(name, torch.zeros(len(self.groups), p.shape[1], dtype=torch.float64))
            acc.index_add_(0, g, p)
            self.entropy_sum[name] = self.entropy_sum.get(name, torch.zeros((), dtype=torch.float64)) + routing.entropy(p).sum()

    def all_reduce(self) -> None:
        if not _distributed():
            return
        import torch.distributed as dist

        for t in [self.count, *[self.route_sum[k] for k in sorted(self.route_sum)],
                  *[self.entropy_sum[k] for k in sorted(self.entropy_sum)]]:
            dist.all_reduce(t)

    def metrics(self) -> dict[str, float]:
        out = {}
        n_items = float(self.count.sum().clamp_min(1))
        for name, s in self.route_sum.items():
            out[f"routing/{name}/entropy"] = float(self.entropy_sum[name]) / n_items
            for e, v in enumerate((s.sum(0) / n_items).tolist()):
                out[f"routing/{name}/load_{e}"] = v
        return out

    def heatmaps(self) -> dict[str, list[list[float]]]:
        """Per block: group x expert mean routing probability."""
        return {k: (s / self.count.clamp_min(1)[:, None]).tolist() for k, s in self.route_sum.items()}


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _gather(items: list) -> list:
    if not _distributed():
        return items
    import torch.distributed as dist

    out: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


@torch.no_grad()
def evaluate(setting: Setting, model: nn.Module, loader: DataLoader, device, prefix: str,
             precision: Precision | None = None) -> tuple[dict[str, float], dict]:
    """Metrics of ``setting`` on one split (``prefix`` = val or test) and routing statistics; the forward passes
    run under ``precision``'s autocast (None: float32)."""
    model.eval()
    rec = _RoutingRecorder(setting.group_names)
    preds, targets, groups = [], [], []
    for raw in loader:
        batch = setting.batch_to_model(raw, device)
        routing.set_context(model, task_ids=batch.groups, example_ids=batch.ids)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            preds += setting.predict(model, batch)
        targets += batch.labels if batch.labels is not None else batch.targets.tolist()
        groups += batch.groups.tolist()
        rec.add(batch.groups, routing.routing_probs(model))
    rec.all_reduce()
    preds, targets, groups = _gather(preds), _gather(targets), _gather(groups)
    model.train()
    metrics = setting.metrics(preds, targets, groups, prefix)
    if prefix == "val":
        metrics.update(rec.metrics())
    return metrics, rec.heatmaps()
