"""Adaptive gating (Li et al. 2023, "Adaptive Gating in Mixture-of-Experts based Language Models",
arXiv 2310.07188, section 3): top-2 routing only where the router is unsure.

Per item (an example, or a token with ``cfg.adaptive_granularity = "token"``): with p1 >= p2 the two
largest router probabilities, use experts {e1, e2} if p1 - p2 <= T, else {e1} (section 3, eq. 3);
out = sum over the chosen experts of w_e f_e(x), with w_e = p_e (``adaptive_normalization =
"softmax"``, the full softmax) or p_e renormalised over the chosen experts ("top2", GShard-style; a
top-1 item then has weight 1). Evaluation: the same rule, or plain top-1 (``adaptive_eval``), since
the paper does not say.

Balancing loss (section 3: computed over the tokens routed to one expert only), Switch-style
(Fedus et al. 2022, eq. 4): w_bal * N * sum_i f_i P_i, with f_i the fraction of top-1 items whose
argmax is i and P_i their mean p_i. Zero when no item is top-1-routed, and in evaluation.

``extras["top2_fraction"]`` (b,): the fraction of each example's items routed to two experts, the
per-layer statistic of the paper's curriculum (see :mod:`smear.routing._curriculum`).

Cost, honestly: per example, every example gathers its top-2 experts and the second weight is zeroed
where top-1 suffices, so compute is always 2 adapters (the paper's saving needs a grouped dispatch
with data-dependent shapes). Per token, each position may pick different experts, so every expert
runs on every position with the unchosen weights zeroed: N adapters.
The method owns its router (same parametrisation as the block's, see ``smear.routing._base.Router``)
because per-token gating needs router logits per position; ``uses_router = False`` for the block.
The router, its softmax and the balancing loss are float32 under a bf16 autocast (the Router's own
``routing_region``); the experts run in bf16. In a float64 block everything is float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from smear.configs import ConfigError, field
from smear.routing._base import ExpertBank, Router, RoutingInputs, RoutingMethod, RoutingOutput, one_hot
from smear.routing._curriculum import Top2Curriculum
from smear.routing._dispatch import apply_dense, apply_topk
from smear.routing._registry import register_method


def adaptive_choice(p: Tensor, threshold: float, *, normalization: str = "softmax",
                    top1_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Which experts each item uses and with what weight (pure; Li et al. 2023 eq. 3).

    p: (..., n) probabilities -> idx (..., 2) long, weight (..., 2) (second weight 0 for top-1 items),
    use2 (...) bool: True where p1 - p2 <= threshold (ties at the threshold go to top-2).
    """
    top, idx = p.topk(2, dim=-1)                                               # (..., 2)
    use2 = (top[..., 0] - top[..., 1]) <= threshold                            # (...)
    if top1_only:
        use2 = torch.zeros_like(use2)
    keep = torch.stack([torch.ones_like(use2), use2], dim=-1).to(p.dtype)      # (..., 2)
    weight = top * keep
    if normalization == "top2":
        weight = weight / weight.sum(-1, keepdim=True)
    return idx, weight, use2


def top1_balance_loss(p: Tensor, top1: Tensor) -> Tensor:
    """Switch Transformer eq. 4 over top-1-routed items only: N * sum_i f_i P_i (pure).

    p: (items, n), top1: (items,) bool (False for items left out, e.g. padding). 1 at perfect balance, N when
    all go to one expert.
    """
    n = p.shape[-1]
    sel = top1.to(p.dtype)                                                     # (items,)
    count = sel.sum().clamp_min(1.0)                                           # f = P = 0 when no top-1 item
    f = (one_hot(p.argmax(-1), n).to(p.dtype) * sel[:, None]).sum(0) / count  # (n,)
    big_p = (p * sel[:, None]).sum(0) / count                                  # (n,)
    return n * (f * big_p).sum()


