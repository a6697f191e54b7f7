"""Routing methods behind one registry, the expert routing block, and model-level helpers.

Importing this package registers every method module in this folder (file name = registry key).
"""
from __future__ import annotations

import importlib
import pkgutil

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smear.routing._base import RoutingContext, RoutingMethod, RoutingOutput, entropy
from smear.routing._curriculum import Top2Curriculum
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
    "routing_probs", "routing_stats", "current_temperature", "needs_two_passes", "consistency_loss",
    "optimizer_param_groups", "top2_fractions", "Top2Curriculum",
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
    """The methods' auxiliary losses (summed over blocks, as the official ``load_loss_accm``) plus the
    terms that need the task loss (REINFORCE), summed or averaged over blocks as the method says
    (:meth:`RoutingMethod.block_reduction`)."""
    total = per_example_loss.new_zeros(())
    mean_terms: list[Tensor] = []
    for _, block in routing_blocks(model):
        if block.last is None:
            continue
        terms = block.method.task_loss_terms(block.last, per_example_loss)
        if block.method.block_reduction() == "mean":
            mean_terms.append(terms)
        else:
            total = total + terms
        total = total + block.last.aux_loss
    if mean_terms:
        total = total + torch.stack(mean_terms).mean()
    return total


@torch.no_grad()
def routing_probs(model: nn.Module) -> dict[str, Tensor]:
    """Latest routing distribution (b, n) of every block, detached."""
    return {name: b.last.probs.detach() for name, b in routing_blocks(model) if b.last is not None}


@torch.no_grad()
def routing_stats(model: nn.Module) -> dict[str, float]:
    """Per block, from the latest forward: mean routing entropy (nats) and expert load (mean p_n over examples).

    Keys: ``routing/<block name>/entropy`` and ``routing/<block name>/load_<n>``.
    """
    stats: dict[str, float] = {}
    for name, block in routing_blocks(model):
        if block.last is None:
            continue
        p = block.last.probs.detach().float()                                 # (b, n)
        stats[f"routing/{name}/entropy"] = float(entropy(p).mean())
        for n, load in enumerate(p.mean(0).tolist()):
            stats[f"routing/{name}/load_{n}"] = load
    return stats


def current_temperature(model: nn.Module) -> float | None:
    """The ST-Gumbel temperature of the latest forward (None when the model has no st_gumbel block).

    Before any forward it is computed from the shared context's step.
    """
    for _, block in routing_blocks(model):
        if block.method.name != "st_gumbel":
            continue
        if block.last is not None and "temperature" in block.last.extras:
            return float(block.last.extras["temperature"])
        return float(block.method.temperature(block.context.step))
    return None


def needs_two_passes(model: nn.Module) -> bool:
    """True when a method asks for two training forwards tied by :func:`consistency_loss` (AdaMix)."""
    return any(block.method.two_pass_consistency for _, block in routing_blocks(model))


def consistency_loss(model: nn.Module, logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """AdaMix's consistency loss between two forward passes, times ``adamix_consistency_weight``.

    As the official trainers (AdaMix, Wang et al. 2022, section 3.2, eq. 4): 0.5 * (KL(P_a || P_b) +
    KL(P_b || P_a)), P = softmax over the last dim of the model outputs, (b, classes) or (b, t, vocab),
    summed over that dim and averaged over every other position: over the batch in ResNet
    (``cvl/src/models/resnet_classifier.py``, ``KLDivLoss(reduction="batchmean")``), over (batch, tokens)
    in T5 (``t5_trainer.py``, ``torch.mean(torch.sum(consistency_loss, dim=-1))``, padded target positions
    included). Both passes get gradients (neither is detached). Zero for a model without a two-pass method.
    """
    weights = [b.cfg.adamix_consistency_weight for _, b in routing_blocks(model) if b.method.two_pass_consistency]
    if not weights:
        return logits_a.new_zeros(())
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    sym_kl = 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1)    # (b,) or (b, t)
    return weights[0] * sym_kl.mean()


def optimizer_param_groups(model: nn.Module, base_lr: float) -> list[dict]:
    """Optimiser parameter groups: trainable parameters split by the lr multipliers methods declare.

    Each method's :meth:`RoutingMethod.param_groups` names its parameters relative to itself, e.g.
    latent skills' ``{"skill_logits": 10.0}``. Returns ``[{"params", "lr", "lr_mult", "name"}, ...]``,
    the base group (multiplier 1) first; empty groups are left out.
    """
    mult: dict[str, float] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, RoutingMethod):
            prefix = f"{mod_name}." if mod_name else ""
            for pname, m in module.param_groups().items():
                mult[prefix + pname] = float(m)
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(mult.get(name, 1.0), []).append(param)
    return [{"params": ps, "lr": base_lr * m, "lr_mult": m, "name": "base" if m == 1.0 else f"lr_x{m:g}"}
            for m, ps in groups.items() if ps]


@torch.no_grad()
def top2_fractions(model: nn.Module) -> Tensor | None:
    """(b, L): each example's fraction of top-2 routing in each adaptive-gating block of the latest forward.

    The input of :meth:`Top2Curriculum.update`; None when the model has no adaptive-gating block.
    """
    cols = [b.last.extras["top2_fraction"] for _, b in routing_blocks(model)
            if b.last is not None and "top2_fraction" in b.last.extras]
    return torch.stack(cols, dim=1) if cols else None
