"""DSelect-k (Hazimeh et al. 2021, "DSelect-k: Differentiable Selection in the Mixture of Experts"),
per-example gate, as a SMEAR-paper baseline.

Each of k selectors picks one expert through m = ceil(log2 N) soft binary decisions:
  smooth-step  S(t) = 0 (t <= -g/2), 1 (t >= g/2), else -2 t^3 / g^3 + 3 t / (2 g) + 1/2   (eq. 3)
  selector     r_i = prod_j [S(z_j) if bit_j(i) else 1 - S(z_j)],  i = 0..N-1             (eq. 5)
  gate         q = sum_l softmax(w)_l r^(l)                                                  (eq. 6)
  output       out = sum_i q_i f_i(x)     (all experts run, training and evaluation: N adapters)
bit_j(i) = (i >> j) & 1 (least significant bit first; any fixed code is equivalent).
With N not a power of two only the first N codes exist, so sum_i r_i <= 1 and q need not sum to 1.

Parameters (the gate is the method's own, ``uses_router = False``): z = LayerNorm(u) . Z -> (k, m)
and, only when k > 1, w = LayerNorm(u) . W -> (k,) (the official per-example gate makes both functions
of the input; with k = 1, softmax(w) = 1 and w would get no gradient). As the SMEAR code's DSelect-k
router (``adapter_utils.py``, ``Router`` with ``routing_estimator="dselectk_routing"``): the input goes
through the router's LayerNorm, Z and W have no bias, init N(0, init_std^2), so z ~ 0, S ~ 1/2 and r
starts near uniform over the 2^m codes. The SMEAR code numbers the codes most significant bit first
(``np.binary_repr``); here bit j of i is (i >> j) & 1: a relabelling of Z's columns, same distribution.

Regulariser (DSelect-k paper section 4.1; the SMEAR code's ``forward_dselectk_routing``), in ``aux_loss``:
  w_ent * red_b[mean_l sum_i -r_i log(r_i + 1e-6)]
  + w_inv * red_b[mean_l 1 / sum_i (r_i + 1e-6)]               only when N is not a power of 2
red = mean over the batch (SMEAR code) or sum (DSelect-k code), ``cfg.dselect_reduction``. The SMEAR
code weighs both terms by one ``load_loss_weight`` = 0.1 (its README's DSelect-k commands), so w_inv =
``dselect_invalid_weight`` defaults to w_ent = ``dselect_entropy_weight``. The epsilon forms are the
reference's: with 1 / clamp_min(sum r, 1e-12) one stuck selector of six experts made the loss 2e11.
Training only.
``probs`` (for logging) is q renormalised to sum 1; the output uses q itself.
Under a bf16 autocast the gate (LayerNorm, Z, W, smooth-step, q) and the regulariser are float32; only the
experts run in bf16. In a float64 block they are float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import Tensor, nn

from smear.configs import field
from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, routing_float, routing_region
from smear.routing._dispatch import apply_dense
from smear.routing._registry import register_method


DSELECT_EPS = 1e-6  # the SMEAR code's epsilon in both regulariser terms


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """Cubic smooth-step of DSelect-k eq. 3 (pure): 0 below -gamma/2, 1 above gamma/2, C^1 in between."""
    cubic = -2.0 * t**3 / gamma**3 + 3.0 * t / (2.0 * gamma) + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


def binary_codes(num_experts: int, num_bits: int, device=None) -> Tensor:
    """codes[i, j] = bit j of i, (n, m) bool."""
    i = torch.arange(num_experts, device=device)[:, None]
    j = torch.arange(num_bits, device=device)[None, :]
    return ((i >> j) & 1).bool()


def dselect_weights(z: Tensor, w_logits: Tensor | None, num_experts: int, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Expert weights q and selector outputs r (pure; DSelect-k eq. 5-6).

    z: (b, k, m) selector logits, w_logits: (b, k) or None (k = 1) -> q (b, n), r (b, k, n).
    """
    s = smooth_step(z, gamma)                                                  # (b, k, m)
    codes = binary_codes(num_experts, z.shape[-1], z.device)                   # (n, m)
    factors = torch.where(codes, s[:, :, None, :], 1.0 - s[:, :, None, :])     # (b, k, n, m)
    r = factors.prod(-1)                                                       # (b, k, n)
    if w_logits is None:
        return r.sum(1), r                                                     # k = 1: softmax(w) = 1
    q = torch.einsum("bk,bkn->bn", w_logits.softmax(-1), r)                    # (b, n)
    return q, r


