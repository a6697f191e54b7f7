"""REINFORCE routing (Williams 1992, eq. 9: score-function gradient with a baseline; SMEAR paper baseline).

Training: e ~ Categorical(p), out = f_e(x) (1 adapter). Evaluation: e = argmax p.
The router learns only through :meth:`Reinforce.task_loss_terms`, which needs the per-example task
loss L_ex (methods.md section 3):

    loss += w_pg * mean_b[log p_e * sg(L_ex - b(u))]          policy gradient, L_ex as negative reward
          + sign * w_ent * mean_b[H(p)]                        sign = +1 (reference): sharpens routing
          + w_v * mean_b[Huber(L_ex - b(u))]                   fits the baseline

b = Linear(C/8 -> 1)(Linear(C -> C/8)(sg(LN(u)))), no nonlinearity, per block, on the detached
LayerNormed router input (official ``Baseline`` in ``adapter_utils.py``, fed ``new_x.detach()`` by
``adapter_controller_fast.py`` / ``adapter_controller_resnet_fast.py``), weights N(0, 0.01^2), biases 0
(official ``linear_layer`` init). ``cfg.reinforce_baseline_input="raw"`` feeds sg(u) instead.
L_ex is detached inside (the task loss trains the experts through its own backward; here it is only a
reward). The terms are zero in evaluation (e is not sampled there).

Over blocks the three terms are averaged (the official trainers, ``t5_trainer.py`` ``_compute_loss`` and
``cvl/src/models/resnet_classifier.py`` ``forward``, take each term's mean over (batch, blocks));
``cfg.reinforce_block_reduction="sum"`` sums them (60x stronger in T5, 8x in ResNet).
Under a bf16 autocast log p, H(p) and the baseline are float32, so the three terms are too (float64 in a
float64 block). The sample comes from ``inp.ctx.generator`` (None: the global RNG).

Gradient check: with the sample fixed by a generator, the block output f_e(x), the probabilities and the
baseline are ordinary differentiable functions (``gradcheck = "all"``). The policy-gradient surrogate
log p_e * sg(L_ex - b) is not checked: by design its gradient is the score-function estimate, not the
derivative of its value (which moves with b).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smear.configs import field
from smear.routing._base import (
    ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, entropy, routing_float, routing_region,
)
from smear.routing._registry import register_method


def reinforce_terms(log_p_e: Tensor, baseline: Tensor, ent: Tensor, per_example_loss: Tensor, *, w_pg: float,
                    w_ent: float, w_value: float, entropy_sign: float = 1.0, huber_delta: float = 1.0) -> Tensor:
    """The REINFORCE loss terms (pure). All inputs (b,); per_example_loss is detached here."""
    loss = per_example_loss.detach().to(log_p_e.dtype)                        # (b,) L_ex
    advantage = (loss - baseline).detach()                                     # (b,) sg(L_ex - b)
    pg = (log_p_e * advantage).mean()                                          # Williams eq. 9
    value = F.huber_loss(baseline, loss, delta=huber_delta, reduction="mean")  # Huber(L_ex - b)
    return w_pg * pg + entropy_sign * w_ent * ent.mean() + w_value * value


@dataclass
class ReinforceParams:
    """The ``routing.*`` fields of this method: REINFORCE (Williams 1992) with a learned per-block baseline."""

    reinforce_w_pg: float = field(0.01, ge=0.0, doc="alpha: policy-gradient weight")
    reinforce_w_ent: float = field(5e-4, ge=0.0, doc="beta: entropy weight")
    reinforce_w_value: float = field(0.01, ge=0.0, doc="gamma: baseline (Huber) weight")
    reinforce_entropy_sign: float = field(1.0, choices=(1.0, -1.0),
                                          doc="+1 adds +beta*H to the loss as the reference does (sharpens)")
    reinforce_huber_delta: float = field(1.0, gt=0.0, doc="delta of the baseline's Huber loss")
    reinforce_block_reduction: str = field("mean", choices=("mean", "sum"),
                                           doc="the three terms over blocks: mean (official trainers) or sum")
    reinforce_baseline_input: str = field("normed", choices=("normed", "raw"),
                                          doc="baseline input: the router's LayerNormed input (official) or raw u")


@register_method("reinforce")
class Reinforce(RoutingMethod):
    Params = ReinforceParams
    def __init__(self, cfg, *, dim, num_experts, rank, num_tasks):
        super().__init__(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        hidden = max(1, dim // 8)
        self.baseline = nn.Sequential(nn.Linear(dim, hidden), nn.Linear(hidden, 1))  # C -> C/8 -> 1, linear
        for lin in self.baseline:                                                   # official linear_layer init
            nn.init.normal_(lin.weight, std=cfg.init_std)
            nn.init.zeros_(lin.bias)

    def block_reduction(self) -> str:
        return self.cfg.reinforce_block_reduction

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        log_p = logits.log_softmax(-1)                                          # (b, n), float32 logits
        p = log_p.exp()                                                         # (b, n)
        if inp.training:
            # NaN probabilities (a router broken by a non-finite step the loop has not read back yet) would
            # make multinomial raise on the CPU and device-assert on CUDA; NaN -> 1 keeps the draw valid
            # (finite p unchanged), and the loop's non-finite check fails the trial with the step
            weights = routing_float(p.detach()).nan_to_num(nan=1.0)             # (b, n)
            idx = torch.multinomial(weights, 1, generator=inp.ctx.generator).squeeze(1)  # (b,) e ~ Categorical(p)
        else:
            idx = p.argmax(-1)                                                  # (b,)
        y = experts.apply(inp.x, *experts.gather(idx))                          # (b, s, c)
        with routing_region(inp.u):                                             # the value loss's input, float32
            baseline = self.baseline(routing_float(self._baseline_input(inp).detach())).squeeze(-1)  # (b,) b(sg(LN(u)))
        extras = {
            "log_prob": log_p.gather(1, idx[:, None]).squeeze(1),              # (b,) log p_e
            "baseline": baseline,
            "entropy": entropy(p),                                              # (b,) H(p)
            "sampled": inp.training,
            "experts": idx,
        }
        return RoutingOutput(y=y, probs=p, aux_loss=self.zero(y), extras=extras)

    def _baseline_input(self, inp: RoutingInputs) -> Tensor:
        if self.cfg.reinforce_baseline_input == "normed":
            assert inp.u_normed is not None, "reinforce needs the block's router"
            return inp.u_normed                                                 # (b, c)
        return inp.u                                                            # (b, c)

    def task_loss_terms(self, out: RoutingOutput, per_example_loss: Tensor) -> Tensor:
        if not out.extras.get("sampled", False):
            return per_example_loss.new_zeros(())
        c = self.cfg
        return reinforce_terms(out.extras["log_prob"], out.extras["baseline"], out.extras["entropy"], per_example_loss,
                               w_pg=c.reinforce_w_pg, w_ent=c.reinforce_w_ent, w_value=c.reinforce_w_value,
                               entropy_sign=c.reinforce_entropy_sign, huber_delta=c.reinforce_huber_delta)
