"""Latent skills (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level
Generalisation", EACL, section 3 "Polytropon"; SMEAR paper baseline).

Per block a task x expert logit matrix Z (init U(-1e-3, 1e-3)). For an example of task t:
  training    A ~ RelaxedBernoulli(tau, logits = Z)      (Maddison et al. 2017; reparameterised sample)
              ONE sample of the whole task x expert matrix per forward pass, shared by all examples of a
              task (official ``skill_routing`` in ``adapter_controller_fast.py`` and
              ``adapter_controller_resnet_fast.py``); ``cfg.latent_skills_sample="per_example"`` draws
              one row per example instead
  evaluation  A = sigmoid(Z)
  weights     a = A[t] / (sum_n A[t, n] + 1e-12) (official), then the experts are merged like SMEAR:
              f(x; sum_n a_n theta_n).
Z learns at ``cfg.latent_skills_lr_mult`` (10) times the base learning rate: :meth:`param_groups`
declares it and ``smear.routing.optimizer_param_groups`` builds the optimiser groups.
Cost: ~1 adapter plus the merge.
The sample's uniforms come from ``inp.ctx.generator`` (None: the global RNG, as ``rsample`` draws them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions.transforms import SigmoidTransform
from torch.distributions.utils import clamp_probs

from smear.configs import field
from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput
from smear.routing._registry import register_method


def relaxed_bernoulli_rsample(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """One reparameterised ``RelaxedBernoulli(tau, logits=logits).rsample()`` (the same numbers), with no host
    sync, its uniforms drawn from ``generator`` (None: the global RNG, the same draw as ``rsample``'s).

    The binary Concrete sample (Maddison et al. 2017), as torch's ``LogitRelaxedBernoulli.rsample`` computes it,
    then its sigmoid (``RelaxedBernoulli``'s transform):
        A = sigmoid((log U - log(1 - U) + log p - log(1 - p)) / tau),  p = sigmoid(logits),  U ~ Uniform(0, 1),
    p and U clamped to [eps, 1 - eps] (``clamp_probs``). Written out because ``RelaxedBernoulli`` validates its
    base distribution's arguments whatever ``validate_args`` says (the check reads a device tensor back to the
    host), and ``rsample`` takes no generator. ``tau`` becomes a tensor by ``torch.full``, with no host-to-device
    copy. logits: (...) -> (...) in (0, 1).
    """
    temperature = torch.full((), tau, dtype=logits.dtype, device=logits.device)
    probs = clamp_probs(torch.sigmoid(logits))                                       # (...) p
    uniforms = clamp_probs(torch.rand(logits.shape, dtype=probs.dtype, device=probs.device, generator=generator))
    logit_sample = (uniforms.log() - (-uniforms).log1p() + probs.log() - (-probs).log1p()) / temperature
    return SigmoidTransform()(logit_sample)


@dataclass
class LatentSkillsParams:
    """The ``routing.*`` fields of this method: Latent skills (Ponti et al. 2023)."""

    latent_skills_lr_mult: float = field(10.0, gt=0.0)
    latent_skills_tau: float = field(1.0, gt=0.0)
    latent_skills_sample: str = field("per_task", choices=("per_task", "per_example"),
                                      doc="one relaxed-Bernoulli draw of the task x expert matrix per forward, "
                                          "shared by a task's examples (official), or one per example")


@register_method("latent_skills")
class LatentSkills(RoutingMethod):
    Params = LatentSkillsParams
    uses_router = False

    def __init__(self, cfg, *, dim, num_experts, rank, num_tasks):
        super().__init__(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        self.skill_logits = nn.Parameter(torch.empty(num_tasks, num_experts).uniform_(-1e-3, 1e-3))  # Z (tasks, n)

    def param_groups(self) -> dict[str, float]:
        return {"skill_logits": self.cfg.latent_skills_lr_mult}

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        if inp.ctx.task_ids is None:
            raise ValueError("latent_skills routing needs task_ids in the routing context")
        tasks = inp.ctx.task_ids                                                     # (b,)
        if inp.training:
            z = self.skill_logits                                                    # (tasks, n)
            if self.cfg.latent_skills_sample == "per_example":
                z = z[tasks]                                                         # (b, n)
            a = relaxed_bernoulli_rsample(z, self.cfg.latent_skills_tau, inp.ctx.generator)  # (tasks or b, n) in (0, 1)
            if self.cfg.latent_skills_sample == "per_task":
                a = a[tasks]                                                         # (b, n): one draw per task
        else:
            a = torch.sigmoid(self.skill_logits[tasks])                              # (b, n)
        a = a / (a.sum(-1, keepdim=True) + 1e-12)                                    # rows sum to 1
        y = experts.apply(inp.x, *experts.merge(a))                                  # (b, s, c)
        return RoutingOutput(y=y, probs=a, aux_loss=self.zero(y))
