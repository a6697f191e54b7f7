"""Tag routing: a one-hot expert chosen from metadata (task or domain id), no learned router.

SMEAR paper section 4 baseline. ``task_to_expert`` maps task ids to experts (identity by default; a setting's
task aliases, :meth:`share_task_experts`, give a task another's expert: T5 routes RTE to MNLI's in encoder
blocks, as the reference does).
"""
from __future__ import annotations

import torch
from torch import Tensor

from smear.configs import ConfigError
from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, one_hot, routing_dtype
from smear.routing._registry import register_method


@register_method("tag")
class Tag(RoutingMethod):
    uses_router = False

    def __init__(self, cfg, *, dim, num_experts, rank, num_tasks):
        super().__init__(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        if num_tasks > num_experts:
            raise ConfigError(f"tag routing needs num_experts >= number of tasks/domains; got num_experts={num_experts} "
                              f"for {num_tasks} tasks")
        self.register_buffer("task_to_expert", torch.arange(num_tasks), persistent=True)  # (tasks,)

    def share_task_experts(self, aliases: dict[int, int]) -> None:
        for task, like in aliases.items():
            self.task_to_expert[task] = self.task_to_expert[like]

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        if inp.ctx.task_ids is None:
            raise ValueError("tag routing needs task_ids in the routing context")
        idx = self.task_to_expert[inp.ctx.task_ids]                          # (b,)
        y = experts.apply(inp.x, *experts.gather(idx))                       # (b, s, c)
        probs = one_hot(idx, self.num_experts, routing_dtype(y.dtype))       # (b, n)
        return RoutingOutput(y=y, probs=probs, aux_loss=self.zero(y))
