"""The adaptive-gating curriculum (Li et al. 2023, arXiv 2310.07188, section 3.2 "Curriculum learning").

Each training example is described by the vector of its per-layer fractions of top-2 routing (one
entry per adaptive-gating block, ``extras["top2_fraction"]``). Before each epoch the examples are
ordered by cosine similarity to the example with the fewest top-2 routings (smallest vector sum), most
similar first, so that examples needing the same amount of computation are batched together.

Fallback (the paper is silent): when that reference vector is zero (an example routed top-1 in every
layer, likely early on), cosine similarity is undefined; the order is then by increasing total top-2
fraction (the vector's sum), i.e. by closeness to an all-top-1 example. Ties (e.g. the first epoch,
when nothing is recorded yet) are broken by a random permutation drawn from ``seed + epoch``, so the
first epoch is an ordinary shuffle. Examples never recorded count as zero vectors (similarity 0).

The vectors live on the device of the fractions they record, so the per-step :meth:`update` costs no
host sync; :meth:`epoch_order` copies them to the host once per epoch.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Sampler


@torch.no_grad()
def top2_fractions(blocks) -> Tensor | None:
    """(b, L): each example's fraction of top-2 routing in each block of ``blocks`` ((name, block) pairs)
    whose latest forward reported ``extras["top2_fraction"]``; None when none did."""
    cols = [b.last.extras["top2_fraction"] for _, b in blocks
            if b.last is not None and "top2_fraction" in b.last.extras]
    return torch.stack(cols, dim=1) if cols else None


class Top2Curriculum(Sampler[int]):
    """Sampler-like ordering of ``num_examples`` dataset indices; call :meth:`update` after each batch."""

    def __init__(self, num_examples: int, num_layers: int, *, seed: int = 0):
        self.num_examples, self.num_layers, self.seed = num_examples, num_layers, seed
        self.epoch = 0
        self.vectors = torch.zeros(num_examples, num_layers)   # (examples, L) top-2 fraction per layer; moves to
                                                                # the device of the first update

    def __len__(self) -> int:
        return self.num_examples

    @torch.no_grad()
    def update(self, example_ids: Tensor, fractions: Tensor) -> None:
        """Record the latest top-2 fractions. example_ids: (b,) long, fractions: (b, L) in [0, 1]."""
        if fractions.shape != (example_ids.shape[0], self.num_layers):
            raise ValueError(f"fractions must be (batch, {self.num_layers}); got {tuple(fractions.shape)}")
        if self.vectors.device != fractions.device:
            self.vectors = self.vectors.to(fractions.device)
        self.vectors[example_ids.to(fractions.device).long()] = fractions.detach().float()  # on the device: no sync

    @torch.no_grad()
    def observe(self, blocks, example_ids: Tensor) -> None:
        """Record the latest forward's top-2 fractions of the adaptive-gating blocks among ``blocks``
        ((name, ExpertRoutingBlock) pairs); nothing when none of them reported one."""
        fractions = top2_fractions(blocks)
        if fractions is not None:
            self.update(example_ids, fractions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> list[int]:
        """Dataset indices for the next epoch, most similar to the fewest-top-2 example first."""
        v = self.vectors.cpu()                                                 # (examples, L), once per epoch
        perm = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        totals = v.sum(-1)                                                     # (examples,)
        ref = v[int(totals.argmin())]                                          # (L,)
        if bool(ref.abs().sum() > 0):
            key = -F.cosine_similarity(v, ref[None, :], dim=-1, eps=1e-12)     # descending similarity
        else:
            key = totals                                                       # fallback: ascending total
        # stable sort of the randomly permuted indices: ties keep the random order
        order = perm[torch.sort(key[perm], stable=True).indices]
        return order.tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order())
