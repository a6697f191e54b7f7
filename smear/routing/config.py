"""RoutingConfig: every hyper-parameter of every routing method, defaults = the reference values.

One flat, typed dataclass (``routing.<field>`` in a declaration), composed from the fields all methods
share (:class:`RoutingCommon`, here) and each method's own ``Params`` dataclass, declared in the method's
file (``smear/routing/methods/<name>.py``): :func:`compose_routing_config` builds it once every method is
registered. Defaults follow methods.md section 3 and the official code (docs/fidelity.md).
Setting-specific values (number of experts, rank, Gumbel anneal rate) default to the ResNet-DomainNet
setting; each setting's defaults override them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from smear.configs import field
from smear.routing._registry import DEFAULT_METHOD


@dataclass
class RoutingCommon:
    """The fields every method shares; ``smear.routing.RoutingConfig`` adds each method's ``Params``."""

    method: str = field(DEFAULT_METHOD, doc="registry key, see smear.routing.available_methods()")
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

    def sized_for(self, num_examples: int) -> "RoutingCommon":
        """This config as its method needs it for a dataset of ``num_examples`` (a copy, through
        :meth:`RoutingMethod.size_to_data`; hash routing sizes its tables): the validated, logged config
        is never changed."""
        from smear.routing._registry import get_method_class

        return get_method_class(self.method).size_to_data(self, num_examples)

    def validate(self) -> None:
        from smear.routing._registry import available_methods
        from smear.configs import ConfigError

        if self.method not in available_methods():
            raise ConfigError(f"routing.method={self.method!r} is not valid; valid: {', '.join(available_methods())}")
        from smear.routing._registry import get_method_class

        get_method_class(self.method).check_config(self)


def compose_routing_config(params: list[type]) -> type:
    """The RoutingConfig class: :class:`RoutingCommon` then every method's ``Params`` fields, flat.

    A field declared twice (by two methods, or by a method and the common part) is an error.
    """
    seen = {f.name: "RoutingCommon" for f in dataclasses.fields(RoutingCommon)}
    for p in params:
        for f in dataclasses.fields(p):
            if f.name in seen:
                raise ValueError(f"routing field {f.name!r} declared by both {seen[f.name]} and {p.__qualname__}")
            seen[f.name] = p.__qualname__
    cls = dataclasses.make_dataclass("RoutingConfig", [], bases=(*reversed(params), RoutingCommon))
    cls.__module__, cls.__qualname__ = "smear.routing", "RoutingConfig"
    cls.__doc__ = __doc__
    return cls
