"""A trial's precision: float32, or a bf16 autocast of the forward passes (issue 13). The routing math that
needs float32 keeps it inside the methods (``smear.routing._base.routing_region``)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch


@dataclass(frozen=True)
class Precision:
    """A trial's resolved precision: bf16 autocast of the forward passes on ``device_type``, or float32."""

    device_type: str
    bf16: bool

    def autocast(self) -> ContextManager[None]:
        """The context of one forward pass: a bf16 autocast, or nothing."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``precision`` of the config on ``device``: auto = bf16 on a CUDA device that supports it, fp32 elsewhere
    (the CPU default); bf16 = bf16 autocast on any device (on the CPU through ``torch.autocast("cpu")``)."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    else:
        bf16 = precision == "bf16"
    return Precision(device.type, bf16)
