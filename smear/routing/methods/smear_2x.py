"""SMEAR 2x: SMEAR with twice the experts per block (16 for T5, 12 for ResNet), SMEAR paper section 5.

Same merge as :mod:`smear.routing.methods.smear` (paper eq. 2); only the size of the expert bank changes, so the
compute stays ~1 adapter while the parameters double.
"""
from __future__ import annotations

from smear.routing._registry import register_method
from smear.routing.methods.smear import Smear


@register_method("smear_2x")
class Smear2x(Smear):
    @classmethod
    def expert_shape(cls, cfg):
        return 2 * cfg.num_experts, cfg.rank
