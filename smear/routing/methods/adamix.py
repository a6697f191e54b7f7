"""AdaMix (Wang et al. 2022, "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning",
section 3.1-3.3; SMEAR paper baseline).

Training: stochastic routing, section 3.1: each example draws a random down-projection expert d and,
independently, a random up-projection expert u in every block; out = swish(x W_down[d] + b_down[d]) W_up[u]
(1 adapter, gathered per example). Two forward passes with independent draws are tied by a symmetric
KL consistency loss (section 3.2, eq. 4), a model-level term: ``two_pass_consistency = True`` tells the
train loop to run twice and add :meth:`AdaMix.consistency` (through ``smear.routing.consistency_loss``).
Evaluation: adaptation merging, section 3.3: the uniform average of all experts' weights (the SMEAR
merge with p = 1/N), one adapter.
``probs`` (logging): in training, half a vote to the down expert and half to the up expert; uniform in eval.
The draws come from ``inp.ctx.generator`` (None: the global RNG): the down experts, then the up experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from smear.configs import field
from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, one_hot, routing_dtype, routing_float
from smear.routing._registry import register_method


@dataclass
class AdaMixParams:
    """The ``routing.*`` fields of this method: AdaMix (Wang et al. 2022)."""

    adamix_consistency_weight: float = field(1.0, ge=0.0)
    adamix_task_loss: str = field("first", choices=("first", "mean"),
                                  doc="task loss of the first pass (official) or the mean of both passes")


@register_method("adamix")
class AdaMix(RoutingMethod):
    Params = AdaMixParams
    uses_router = False
    two_pass_consistency = True

    def consistency(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        """``adamix_consistency_weight`` * 0.5 * (KL(P_a || P_b) + KL(P_b || P_a)) (AdaMix eq. 4, official trainers).

        P = softmax over the last dim of the model outputs, (b, classes) or (b, t, vocab), summed over that
        dim and averaged over every other position: over the batch in ResNet
        (``cvl/src/models/resnet_classifier.py``, ``KLDivLoss(reduction="batchmean")``), over (batch, tokens)
        in T5 (``t5_trainer.py``, ``torch.mean(torch.sum(consistency_loss, dim=-1))``, padded target
        positions included). Both passes get gradients (neither is detached).
        """
        log_a = F.log_softmax(routing_float(logits_a), dim=-1)                   # float32 (float64 model: float64)
        log_b = F.log_softmax(routing_float(logits_b), dim=-1)
        sym_kl = 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1)    # (b,) or (b, t)
        return self.cfg.adamix_consistency_weight * sym_kl.mean()

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        b, n, x = inp.x.shape[0], self.num_experts, inp.x
        dtype, gen = routing_dtype(x.dtype), inp.ctx.generator                # float32 (float64 blocks: float64)
        if inp.training:
            down = torch.randint(0, n, (b,), device=x.device, generator=gen)  # (b,) down expert
            up = torch.randint(0, n, (b,), device=x.device, generator=gen)    # (b,) up expert
            y = experts.apply(x, experts.w_down[down], experts.b_down[down], experts.w_up[up])  # (b, s, c)
            probs = 0.5 * (one_hot(down, n, dtype) + one_hot(up, n, dtype))   # (b, n)
            extras = {"down": down, "up": up}
        else:
            probs = x.new_full((b, n), 1.0 / n, dtype=dtype)                  # (b, n) uniform
            y = experts.apply(x, *experts.merge(probs))                       # merged adapter, (b, s, c)
            extras = {}
        return RoutingOutput(y=y, probs=probs, aux_loss=self.zero(y), extras=extras)
