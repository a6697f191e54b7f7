"""RoutingConfig: every hyper-parameter of every routing method, defaults = the reference values.

Defaults follow methods.md section 3 (SMEAR paper, arXiv 2306.03745, and its code). Setting-specific
values (number of experts, rank, Gumbel anneal rate) default to the ResNet-DomainNet setting; the
trainables override them per setting.
"""
from __future__ import annotations

from dataclasses import dataclass

from smear.configs import field


@dataclass
class RoutingConfig:
    method: str = field("smear", doc="registry key, see smear.routing.available_methods()")
    num_experts: int = field(6, ge=1, doc="experts per block (paper: 6 ResNet, 8 T5)")
    rank: int = field(32, ge=1, doc="adapter bottleneck r (paper: 32 ResNet, 24 T5)")
    expert_dropout: float = field(0.1, ge=0.0, le=0.99, doc="training-only expert dropout (smear, top_k)")
    init_std: float = field(0.01, gt=0.0, doc="std of adapter and router weight init")
    router_gain_init: float = field(0.01, gt=0.0, doc="init of each expert column's LayerNorm gain")
    # top-k (Switch-style; paper k=1)
    top_k: int = field(1, ge=1)
    # ST-Gumbel (Jang et al. 2017) with the SMEAR code's annealing
    gumbel_tau0: float = field(10.0, gt=0.0)
    gumbel_tau_min: float = field(0.5, gt=0.0)
    gumbel_anneal_rate: float = field(1e-4, ge=0.0, doc="1e-6 for T5, 1e-4 for ResNet")
    gumbel_schedule: str = field("compounding", choices=("compounding", "exponential"))
    gumbel_update_every: int = field(1000, ge=1, doc="steps between temperature updates (5000 T5, 1000 ResNet)")
    # Hash routing (Roller et al. 2021): a fixed random expert per example id
    hash_num_examples: int = field(100_000, ge=1, doc="size of the hash table; the train loop sets it to the dataset size")
    hash_seed: int = field(0, ge=0, doc="varies the hash tables independently of the weight init")
    # REINFORCE (Williams 1992) with a learned per-block baseline
    reinforce_w_pg: float = field(0.01, ge=0.0, doc="alpha: policy-gradient weight")
    reinforce_w_ent: float = field(5e-4, ge=0.0, doc="beta: entropy weight")
    reinforce_w_value: float = field(0.01, ge=0.0, doc="gamma: baseline (Huber) weight")
    reinforce_entropy_sign: float = field(1.0, choices=(1.0, -1.0),
                                          doc="+1 adds +beta*H to the loss as the reference does (sharpens)")
    reinforce_huber_delta: float = field(1.0, gt=0.0, doc="delta of the baseline's Huber loss")
    # DSelect-k (Hazimeh et al. 2021)
    dselect_k: int = field(1, ge=1, doc="number of selectors")
    dselect_gamma: float = field(1.0, gt=0.0, doc="smooth-step width")
    dselect_entropy_weight: float = field(0.1, ge=0.0)
    dselect_reduction: str = field("mean", choices=("mean", "sum"), doc="over the batch: mean (SMEAR code) or sum (DSelect-k code)")
    dselect_invalid_weight: float = field(1.0, ge=0.0, doc="weight of 1/sum_i r_i when N is not a power of 2 "
                                                            "(the DSelect-k code adds it unweighted)")
    # Soft MoE (Puigcerver et al. 2023)
    soft_moe_slots_per_expert: int = field(1, ge=1)
    soft_moe_scale: str = field("scalar", choices=("scalar", "per_slot"))
    # Adaptive gating (Li et al. 2023)
    adaptive_threshold: float = field(0.1, ge=0.0, le=1.0)
    adaptive_normalization: str = field("softmax", choices=("softmax", "top2"))
    adaptive_eval: str = field("adaptive", choices=("adaptive", "top1"))
    adaptive_balance_weight: float = field(0.01, ge=0.0)
    adaptive_granularity: str = field("example", choices=("example", "token"))
    adaptive_curriculum: bool = field(False, doc="reorder training examples each epoch by top-2 fractions")
    # AdaMix (Wang et al. 2022)
    adamix_consistency_weight: float = field(1.0, ge=0.0)
    # Latent skills (Ponti et al. 2023)
    latent_skills_lr_mult: float = field(10.0, gt=0.0)
    latent_skills_tau: float = field(1.0, gt=0.0)

    def validate(self) -> None:
        from smear.routing._registry import available_methods
        from smear.configs import ConfigError

        if self.method not in available_methods():
            raise ConfigError(f"routing.method={self.method!r} is not valid; valid: {', '.join(available_methods())}")
