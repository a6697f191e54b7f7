"""Soft MoE (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of Experts", section 2.1, eq. 1-3),
one group per example: slots mix only the tokens (positions) of their own example, padding excluded.

  logits[b, s, j] = scale * <x_hat[b, s], phi_hat[j]>   x, phi L2-normalised over c (section 2.3, "normalization")
  D = softmax over s of logits (padding masked)         dispatch weights, eq. 1
  slots[b, j] = sum_s D[b, s, j] x[b, s]                raw x, eq. 1
  ys[b, j] = f_{expert(j)}(slots[b, j])                 expert e owns slots e*m .. e*m + m - 1, eq. 2
  C = softmax over j of logits                          combine weights, eq. 3
  y[b, s] = sum_j C[b, s, j] ys[b, j]                   zero at padding positions

m = ``cfg.soft_moe_slots_per_expert``; ``cfg.soft_moe_scale``: one per slot (the SMEAR code's
``soft_input_routing``, ``cvl/src/adapters/adapter_utils.py``; the default) or one scalar (the paper),
init 1. phi is initialised N(0, init_std^2) as the SMEAR code's router weights (0.01): only its
direction enters the logits, but its norm sets how fast Adam turns it. No router, no auxiliary loss. Cost: N*m slot evaluations per example plus
the dispatch/combine einsums; static shapes. Outputs depend on other positions of the same example
(``mixes_positions``), so it is only valid in bidirectional (encoder / image) blocks.
``probs`` = combine weight per expert, averaged over the example's real positions.
Under a bf16 autocast the slot logits (from a float32 copy of x) and both softmaxes are float32; the
dispatch, the experts and the combine run in bf16. In a float64 block everything is float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smear.configs import field
from smear.routing._base import (
    ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, add_bias, routing_float, routing_region, swish,
)
from smear.routing._registry import register_method


@dataclass
class SoftMoEParams:
    """The ``routing.*`` fields of this method: Soft MoE (Puigcerver et al. 2023)."""

    soft_moe_slots_per_expert: int = field(1, ge=1)
    soft_moe_scale: str = field("per_slot", choices=("per_slot", "scalar"),
                                doc="one learned scale per slot (SMEAR code, cvl adapter_utils.py) or one scalar (paper)")


@register_method("soft_moe")
class SoftMoE(RoutingMethod):
    Params = SoftMoEParams
    uses_router = False
    mixes_positions = True

    def __init__(self, cfg, *, dim, num_experts, rank, num_tasks):
        super().__init__(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        self.slots_per_expert = cfg.soft_moe_slots_per_expert
        num_slots = num_experts * self.slots_per_expert
        self.phi = nn.Parameter(torch.randn(dim, num_slots) * cfg.init_std)                 # (c, n*m)
        self.scale = nn.Parameter(torch.ones(num_slots if cfg.soft_moe_scale == "per_slot" else ()))

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        x, mask = inp.x, inp.mask                                                              # (b, s, c), (b, s)
        b, s, c = x.shape
        n, m = self.num_experts, self.slots_per_expert
        with routing_region(x):  # slot logits and both softmaxes in float32 under a bf16 autocast
            sim = torch.einsum("bsc,cj->bsj", F.normalize(routing_float(x), dim=-1), F.normalize(self.phi, dim=0))  # (b, s, j)
            slot_logits = self.scale * sim                                                     # (b, s, j)
            neg = torch.finfo(slot_logits.dtype).min
            dispatch = slot_logits.masked_fill(~mask[:, :, None], neg).softmax(dim=1)          # (b, s, j) over s
            combine = slot_logits.softmax(dim=-1)                                              # (b, s, j) over j
        slots = torch.einsum("bsj,bsc->bjc", dispatch, x).view(b, n, m, c)                     # (b, n, m, c)
        h = swish(add_bias(torch.einsum("bnmc,ncr->bnmr", slots, experts.w_down), experts.b_down[None, :, None, :]))
        ys = torch.einsum("bnmr,nrc->bnmc", h, experts.w_up).reshape(b, n * m, c)              # (b, j, c)
        y = torch.einsum("bsj,bjc->bsc", combine, ys) * mask[:, :, None].to(x.dtype)           # (b, s, c)
        per_expert = combine.view(b, s, n, m).sum(-1)                                          # (b, s, n)
        w = mask.to(x.dtype)
        probs = (per_expert * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)    # (b, n)
        return RoutingOutput(y=y, probs=probs, aux_loss=self.zero(y))
