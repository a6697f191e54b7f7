"""The expert routing block shared by every method: stacked adapter experts, a router, a residual.

methods.md section 1. Two layouts:
  image    -- x (b, c, h, w):  out = x + f(BN(x)), adapters per spatial position (ResNet); the router
              input is the mean over positions of BN(x), as the official
              ``cvl/src/adapters/adapter_controller_resnet_fast.py`` (``cfg.image_router_input``)
  sequence -- x (b, s, c):     out = x + LN_post(f(x)) (T5), LN_post = nn.LayerNorm(c) as the official
              ``hyperformer/.../adapter_controller_fast.py`` (``cfg.post_norm``); padding masked out of
              the router input (``cfg.router_pooling``: the official code averages over padding too)
The routing method (registry key) decides how the experts are applied; the block owns the experts.
Under a bf16 autocast the router input is accumulated in float32 and the router runs in float32
(``smear.routing._base.routing_region``); the experts run in bf16. A float64 block (``.double()``) runs in
float64 throughout. Expert dropout draws its mask from ``context.generator`` (None: the global RNG). In channels_last image tensors the
(b, h*w, c) token view is contiguous, so the block reads and writes them without a copy.

Sequence-layout blocks route either on their own input (``route_from="self"``: T5 encoder blocks,
padding masked with the context's mask) or on the encoder summary (``route_from="encoder"``: T5
decoder blocks, so routing is fixed for the whole decode and causal-safe). In decoder blocks a method
that mixes positions (Soft MoE) would leak future tokens; there it runs with every position as its
own group (for Soft MoE: a per-token softmax mixture of the experts), which is causal.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from smear.routing._base import (
    ExpertBank, Router, RoutingContext, RoutingInputs, RoutingOutput, expert_dropout_logits, routing_dtype,
)
from smear.routing._registry import get_method_class
from smear.routing.config import RoutingCommon as RoutingConfig  # the composed class subclasses it


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over positions of real tokens only, accumulated and returned in max(x's dtype, float32) (a router
    input; a bf16 x is read as it is, without a float32 copy). x: (b, s, c), mask: (b, s) bool -> (b, c)."""
    m = mask.to(x.dtype).unsqueeze(-1)                      # (b, s, 1): 0/1, exact in any dtype
    acc = routing_dtype(x.dtype)                            # float32 (float64 for a float64 x)
    return (x * m).sum(1, dtype=acc) / m.sum(1, dtype=acc).clamp_min(1.0)


class T5LayerNormLike(nn.Module):
    """RMS norm without mean subtraction or bias, as T5's LayerNorm (``post_norm="rms"``, before issue 10)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(routing_dtype(x.dtype))                                     # float32 (float64 stays float64)
        var = xf.pow(2).mean(-1, keepdim=True)
        return (xf * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class ExpertRoutingBlock(nn.Module):
    """Adapter experts + router + residual, routing method chosen by ``cfg.method``."""

    def __init__(self, dim: int, cfg: RoutingConfig, *, layout: Literal["image", "sequence"],
                 num_tasks: int = 1, context: RoutingContext | None = None,
                 route_from: Literal["self", "encoder"] = "self"):
        super().__init__()
        assert route_from == "self" or layout == "sequence", "only sequence blocks can route on the encoder"
        self.route_from = route_from
        method_cls = get_method_class(cfg.method)
        num_experts, rank = method_cls.expert_shape(cfg)
        self.layout, self.dim = layout, dim
        self.cfg = cfg
        self.context = context if context is not None else RoutingContext()
        self.experts = ExpertBank(num_experts, dim, rank, cfg.init_std)
        self.router = (Router(dim, num_experts, cfg.init_std, cfg.router_gain_init, cfg.router_weight_norm)
                       if method_cls.uses_router else None)
        self.method = method_cls(cfg, dim=dim, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
        if layout == "image":
            self.pre_norm: nn.Module = nn.BatchNorm2d(dim)
            self.post_norm: nn.Module = nn.Identity()
        else:
            self.pre_norm = nn.Identity()
            self.post_norm = nn.LayerNorm(dim, eps=1e-5) if cfg.post_norm == "layernorm" else T5LayerNormLike(dim)
        self.last: RoutingOutput | None = None  # output of the latest forward, read by losses and logging
        self.label = ""  # the block's name from model surgery (e.g. "layer4.1"), the key of its routing metrics

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def route(self, x: Tensor, mask: Tensor, u: Tensor) -> RoutingOutput:
        """x: (b, s, c), mask: (b, s), u: (b, c) -> RoutingOutput with y (b, s, c)."""
        logits = u_normed = None
        if self.router is not None:
            u_normed = self.router.normed_input(u)                                # (b, c) float32 (or float64)
            logits = self.router.logits(u_normed)                                 # (b, n) float32 (or float64)
            if self.training and self.method.expert_dropout:
                logits = expert_dropout_logits(logits, self.cfg.expert_dropout, self.context.generator)
        inp = RoutingInputs(x=x, mask=mask, u=u, ctx=self.context, training=self.training, u_normed=u_normed)
        out = self.method(self.experts, inp, logits)
        assert out.y.shape == x.shape, (out.y.shape, x.shape)
        assert out.probs.shape == (x.shape[0], self.num_experts), out.probs.shape
        self.last = out
        return out

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.layout == "image":
            b, c, h, w = x.shape
            normed = self.pre_norm(x)                                             # (b, c, h, w)
            u = (normed if self.cfg.image_router_input == "normed" else x).mean(dim=(2, 3), dtype=routing_dtype(x.dtype))  # (b, c)
            tokens = normed.flatten(2).transpose(1, 2)                            # (b, h*w, c)
            full = torch.ones(b, h * w, dtype=torch.bool, device=x.device)
            y = self.route(tokens, full, u).y                                     # (b, h*w, c)
            return x + y.transpose(1, 2).reshape(b, c, h, w)
        # sequence layout
        b, s, c = x.shape
        full = torch.ones(b, s, dtype=torch.bool, device=x.device)
        if self.route_from == "encoder":
            u = self.context.encoder_summary
            assert u is not None and u.shape == (b, c), "decoder blocks need the encoder summary in the context"
            if self.method.mixes_positions:  # causal: each position is its own group
                out = self.route(x.reshape(b * s, 1, c), full.reshape(b * s, 1), u.repeat_interleave(s, 0))
                y = out.y.reshape(b, s, c)
                self.last = type(out)(y=y, probs=out.probs.reshape(b, s, -1).mean(1), aux_loss=out.aux_loss,
                                      extras=out.extras)
                return x + self.post_norm(y)
            mask = full
        else:
            if mask is None:
                ctx_mask = self.context.mask
                mask = ctx_mask.bool() if ctx_mask is not None and ctx_mask.shape == (b, s) else full
            u = masked_mean(x, mask if self.cfg.router_pooling == "masked" else full)
        y = self.route(self.pre_norm(x), mask, u).y
        return x + self.post_norm(y)
