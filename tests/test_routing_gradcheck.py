"""Every registered method's gradients against finite differences: ``torch.autograd.gradcheck`` on a tiny
float64 routing block (issue 19, item 9).

The routing math runs in max(input dtype, float32) (``smear.routing._base.routing_dtype``), so a block
converted with ``.double()`` computes in float64 throughout, as gradcheck needs. The checked function is
the block's forward, x -> (output, routing probabilities, auxiliary loss), of the input and of the block's
parameters (passed in with ``torch.func.functional_call``), with every draw fixed: each call sets a
``torch.Generator`` seeded the same in the routing context. Discrete choices (top-k, hash, tag, AdaMix's
experts, REINFORCE's sample, adaptive gating's one-or-two) are then piecewise constant: away from ties
(none in these seeded blocks) the function is differentiable and its gradient is the one autograd gives.

What a method's training forward lets gradcheck see is declared by the method (``RoutingMethod.gradcheck``,
in its own file): "all" (input and every parameter), "experts" (only the parameters the router does not
read: a straight-through estimator, whose router gradient is not the derivative of the output; such a
method must fail the full check, or it has no reason to narrow it), or "none" (skipped, the reason given
there). Evaluation forwards are checked in full for every method. Not checked: REINFORCE's
policy-gradient surrogate in ``task_loss_terms`` (a score-function estimate by design; its formula is
pinned by hand-worked numbers in tests/test_routing_math.py).
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from smear.configs import build
from smear.routing import ExpertRoutingBlock, RoutingConfig, get_method_class, set_context
from tests.helpers.blocks import ALL, LAYOUTS

DIM, RANK, N, S, B = 4, 2, 3, 3, 2
SCOPES = ("all", "experts", "none")


def _tiny_double_block(method: str, layout: str, train: bool) -> ExpertRoutingBlock:
    # init 0.5 and router gain 1: routing far from uniform and experts far from zero, so every term counts
    cfg = build(RoutingConfig, {"method": method, "num_experts": N, "rank": RANK, "hash_num_examples": 8,
                                "init_std": 0.5, "router_gain_init": 1.0})
    torch.manual_seed(0)
    return ExpertRoutingBlock(DIM, cfg, layout=layout, num_tasks=N).double().train(train)


def _input(layout: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    if layout == "image":
        return torch.randn(B, DIM, 2, 2, generator=g, dtype=torch.float64), None             # (b, c, h, w)
    mask = torch.tensor([[True, True, False], [True, True, True]])                          # (b, s): one pad
    return torch.randn(B, S, DIM, generator=g, dtype=torch.float64), mask                   # (b, s, c)


def _checked_names(blk: ExpertRoutingBlock, scope: str) -> list[str]:
    """The parameters gradcheck differentiates with respect to: all, or those the router does not read."""
    if scope == "all":
        return [n for n, _ in blk.named_parameters()]
    return [n for n, _ in blk.named_parameters() if n.startswith(("experts.", "post_norm."))]


def _gradcheck(blk: ExpertRoutingBlock, layout: str, scope: str, **kw) -> bool:
    x, mask = _input(layout)
    params = {n: p.detach().clone() for n, p in blk.named_parameters()}
    names = _checked_names(blk, scope)
    ctx = {"task_ids": torch.arange(B) % N, "example_ids": torch.arange(B), "step": 0}

    def forward(x, *checked):
        # the same draws at every evaluation: dropout masks, noise and samples are constants of the function
        set_context(blk, **ctx, generator=torch.Generator().manual_seed(3))
        out = functional_call(blk, {**params, **dict(zip(names, checked))}, (x,) if mask is None else (x, mask))
        return out, blk.last.probs, blk.last.aux_loss

    inputs = (x.requires_grad_(scope == "all"), *(params[n].requires_grad_() for n in names))
    return torch.autograd.gradcheck(forward, inputs, **kw)


@pytest.mark.parametrize("method", ALL)
def test_the_method_declares_a_gradcheck_scope(method):
    assert get_method_class(method).gradcheck in SCOPES


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL)
def test_gradients_match_finite_differences(method, layout, train):
    scope = get_method_class(method).gradcheck if train else "all"
    if scope == "none":
        pytest.skip(f"{method} declares gradcheck = 'none' (the reason is in its file)")
    blk = _tiny_double_block(method, layout, train)
    assert _gradcheck(blk, layout, scope)
    assert blk.last.y.dtype == blk.last.probs.dtype == blk.last.aux_loss.dtype == torch.float64


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", [m for m in ALL if get_method_class(m).gradcheck == "experts"])
def test_a_narrowed_scope_is_needed(method, layout):
    # a straight-through router gradient is not the derivative of the output: the full check must fail
    blk = _tiny_double_block(method, layout, train=True)
    assert not _gradcheck(blk, layout, "all", raise_exception=False)
