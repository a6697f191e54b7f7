"""Dense adapter baseline at the compute of one expert ("1x compute", r = expert rank), no routing."""
from __future__ import annotations

import torch
from torch import Tensor

from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput
from smear.routing._registry import register_method


@register_method("adapter")
class Adapter(RoutingMethod):
    uses_router = False

    @classmethod
    def expert_shape(cls, cfg):
        return 1, cfg.rank

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        y = experts.apply_shared(inp.x)                                      # (b, s, c)
        return RoutingOutput(y=y, probs=y.new_ones(y.shape[0], 1, dtype=torch.float32), aux_loss=self.zero(y))