@dataclass
class DSelectKParams:
    """The ``routing.*`` fields of this method: DSelect-k (Hazimeh et al. 2021)."""

    dselect_k: int = field(1, ge=1, doc="number of selectors")
    dselect_gamma: float = field(1.0, gt=0.0, doc="smooth-step width")
    dselect_entropy_weight: float = field(0.1, ge=0.0, doc="SMEAR code: load_loss_weight=0.1 on entropy + 1/sum(r)")
    dselect_reduction: str = field("mean", choices=("mean", "sum"), doc="over the batch: mean (SMEAR code) or sum (DSelect-k code)")
    dselect_invalid_weight: float | None = field(None, ge=0.0, doc="weight of 1/sum_i r_i when N is not a power of 2; "
                                                                   "None = dselect_entropy_weight (SMEAR code)")


@register_method("dselect_k")
class DSelectK(RoutingMethod):
    Params = DSelectKParams
    uses_router = False

    def __init__(self, cfg, *, dim, num_experts, rank, num_tasks):
        super().__init__(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        self.k = cfg.dselect_k
        self.num_bits = max(1, math.ceil(math.log2(num_experts)))
        self.power_of_2 = 2**self.num_bits == num_experts
        self.in_norm = nn.LayerNorm(dim)
        self.z_proj = nn.Linear(dim, self.k * self.num_bits, bias=False)       # LN(u) -> z (k*m)
        nn.init.normal_(self.z_proj.weight, std=cfg.init_std)
        self.w_proj = None
        if self.k > 1:
            self.w_proj = nn.Linear(dim, self.k, bias=False)                   # LN(u) -> w (k)
            nn.init.normal_(self.w_proj.weight, std=cfg.init_std)

    def regularizer(self, r: Tensor) -> Tensor:
        """r: (b, k, n) -> scalar (see the module docstring)."""
        c = self.cfg
        red = torch.mean if c.dselect_reduction == "mean" else torch.sum
        ent = -(r * torch.log(r + DSELECT_EPS)).sum(-1)                        # (b, k) H over n
        loss = c.dselect_entropy_weight * red(ent.mean(-1))                    # mean over selectors
        if not self.power_of_2:
            w_inv = c.dselect_entropy_weight if c.dselect_invalid_weight is None else c.dselect_invalid_weight
            inv = 1.0 / (r + DSELECT_EPS).sum(-1)                              # (b, k)
            loss = loss + w_inv * red(inv.mean(-1))
        return loss

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        b = inp.u.shape[0]
        with routing_region(inp.u):  # the gate and its regulariser in float32 under a bf16 autocast
            u = self.in_norm(routing_float(inp.u))                             # (b, c)
            z = self.z_proj(u).view(b, self.k, self.num_bits)                  # (b, k, m)
            w = self.w_proj(u) if self.w_proj is not None else None            # (b, k)
            q, r = dselect_weights(z, w, self.num_experts, self.cfg.dselect_gamma)  # (b, n), (b, k, n)
            aux = self.regularizer(r) if inp.training else self.zero(q)
        y = apply_dense(experts, inp.x, q)                                     # (b, s, c) = sum_i q_i f_i(x)
        probs = q / q.sum(-1, keepdim=True).clamp_min(1e-12)                   # (b, n), for logging
        return RoutingOutput(y=y, probs=probs, aux_loss=aux, extras={"selector_outputs": r})
