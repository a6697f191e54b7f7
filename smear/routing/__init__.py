"""Routing methods behind one registry, the expert routing block, and model-level helpers.

Importing this package registers every method module in this folder (file name = registry key).
"""
from __future__ import annotations

import importlib
import pkgutil

import torch
from torch import Tensor, nn

from smear.routing._base import RoutingContext, RoutingMethod, RoutingOutput, entropy
from smear.routing._registry import available_methods, get_method_class, register_method
from smear.routing.block import ExpertRoutingBlock
from smear.routing.config import RoutingConfig

_NOT_METHODS = {"block", "config"}
for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = [
    "ExpertRoutingBlock", "RoutingConfig", "RoutingContext", "RoutingMethod", "RoutingOutput",
    "available_methods", "get_method_class", "register_method", "routing_blocks", "aux_loss", "set_context",
]


def routing_blocks(model: nn.Module) -> list[tuple[str, ExpertRoutingBlock]]:
    """Every expert routing block of ``model`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertRoutingBlock)]


def set_context(model: nn.Module, **values) -> RoutingContext:
    """Update the routing context shared by the model's blocks (task ids, example ids, step, mask)."""
    blocks = routing_blocks(model)
    assert blocks, "model has no routing blocks"
    ctx = blocks[0][1].context
    assert all(b.context is ctx for _, b in blocks), "blocks must share one RoutingContext"
    for k, v in values.items():
        if not hasattr(ctx, k):
            raise AttributeError(f"RoutingContext has no field {k!r}")
        setattr(ctx, k, v)
    return ctx


def aux_loss(model: nn.Module, per_example_loss: Tensor) -> Tensor:
    """Sum over blocks of the methods' auxiliary losses and task-loss-dependent terms (REINFORCE)."""
    total = per_example_loss.new_zeros(())
    for _, block in routing_blocks(model):
        if block.last is None:
            continue
        total = total + block.last.aux_loss + block.method.task_loss_terms(block.last, per_example_loss)
    return total


@torch.no_grad()
def routing_probs(model: nn.Module) -> dict[str, Tensor]:
    """Latest routing distribution (b, n) of every block, detached."""
    return {name: b.last.probs.detach() for name, b in routing_blocks(model) if b.last is not None}
