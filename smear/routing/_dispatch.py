"""How a weighted set of experts is applied without a Python loop: gathered top-k and dense mixtures.

Axes: b = batch, s = positions, c = width, r = bottleneck, n = experts, k = chosen experts per example.

Both helpers use that an adapter is linear in its up-projection, so a weighted sum of k (or n)
adapters is one adapter of rank k*r (n*r) whose hidden units are scaled by the weights:

    sum_k w_k swish(x Wd_k + bd_k) Wu_k = [w_1 h_1 | ... | w_k h_k] . [Wu_1; ...; Wu_k]

This never materialises the per-expert outputs (b, n, s, c); the largest intermediate is (b, s, k*r).
Under a bf16 autocast the intermediates stay bf16: the float32 routing weights are cast to h's dtype
(the matmul after them would cast them anyway).
"""
from __future__ import annotations

import torch
from torch import Tensor

from smear.routing._base import ExpertBank, add_bias, swish


def apply_topk(experts: ExpertBank, x: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """y[b] = sum_k weight[b, k] f_{idx[b, k]}(x[b]): gather each example's k experts, two bmm calls.

    x: (b, s, c), idx: (b, k) long, weight: (b, k) -> (b, s, c). Cost: k adapters per example.
    """
    b, k = idx.shape
    n, c, r = experts.w_down.shape
    flat = idx.reshape(-1)                                                  # (b*k,) index_select: fast backward
    w_down = experts.w_down.index_select(0, flat).view(b, k, c, r).permute(0, 2, 1, 3).reshape(b, c, k * r)
    b_down = experts.b_down.index_select(0, flat).reshape(b, 1, k * r)      # (b, 1, k*r)
    w_up = experts.w_up.index_select(0, flat).reshape(b, k * r, c)          # (b, k*r, c)
    h = swish(torch.baddbmm(b_down, x, w_down))                             # (b, s, k*r)
    h = h * weight.to(h.dtype).repeat_interleave(r, dim=1).unsqueeze(1)     # (b, s, k*r), in h's dtype (bf16)
    return h @ w_up                                                         # (b, s, c)


def apply_dense(experts: ExpertBank, x: Tensor, weight: Tensor) -> Tensor:
    """y = sum_n weight[..., n] f_n(x) with every expert on every position, shared (unrepeated) weights.

    x: (b, s, c); weight: (b, n) per example or (b, s, n) per position -> (b, s, c).
    Cost: n adapters (b*s*n*2cr multiply-adds); memory (b, s, n*r).
    """
    n, c, r = experts.w_down.shape
    w_down = experts.w_down.permute(1, 0, 2).reshape(c, n * r)  # (c, n*r)
    b_down = experts.b_down.reshape(n * r)                      # (n*r,)
    w_up = experts.w_up.reshape(n * r, c)                       # (n*r, c)
    h = swish(add_bias(x @ w_down, b_down))                    # (b, s, n*r)
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)                            # (b, 1, n)
    h = h * weight.to(h.dtype).repeat_interleave(r, dim=-1)     # (b, s, n*r), in h's dtype (bf16)
    return h @ w_up                                             # (b, s, c)
