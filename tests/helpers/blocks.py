"""Tiny routing blocks and batches for the routing tests (every layout, every registered method)."""
from __future__ import annotations

import torch

from smear.configs import build
from smear.routing import ExpertRoutingBlock, RoutingConfig, available_methods, set_context

DIM, RANK, N, S = 16, 4, 4, 5
ALL = available_methods()
LAYOUTS = ["image", "sequence"]


def make_block(method: str, layout: str = "sequence", n: int = N, seed: int = 0, context=None, **over):
    cfg = build(RoutingConfig, {"method": method, "num_experts": n, "rank": RANK, "hash_num_examples": 256, **over})
    torch.manual_seed(seed)
    return ExpertRoutingBlock(DIM, cfg, layout=layout, num_tasks=n, context=context)


def make_batch(layout: str, b: int, seed: int = 1, n: int = N):
    """x, mask (None in image layout) and the context values for a batch of b examples."""
    g = torch.Generator().manual_seed(seed)
    if layout == "image":
        x, mask = torch.randn(b, DIM, 2, 3, generator=g), None                # (b, c, h, w)
    else:
        x = torch.randn(b, S, DIM, generator=g)                                 # (b, s, c)
        lengths = torch.arange(b) % S + 1                                       # 1..S real tokens
        mask = torch.arange(S)[None, :] < lengths[:, None]                      # (b, s)
    ctx = {"task_ids": torch.arange(b) % n, "example_ids": torch.arange(b), "step": 0}
    return x, mask, ctx


def run(block, x, mask, ctx):
    set_context(block, **ctx)
    return block(x, mask) if block.layout == "sequence" else block(x)
