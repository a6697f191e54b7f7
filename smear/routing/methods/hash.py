"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"; SMEAR paper baseline).

Each example gets a fixed random expert per block, drawn once per dataset: ``table[example_id]``.
No learned router. Cost: 1 adapter (gather + batched matmul).

The table is a persistent buffer, so it is saved with (and restored from) the checkpoint. It holds
``cfg.hash_num_examples`` entries (0 in a trial's config means "the dataset size", resolved by the
train loop with ``RoutingConfig.sized_for`` on a copy); an example id outside the table is an error, not
a silent wrap-around. The range check costs no host sync: ``index_select`` raises this IndexError on the
CPU, and on CUDA an out-of-range id trips a device-side assert (the trial fails with "device-side assert
triggered"; rerun on the CPU for this message). ``hash_num_examples: 0`` sizes the table to the data, so
this only happens with an explicit size that is too small.

Different blocks get different tables: each block seeds its own generator with one number drawn
from torch's global RNG at construction (so it follows the run's seed, like every weight init, and
advances from block to block) plus ``cfg.hash_seed`` (which redraws the tables without changing the
weight init, since exactly one number is drawn from the global RNG either way).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from smear.configs import ConfigError, field
from smear.routing._base import ExpertBank, RoutingInputs, RoutingMethod, RoutingOutput, one_hot, routing_dtype
from smear.routing._registry import register_method

_SEED_STRIDE = 1_000_003  # a prime, so hash_seed s and a global draw d rarely collide with another (s', d')


@dataclass
class HashParams:
    """The ``routing.*`` fields of this method: Hash routing (Roller et al. 2021): a fixed random expert per example id."""

    hash_num_examples: int = field(0, ge=0, doc="size of the hash table; 0 = sized to the data when the model is "
                                                 "built (the largest split), without changing this config")
    hash_seed: int = field(0, ge=0, doc="varies the hash tables independently of the weight init")


@register_method("hash")
class Hash(RoutingMethod):
    Params = HashParams
    uses_router = False

    @classmethod
    def size_to_data(cls, cfg, num_examples: int):
        """``hash_num_examples=0`` means "the dataset size": a copy with the table sized to ``num_examples``."""
        if cfg.hash_num_examples:
            return cfg
        return dataclasses.replace(cfg, hash_num_examples=max(int(num_examples), 1))

    def __init__(self, cfg, *, dim, num_experts, rank, num_tasks):
        super().__init__(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        if cfg.hash_num_examples < 1:
            raise ConfigError("routing.hash_num_examples=0 (sized to the data) must be resolved before the model "
                              "is built; valid: RoutingConfig.sized_for(dataset size), or a size >= 1")
        draw = int(torch.randint(0, 2**31 - 1, ()))                      # advances the global RNG per block
        gen = torch.Generator().manual_seed(draw + _SEED_STRIDE * cfg.hash_seed)
        table = torch.randint(0, num_experts, (cfg.hash_num_examples,), generator=gen)
        dtype = torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
        self.register_buffer("table", table.to(dtype), persistent=True)   # (examples,)

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        ids = inp.ctx.example_ids
        if ids is None:
            raise ValueError("hash routing needs example_ids in the routing context (set_context(model, example_ids=...))")
        ids = ids.to(self.table.device)
        try:  # index_select checks the range without a host sync: on the CPU here, on CUDA by a device-side assert
            idx = self.table.index_select(0, ids).long()                     # (b,)
        except IndexError:
            bad = ids[(ids < 0) | (ids >= self.table.numel())]              # the error path may sync
            raise IndexError(f"hash routing: example id {int(bad[0])} is outside the table of "
                             f"{self.table.numel()} examples; set routing.hash_num_examples to the dataset size") from None
        y = experts.apply(inp.x, *experts.gather(idx))                      # (b, s, c)
        probs = one_hot(idx, self.num_experts, routing_dtype(y.dtype))      # (b, n)
        return RoutingOutput(y=y, probs=probs, aux_loss=self.zero(y), extras={"experts": idx})
