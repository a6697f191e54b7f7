"""Routing methods behind one registry, the expert routing block, and model-level helpers.

Every method is one file in ``smear/routing/methods/`` (file name = registry key), registered on import.
This package face re-exports: the contract (``_base``), the registry, the block, the config, and the
model-level helpers (``model``), which ask the methods' hooks: nothing here or in the train loop names
a method.
"""
from __future__ import annotations

import importlib
import pkgutil

from smear.routing import methods as _methods
from smear.routing._base import EpochSampler, RoutingContext, RoutingMethod, RoutingOutput, entropy
from smear.routing._curriculum import Top2Curriculum
from smear.routing._registry import DEFAULT_METHOD, available_methods, get_method_class, method_params, register_method
from smear.routing.block import ExpertRoutingBlock
from smear.routing.config import RoutingCommon, compose_routing_config
from smear.routing.model import (
    aux_loss, check_causal, consistency_loss, current_temperature, epoch_sampler, needs_two_passes,
    optimizer_param_groups, routing_blocks, routing_probs, routing_stats, set_context, share_task_experts,
    step_scalars, top2_fractions,
)

for _m in pkgutil.iter_modules(_methods.__path__):
    importlib.import_module(f"{_methods.__name__}.{_m.name}")

RoutingConfig = compose_routing_config(method_params())  # the common fields + every method's Params

__all__ = [
    "ExpertRoutingBlock", "RoutingConfig", "RoutingCommon", "RoutingContext", "RoutingMethod", "RoutingOutput", "EpochSampler",
    "available_methods", "get_method_class", "register_method", "routing_blocks", "aux_loss", "set_context",
    "routing_probs", "routing_stats", "step_scalars", "current_temperature", "needs_two_passes",
    "consistency_loss", "epoch_sampler", "optimizer_param_groups", "top2_fractions", "Top2Curriculum", "entropy",
    "check_causal", "share_task_experts", "DEFAULT_METHOD",
]
