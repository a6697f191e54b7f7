"""Model-level helpers: what the train loop asks of a routed model, answered by the methods' hooks.

Nothing here names a routing method: each helper walks the model's :class:`ExpertRoutingBlock` s and asks
their methods (:class:`smear.routing.RoutingMethod`'s hooks).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from smear.routing._base import EpochSampler, RoutingContext, RoutingMethod, entropy
from smear.routing._curriculum import top2_fractions as _top2_fractions
from smear.routing.block import ExpertRoutingBlock
from smear.routing._registry import get_method_class


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
    """Latest routing distribution (b, n) of every block, detached, keyed by the block's label from model
    surgery (its module name when it has none)."""
    return {b.label or name: b.last.probs.detach() for name, b in routing_blocks(model) if b.last is not None}


@torch.no_grad()
def routing_stats(model: nn.Module) -> dict[str, float]:
    """Per block, from the latest forward: mean routing entropy (nats) and expert load (mean p_n over examples).

    Keys: ``routing/<block label>/entropy`` and ``routing/<block label>/load_<n>``.
    """
    stats: dict[str, float] = {}
    for name, p in routing_probs(model).items():
        p = p.float()                                                           # (b, n)
        stats[f"routing/{name}/entropy"] = float(entropy(p).mean())
        for n, load in enumerate(p.mean(0).tolist()):
            stats[f"routing/{name}/load_{n}"] = load
    return stats


def step_scalars(model: nn.Module) -> dict[str, float]:
    """The methods' per-step scalars (:meth:`RoutingMethod.step_scalars`), e.g. ``{"temperature": tau}``;
    the first block that reports a key gives its value."""
    out: dict[str, float] = {}
    for _, block in routing_blocks(model):
        for k, v in block.method.step_scalars(block.last, block.context.step).items():
            out.setdefault(k, v)
    return out


def current_temperature(model: nn.Module) -> float | None:
    """The routing temperature of the latest forward (ST-Gumbel), None when no method has one."""
    return step_scalars(model).get("temperature")


def _two_pass_method(model: nn.Module) -> RoutingMethod | None:
    return next((b.method for _, b in routing_blocks(model) if b.method.two_pass_consistency), None)


def needs_two_passes(model: nn.Module) -> bool:
    """True when a method asks for two training forwards tied by :func:`consistency_loss` (AdaMix)."""
    return _two_pass_method(model) is not None


def consistency_loss(model: nn.Module, logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """The two-pass method's :meth:`RoutingMethod.consistency` between two forwards' outputs; zero for a
    model without a two-pass method."""
    method = _two_pass_method(model)
    return logits_a.new_zeros(()) if method is None else method.consistency(logits_a, logits_b)


def epoch_sampler(model: nn.Module, num_examples: int, seed: int) -> EpochSampler | None:
    """The first :meth:`RoutingMethod.epoch_sampler` a block's method offers (adaptive gating's curriculum)."""
    blocks = routing_blocks(model)
    for _, block in blocks:
        sampler = block.method.epoch_sampler(num_examples=num_examples, num_blocks=len(blocks), seed=seed)
        if sampler is not None:
            return sampler
    return None


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


def top2_fractions(model: nn.Module) -> Tensor | None:
    """(b, L): each example's fraction of top-2 routing in each adaptive-gating block of the latest forward
    (the input of :meth:`Top2Curriculum.update`); None when the model has no such block."""
    return _top2_fractions(routing_blocks(model))


def share_task_experts(model: nn.Module, aliases: dict[int, int], *, route_from: str | None = None) -> None:
    """Each routing block of ``model`` (those routing from ``route_from`` only, when given: "self" = encoder-side
    blocks) routes task ``a`` as task ``b`` for each ``a -> b`` in ``aliases``, as far as its method routes by task
    (:meth:`RoutingMethod.share_task_experts`)."""
    for _, block in routing_blocks(model):
        if route_from is None or block.route_from == route_from:
            block.method.share_task_experts(aliases)


def check_causal(cfg) -> None:
    """Refuse a routing config whose method cannot run in causal decoder blocks (its ``check_causal``)."""
    get_method_class(cfg.method).check_causal(cfg)
