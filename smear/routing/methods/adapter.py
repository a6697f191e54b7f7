"""Dense adapter baseline at the compute of one expert ("1x compute", r = expert rank), no routing."""
from __future__ import annotations

from torch import Tensor

from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, routing_dtype
from smear.routing._registry import register_method


@register_method("adapter")
class Adapter(RoutingMethod):
    uses_router = False

    @classmethod
    def expert_shape(cls, cfg):
        return 1, cfg.rank

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        y = experts.apply_shared(inp.x)                                      # (b, s, c)
        probs = y.new_ones(y.shape[0], 1, dtype=routing_dtype(y.dtype))    # (b, 1)
        return RoutingOutput(y=y, probs=probs, aux_loss=self.zero(y))
