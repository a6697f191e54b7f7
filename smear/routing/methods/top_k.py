"""Top-k routing, Switch-style (Fedus et al. 2022, eq. 1-2; SMEAR paper baseline with k = 1).

out = sum over the k largest p_e of p_e f_e(x), p the full (not renormalised) softmax, so the router
learns through the gate value p_e. Expert dropout applies to the logits first (training only). No
balancing loss, as in the SMEAR reference. Cost: k adapters (each example gathers its experts).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from smear.configs import ConfigError, field
from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput
from smear.routing._dispatch import apply_topk
from smear.routing._registry import register_method


@dataclass
class TopKParams:
    """The ``routing.*`` fields of this method: top-k (Switch-style; paper k=1)."""

    top_k: int = field(1, ge=1)


@register_method("top_k")
class TopK(RoutingMethod):
    Params = TopKParams

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.top_k > cfg.num_experts:
            raise ConfigError(f"routing.top_k={cfg.top_k} exceeds routing.num_experts={cfg.num_experts}; "
                              f"valid: 1 to {cfg.num_experts}")
    expert_dropout = True

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        p = logits.softmax(-1)                                            # (b, n)
        k = min(self.cfg.top_k, self.num_experts)
        gate, idx = p.topk(k, dim=-1)                                     # (b, k), (b, k)
        if k == 1:
            y = experts.apply(inp.x, *experts.gather(idx[:, 0], gate[:, 0]))  # Switch eq. 2: p_e f_e(x), (b, s, c)
        else:
            y = apply_topk(experts, inp.x, idx, gate)                     # (b, s, c)
        return RoutingOutput(y=y, probs=p, aux_loss=self.zero(y), extras={"experts": idx})
