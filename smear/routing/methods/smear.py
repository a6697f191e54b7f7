"""SMEAR: soft merging of experts with adaptive routing (Muqeeth et al., TMLR 2024, section 3).

The block output uses one merged expert, f(x; sum_n p_n theta_n) (paper eq. 2), with p the router
distribution. Cost: the merge, b*n*(2cr + r) multiply-adds, plus one adapter call.
"""
from __future__ import annotations

from torch import Tensor

from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput
from smear.routing._registry import register_method


@register_method("smear")
class Smear(RoutingMethod):
    expert_dropout = True

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        p = logits.softmax(-1)                                   # (b, n)
        y = experts.apply(inp.x, *experts.merge(p))              # (b, s, c)
        return RoutingOutput(y=y, probs=p, aux_loss=self.zero(y))
