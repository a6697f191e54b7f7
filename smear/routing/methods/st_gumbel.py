"""Straight-through Gumbel-softmax routing (Jang et al. 2017, "Categorical Reparameterization with
Gumbel-Softmax", eq. 2 and section 2.2 "Straight-Through"; SMEAR paper baseline).

Training: y = softmax((logits + g) / tau), g ~ Gumbel(0, 1) (Jang eq. 2); e = argmax y; the block
output is (1 - sg(y_e) + y_e) * f_e(x): forward value f_e(x), gradient through y_e. Only the chosen
expert runs (1 adapter). Evaluation: argmax of the noise-free p (no temperature involved).

Temperature tau follows :func:`gumbel_temperature` at the global step ``inp.ctx.step``; it is
reported in ``extras["temperature"]`` (training and evaluation), a Python float (never read back from the
device). Under a bf16 autocast the logits (the block's float32 router), the noise, the tempered softmax and
the straight-through gate are float32; only the chosen expert runs in bf16 (in a float64 block: all float64).
The noise comes from ``inp.ctx.generator`` (None: the global RNG).

Gradient check (``gradcheck = "experts"``): the straight-through output's gradient w.r.t. the router (and
w.r.t. the block input, which feeds the router) is f_e(x) * d y_e, while its value does not move with the
router at all, so finite differences cannot match it by construction. What is checked in training is the
output as a function of the parameters the router does not read (the experts, the norm after them), with
the noise fixed; the evaluation forward is checked in full.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch
from torch import Tensor

from smear.configs import ConfigError, field
from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, routing_dtype, routing_float
from smear.routing._registry import register_method


def gumbel_temperature(step: int, *, tau0: float, tau_min: float, rate: float, update_every: int,
                       schedule: str = "compounding", step_offset: int = 0) -> float:
    """Gumbel temperature used at 0-indexed training step ``step`` (pure).

    Both schedules change tau only every ``update_every`` steps (the reference updates once per eval
    interval I: 5,000 steps T5, 1,000 ResNet). K = floor((step + step_offset) / I) updates have happened:
    the T5 trainer updates before training step g when (g + 1) % I == 0 (``t5_trainer.py``, "update
    adapter temperature"; ``step_offset=1``), ResNet's ``cvl/src/train.py`` after training step g when
    (g + 1) % I == 0 (``step_offset=0``).

    compounding (the SMEAR code): the k-th update, at step g_k = k * I - 1, does
        tau <- max(tau * exp(-rate * g_k), tau_min),
      so tau = max(tau0 * exp(-rate * sum_{k=1..K} (k I - 1)), tau_min)
             = max(tau0 * exp(-rate * (I K (K + 1) / 2 - K)), tau_min)
      (once tau hits tau_min it stays there, so clipping at the end equals clipping at each update).
      T5 (rate 1e-6, every 5,000) reaches 0.5 at K = 35 (step 174,999); ResNet (1e-4, every 1,000) at K = 8.
    exponential (Jang et al. 2017, section 4: tau = max(tau0 exp(-r t), tau_min)), evaluated at the
      latest update step t = K * I (a deliberate choice: the two schedules then differ only in
      compounding). Reaches 0.5 at ~3.0M (T5) / 30,000 (ResNet) steps.
    """
    if schedule not in ("compounding", "exponential"):
        raise ValueError(f"unknown gumbel schedule {schedule!r}; valid: compounding, exponential")
    k = max(int(step) + step_offset, 0) // update_every
    if schedule == "compounding":
        exponent = rate * (update_every * k * (k + 1) / 2 - k)
    else:
        exponent = rate * update_every * k
    return max(tau0 * math.exp(-exponent), tau_min)


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """g = -log(-log U), U ~ Uniform(0, 1) (Gumbel 1954; Jang et al. 2017 section 2), shaped like ``like``, drawn
    from ``generator`` (None: the global RNG); float32 (finite in bf16 runs), float64 for a float64 ``like``."""
    u = torch.rand(like.shape, dtype=routing_dtype(like.dtype), device=like.device, generator=generator)
    u = u.clamp_(1e-10, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


@dataclass
class StGumbelParams:
    """The ``routing.*`` fields of this method: ST-Gumbel (Jang et al. 2017) with the SMEAR code's annealing."""

    gumbel_tau0: float = field(10.0, gt=0.0)
    gumbel_tau_min: float = field(0.5, gt=0.0)
    gumbel_anneal_rate: float = field(1e-4, ge=0.0, le=1.0, doc="1e-6 for T5, 1e-4 for ResNet")
    gumbel_schedule: str = field("compounding", choices=("compounding", "exponential"))
    gumbel_update_every: int = field(1000, ge=1, doc="steps between temperature updates (5000 T5, 1000 ResNet)")
    gumbel_step_offset: int = field(0, ge=0, le=1, doc="updates so far at step s: floor((s + offset) / interval); "
                                                        "1 = T5 trainer (updates before the step), 0 = ResNet train.py")


@register_method("st_gumbel")
class StGumbel(RoutingMethod):
    Params = StGumbelParams
    gradcheck = "experts"  # straight-through: the router's gradient is not the output's derivative (docstring)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.gumbel_tau_min > cfg.gumbel_tau0:
            raise ConfigError(f"routing.gumbel_tau_min={cfg.gumbel_tau_min} exceeds routing.gumbel_tau0={cfg.gumbel_tau0}; "
                              "valid: a minimum at or below the starting temperature")
    def temperature(self, step: int) -> float:
        c = self.cfg
        return gumbel_temperature(step, tau0=c.gumbel_tau0, tau_min=c.gumbel_tau_min, rate=c.gumbel_anneal_rate,
                                  update_every=c.gumbel_update_every, schedule=c.gumbel_schedule,
                                  step_offset=c.gumbel_step_offset)

    def step_scalars(self, out: RoutingOutput | None, step: int) -> dict[str, float]:
        """The temperature of the latest forward (before any forward, the one at ``step``)."""
        if out is not None and "temperature" in out.extras:
            return {"temperature": float(out.extras["temperature"])}
        return {"temperature": float(self.temperature(step))}

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        p = logits.softmax(-1)                                                 # (b, n), noise-free
        tau = self.temperature(inp.ctx.step)
        if inp.training:
            g = gumbel_noise(logits, inp.ctx.generator)                        # (b, n)
            y_soft = ((routing_float(logits) + g) / tau).softmax(-1).to(p.dtype)  # (b, n), Jang eq. 2
            idx = y_soft.argmax(-1)                                            # (b,)
            y_e = y_soft.gather(1, idx[:, None])                               # (b, 1)
            gate = 1.0 - y_e.detach() + y_e                                    # (b, 1): value 1, grad of y_e
        else:
            idx = p.argmax(-1)                                                 # (b,)
            gate = p.new_ones(p.shape[0], 1)                                   # (b, 1)
        y = experts.apply(inp.x, *experts.gather(idx, gate[:, 0]))             # gate * f_e(x), (b, s, c)
        return RoutingOutput(y=y, probs=p, aux_loss=self.zero(y), extras={"temperature": tau, "experts": idx})
