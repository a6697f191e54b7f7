"""RoutingConfig: every hyper-parameter of every routing method, defaults = the reference values.

Defaults follow methods.md section 3 (SMEAR paper, arXiv 2306.03745, and its code). Setting-specific
values (number of experts, rank, Gumbel anneal rate) default to the ResNet-DomainNet setting; the
trainables override them per setting.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from smear.configs import field


@dataclass
class RoutingConfig:
    method: str = field("smear", doc="registry key, see smear.routing.available_methods()")
    num_experts: int = field(6, ge=1, doc="experts per block (paper: 6 ResNet, 8 T5)")
    rank: int = field(32, ge=1, doc="adapter bottleneck r (paper: 32 ResNet, 24 T5)")
    expert_dropout: float = field(0.1, ge=0.0, le=0.99, doc="training-only expert dropout (smear, top_k)")
    init_std: float = field(0.01, gt=0.0, doc="std of adapter and router weight init")
    router_gain_init: float = field(0.01, gt=0.0, doc="init of the LayerNorm gain on the router's expert columns")
    # Where the project may depart from the official code (r-three/smear 6e44c82): docs/fidelity.md lists each.
    router_weight_norm: str = field("shared", choices=("shared", "per_expert"),
                                    doc="shared: ONE LayerNorm(C) over W's expert columns (official Router); "
                                        "per_expert: a gain and bias per expert (before issue 10)")
    router_pooling: str = field("masked", choices=("masked", "all"),
                                doc="router input = mean over real tokens (masked, a fix) or over every "
                                    "position, padding included (all, official)")
    image_router_input: str = field("normed", choices=("normed", "raw"),
                                    doc="ResNet router input: mean of the BatchNormed block input (official) or raw")
    post_norm: str = field("layernorm", choices=("layernorm", "rms"),
                           doc="T5 norm after the experts: nn.LayerNorm(C), eps 1e-5 (official) or RMS, eps 1e-6")
    # top-k (Switch-style; paper k=1)
    top_k: int = field(1, ge=1)
    # ST-Gumbel (Jang et al. 2017) with the SMEAR code's annealing
    gumbel_tau0: float = field(10.0, gt=0.0)
    gumbel_tau_min: float = field(0.5, gt=0.0)
    gumbel_anneal_rate: float = field(1e-4, ge=0.0, doc="1e-6 for T5, 1e-4 for ResNet")
    gumbel_schedule: str = field("compounding", choices=("compounding", "exponential"))
    gumbel_update_every: int = field(1000, ge=1, doc="steps between temperature updates (5000 T5, 1000 ResNet)")
    gumbel_step_offset: int = field(0, ge=0, le=1, doc="updates so far at step s: floor((s + offset) / interval); "
                                                        "1 = T5 trainer (updates before the step), 0 = ResNet train.py")
    # Hash routing (Roller et al. 2021): a fixed random expert per example id
    hash_num_examples: int = field(0, ge=0, doc="size of the hash table; 0 = sized to the data when the model is "
                                                 "built (the largest split), without changing this config")
    hash_seed: int = field(0, ge=0, doc="varies the hash tables independently of the weight init")
    # REINFORCE (Williams 1992) with a learned per-block baseline
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
    # DSelect-k (Hazimeh et al. 2021)
    dselect_k: int = field(1, ge=1, doc="number of selectors")
    dselect_gamma: float = field(1.0, gt=0.0, doc="smooth-step width")
    dselect_entropy_weight: float = field(0.1, ge=0.0, doc="SMEAR code: load_loss_weight=0.1 on entropy + 1/sum(r)")
    dselect_reduction: str = field("mean", choices=("mean", "sum"), doc="over the batch: mean (SMEAR code) or sum (DSelect-k code)")
    dselect_invalid_weight: float | None = field(None, ge=0.0, doc="weight of 1/sum_i r_i when N is not a power of 2; "
                                                                   "None = dselect_entropy_weight (SMEAR code)")
    # Soft MoE (Puigcerver et al. 2023)
    soft_moe_slots_per_expert: int = field(1, ge=1)
    soft_moe_scale: str = field("per_slot", choices=("per_slot", "scalar"),
                                doc="one learned scale per slot (SMEAR code, cvl adapter_utils.py) or one scalar (paper)")
    # Adaptive gating (Li et al. 2023)
    adaptive_threshold: float = field(0.1, ge=0.0, le=1.0)
    adaptive_normalization: str = field("softmax", choices=("softmax", "top2"))
    adaptive_eval: str = field("adaptive", choices=("adaptive", "top1"))
    adaptive_balance_weight: float = field(0.01, ge=0.0)
    adaptive_granularity: str = field("example", choices=("example", "token"))
    adaptive_curriculum: bool = field(False, doc="reorder training examples each epoch by top-2 fractions")
    # AdaMix (Wang et al. 2022)
    adamix_consistency_weight: float = field(1.0, ge=0.0)
    adamix_task_loss: str = field("first", choices=("first", "mean"),
                                  doc="task loss of the first pass (official) or the mean of both passes")
    # Latent skills (Ponti et al. 2023)
    latent_skills_lr_mult: float = field(10.0, gt=0.0)
    latent_skills_tau: float = field(1.0, gt=0.0)
    latent_skills_sample: str = field("per_task", choices=("per_task", "per_example"),
                                      doc="one relaxed-Bernoulli draw of the task x expert matrix per forward, "
                                          "shared by a task's examples (official), or one per example")

    def sized_for(self, num_examples: int) -> "RoutingConfig":
        """This config with an automatic hash table (``hash_num_examples=0``) sized to ``num_examples``.

        A copy: the config that was validated and logged keeps 0 ("sized to the data")."""
        if self.hash_num_examples:
            return self
        return dataclasses.replace(self, hash_num_examples=max(int(num_examples), 1))

    def validate(self) -> None:
        from smear.routing._registry import available_methods
        from smear.configs import ConfigError

        if self.method not in available_methods():
            raise ConfigError(f"routing.method={self.method!r} is not valid; valid: {', '.join(available_methods())}")
