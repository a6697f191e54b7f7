"""Dense adapter baseline at the parameters of all experts ("1x parameters"): one adapter, r = N * rank.

methods.md section 3: r = 192 in both settings (8 x 24 for T5, 6 x 32 for ResNet); no routing.
"""
from __future__ import annotations

from smear.routing._registry import register_method
from smear.routing.methods.adapter import Adapter


@register_method("adapter_large")
class AdapterLarge(Adapter):
    @classmethod
    def expert_shape(cls, cfg):
        return 1, cfg.rank * cfg.num_experts
