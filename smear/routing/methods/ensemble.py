"""Ensemble: every expert runs and the outputs are averaged with the router weights.

out = sum_n p_n f_n(x) (SMEAR paper section 4, "Ensemble" baseline; the classic soft MoE of
Jacobs et al. 1991 with an example-level gate). Cost: N adapters. The sum is computed as one
adapter of rank N*r with hidden units scaled by p (see :mod:`smear.routing._dispatch`), so neither
the expert weights are repeated per example nor the per-expert outputs (b, n, s, c) materialised.
"""
from __future__ import annotations

from torch import Tensor

from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput
from smear.routing._dispatch import apply_dense
from smear.routing._registry import register_method


@register_method("ensemble")
class Ensemble(RoutingMethod):
    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        p = logits.softmax(-1)                          # (b, n)
        y = apply_dense(experts, inp.x, p)              # (b, s, c) = sum_n p[b, n] f_n(x[b])
        return RoutingOutput(y=y, probs=p, aux_loss=self.zero(y))