@dataclass
class AdaptiveGatingParams:
    """The ``routing.*`` fields of this method: Adaptive gating (Li et al. 2023)."""

    adaptive_threshold: float = field(0.1, ge=0.0, le=1.0)
    adaptive_normalization: str = field("softmax", choices=("softmax", "top2"))
    adaptive_eval: str = field("adaptive", choices=("adaptive", "top1"))
    adaptive_balance_weight: float = field(0.01, ge=0.0)
    adaptive_granularity: str = field("example", choices=("example", "token"))
    adaptive_curriculum: bool = field(False, doc="reorder training examples each epoch by top-2 fractions")


@register_method("adaptive_gating")
class AdaptiveGating(RoutingMethod):
    Params = AdaptiveGatingParams
    uses_router = False

    def __init__(self, cfg, *, dim, num_experts, rank, num_tasks):
        super().__init__(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        if num_experts < 2:
            raise ConfigError(f"adaptive_gating needs num_experts >= 2; got {num_experts}")
        self.router = Router(dim, num_experts, cfg.init_std, cfg.router_gain_init, cfg.router_weight_norm)

    @classmethod
    def check_causal(cls, cfg) -> None:
        """Per-token routing would change across decoding steps: decoder blocks route per example."""
        if cfg.adaptive_granularity == "token":
            raise ConfigError("routing.adaptive_granularity='token' is not valid in T5 decoder blocks; valid: example")

    def epoch_sampler(self, *, num_examples: int, num_blocks: int, seed: int) -> Top2Curriculum | None:
        """The paper's curriculum (section 3.2) when ``adaptive_curriculum`` is on."""
        if not self.cfg.adaptive_curriculum:
            return None
        return Top2Curriculum(num_examples, num_blocks, seed=seed)

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        c = self.cfg
        top1_only = (not inp.training) and c.adaptive_eval == "top1"
        if c.adaptive_granularity == "example":
            p = self.router(inp.u).softmax(-1)                                     # (b, n)
            idx, weight, use2 = adaptive_choice(p, c.adaptive_threshold, normalization=c.adaptive_normalization,
                                                top1_only=top1_only)             # (b, 2), (b, 2), (b,)
            y = apply_topk(experts, inp.x, idx, weight)                            # (b, s, c): 2 adapters
            top2_fraction = use2.to(p.dtype)                                       # (b,)
            items_p, items_top1 = p, ~use2                                         # (b, n), (b,)
            probs = p
        else:
            p_tok = self.router(inp.x).softmax(-1)                                 # (b, s, n)
            idx, weight, use2 = adaptive_choice(p_tok, c.adaptive_threshold, normalization=c.adaptive_normalization,
                                                top1_only=top1_only)             # (b, s, 2), (b, s, 2), (b, s)
            dense = torch.zeros_like(p_tok).scatter_add(-1, idx, weight)           # (b, s, n), zeros off the choice
            y = apply_dense(experts, inp.x, dense)                                 # (b, s, c): n adapters
            m = inp.mask.to(p_tok.dtype)                                           # (b, s)
            denom = m.sum(1).clamp_min(1.0)                                        # (b,)
            top2_fraction = (use2.to(p_tok.dtype) * m).sum(1) / denom              # (b,)
            probs = (p_tok * m[:, :, None]).sum(1) / denom[:, None]                # (b, n)
            # padding items count as neither top-1 nor top-2: a weight of 0 in the balance loss, not a boolean
            # selection (whose data-dependent shape would read the mask back to the host)
            items_p, items_top1 = p_tok.reshape(-1, self.num_experts), (~use2 & inp.mask).reshape(-1)  # (b*s, n), (b*s,)
        aux = self.zero(y)
        if inp.training and c.adaptive_balance_weight > 0:
            aux = c.adaptive_balance_weight * top1_balance_loss(items_p, items_top1)
        return RoutingOutput(y=y, probs=probs, aux_loss=aux,
                             extras={"top2_fraction": top2_fraction.detach(), "experts": idx})
