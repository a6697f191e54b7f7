"""The one contract every routing method follows, and the stacked experts and router they share.

Axes used in every docstring and einsum: b = batch (examples), s = positions (tokens or pixels),
c = model width, r = adapter bottleneck, n = experts.

Precision. The routing math runs in max(input dtype, float32) (:func:`routing_dtype`), inside
:func:`routing_region` with its inputs cast by :func:`routing_float`: the router (its LayerNorms and
logits), softmaxes over experts, Gumbel noise and temperatures, DSelect-k's gate and regulariser,
REINFORCE's baseline, and every auxiliary loss. Under a bf16 autocast (``precision`` in the trial config)
the experts' matmuls run in bf16 and the routing math in float32: ``RoutingOutput.probs`` and ``aux_loss``
are float32 in every method. A float32 block computes as before; a float64 block (``block.double()``)
computes in float64 throughout, so that ``torch.autograd.gradcheck`` can check a method
(tests/test_routing_gradcheck.py).
Masks fill with ``torch.finfo(dtype).min``, never a constant.

Randomness. A forward's draws (expert dropout, Gumbel noise, REINFORCE's sample, AdaMix's experts, latent
skills' relaxed Bernoulli sample) come from ``RoutingContext.generator``: None (the default, in every
trial) draws from torch's global RNG, so a trial's seed fixes them; a ``torch.Generator`` on the block's
device makes a draw reproducible without touching the global RNG (tests/test_routing_methods.py).

Nothing in a forward reads a device tensor back to the host (no ``.item()``, ``bool()``, ``float()``):
a training step queues work on the device without waiting for it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, ContextManager, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smear.routing.config import RoutingCommon as RoutingConfig  # the composed class subclasses it


@dataclass
class RoutingContext:
    """Per-forward information that the backbone's own forward cannot carry to its blocks.

    One object is shared by every block of a model (see ``smear.routing.set_context``).
    """

    task_ids: Tensor | None = None     # (b,) long: task / domain id, for tag and latent skills
    example_ids: Tensor | None = None  # (b,) long: dataset index, for hash routing
    step: int = 0                      # global training step, for temperature schedules
    mask: Tensor | None = None         # (b, s) bool, True = real token of the encoder input (sequence layout)
    encoder_summary: Tensor | None = None  # (b, c): masked mean of the encoder output, router input of
                                           # decoder blocks (computed once per example, reused every step)
    generator: torch.Generator | None = None  # the source of every routing draw in a forward; None = torch's
                                              # global RNG (training). On the blocks' device


@dataclass
class RoutingInputs:
    x: Tensor          # (b, s, c) expert input
    mask: Tensor       # (b, s) bool, True = real position
    u: Tensor          # (b, c) router input: masked mean of the block input over positions
    ctx: RoutingContext
    training: bool
    u_normed: Tensor | None = None  # (b, c) the router's LayerNormed input (None for methods without a router)


@dataclass
class RoutingOutput:
    y: Tensor                      # (b, s, c) the experts' combined output (before the block's residual)
    probs: Tensor                  # (b, n) routing distribution (for logging and specialisation plots)
    aux_loss: Tensor               # scalar, zero when unused
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific (log-probs, baselines, ...)


def swish(x: Tensor) -> Tensor:
    return F.silu(x)


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the routing math for inputs of ``dtype``: max(dtype, float32). bf16 and fp16 -> float32,
    float32 -> float32, float64 -> float64."""
    return torch.promote_types(dtype, torch.float32)


def routing_float(t: Tensor) -> Tensor:
    """``t`` in :func:`routing_dtype` (``t`` itself when it is float32 or float64): the cast of a routing input."""
    return t.to(routing_dtype(t.dtype))


def routing_region(like: Tensor) -> ContextManager[None]:
    """A region where autocast is off on ``like``'s device, so that inputs cast by :func:`routing_float` give
    results in that dtype (float32 routing math under a bf16 autocast run, float64 in a float64 block); a
    no-op context when autocast is off there already.

    Inputs that may be bf16 must still be cast with :func:`routing_float` inside the region.
    """
    device_type = like.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def one_hot(idx: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot rows in ``dtype`` (float32 by default): ``F.one_hot(idx, num_classes).to(dtype)`` without its
    range check, which reads ``idx`` back to the host on the CPU (the indices here are in range by
    construction). idx: (...) -> (..., n)."""
    return (idx.unsqueeze(-1) == torch.arange(num_classes, device=idx.device)).to(dtype)


def add_bias(h: Tensor, bias: Tensor) -> Tensor:
    """h + bias in h's dtype: under autocast a matmul gives bf16 h, and adding the float32 parameter would
    promote the whole (b, s, r) activation to float32."""
    return h + bias.to(h.dtype)


class ExpertBank(nn.Module):
    """N bottleneck adapters stacked as tensors: f_n(x) = swish(x W_down[n] + b_down[n]) W_up[n].

    methods.md section 1: ``W_down[N, C, r]``, ``b_down[N, r]``, ``W_up[N, r, C]``, no up bias,
    weights initialised N(0, 0.01^2).
    """

    def __init__(self, num_experts: int, dim: int, rank: int, init_std: float = 0.01):
        super().__init__()
        self.num_experts, self.dim, self.rank = num_experts, dim, rank
        self.w_down = nn.Parameter(torch.randn(num_experts, dim, rank) * init_std)  # (n, c, r)
        self.b_down = nn.Parameter(torch.zeros(num_experts, rank))                # (n, r)
        self.w_up = nn.Parameter(torch.randn(num_experts, rank, dim) * init_std)    # (n, r, c)

    # --- building one adapter per example -------------------------------------------------------
    def merge(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-example merged expert, sum_n p[b, n] theta_n (SMEAR eq. 2): one matmul per tensor.

        p: (b, n) -> w_down (b, c, r), b_down (b, r), w_up (b, r, c).
        """
        b, (n, c, r) = p.shape[0], self.w_down.shape
        w_down = (p @ self.w_down.reshape(n, c * r)).view(b, c, r)
        b_down = p @ self.b_down
        w_up = (p @ self.w_up.reshape(n, r * c)).view(b, r, c)
        return w_down, b_down, w_up

    def gather(self, idx: Tensor, gate: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Each example's chosen expert. idx: (b,) long -> w_down (b, c, r), b_down (b, r), w_up (b, r, c).

        ``gate`` (b,) scales the expert's output, g * f_e(x), folded into the gathered up-projection
        (cheaper than scaling the (b, s, c) output). index_select, not w[idx]: its backward is a fast
        index_add instead of an accumulating index_put (benchmarks/routing_cost.py, BENCHMARKS.md).
        """
        w_up = self.w_up.index_select(0, idx)                                  # (b, r, c)
        if gate is not None:
            w_up = w_up * gate[:, None, None]
        return self.w_down.index_select(0, idx), self.b_down.index_select(0, idx), w_up

    @staticmethod
    def apply(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor) -> Tensor:
        """One adapter per example with two batched matmuls. x: (b, s, c) -> (b, s, c)."""
        h = swish(torch.baddbmm(b_down.unsqueeze(1), x, w_down))  # (b, s, r)
        return torch.bmm(h, w_up)                                  # (b, s, c)

    def apply_shared(self, x: Tensor, n: int = 0) -> Tensor:
        """Expert n for every example (a dense adapter). x: (b, s, c) -> (b, s, c)."""
        h = swish(add_bias(torch.matmul(x, self.w_down[n]), self.b_down[n]))  # (b, s, r)
        return torch.matmul(h, self.w_up[n])                         # (b, s, c)

    def apply_all(self, x: Tensor) -> Tensor:
        """Every expert on every example, einsum over the stack. x: (b, s, c) -> (b, n, s, c)."""
        h = swish(add_bias(torch.einsum("bsc,ncr->bnsr", x, self.w_down), self.b_down[None, :, None, :]))  # (b, n, s, r)
        return torch.einsum("bnsr,nrc->bnsc", h, self.w_up)


class Router(nn.Module):
    """p = softmax(LayerNorm(u) . W_hat) (SMEAR paper section 3; methods.md section 1).

    W is (c, n), init N(0, 0.01^2), no bias. W_hat normalises each expert column of W over c:
      shared (``weight_norm="shared"``, the official ``Router`` in ``adapter_utils.py`` of both code
        trees: ``multi_router_weights_layer_norms[i](router_weights[i].T).T``): ONE ``nn.LayerNorm(c)``
        for every column, gain (c,) init ``gain_init`` = 0.01 and bias (c,) init 0. The bias adds
        LN(u) . beta to every expert's logit alike, so it cancels in the softmax.
      per_expert: each column its own gain and bias, (n, c); each expert's bias is then an extra,
        unnormalised router weight (this project before issue 10).
    Logits start small, so routing starts near uniform. Everything here is in max(input dtype, float32),
    float32 under autocast too (:func:`routing_region`): the input LayerNorm, W_hat and the logits.
    """

    def __init__(self, dim: int, num_experts: int, init_std: float = 0.01, gain_init: float = 0.01,
                 weight_norm: str = "shared"):
        super().__init__()
        self.in_norm = nn.LayerNorm(dim)
        self.weight = nn.Parameter(torch.randn(dim, num_experts) * init_std)     # (c, n)
        rows = () if weight_norm == "shared" else (num_experts,)
        self.col_gain = nn.Parameter(torch.full((*rows, dim), gain_init))         # (c,) or (n, c)
        self.col_bias = nn.Parameter(torch.zeros(*rows, dim))                     # (c,) or (n, c)

    def normalised_weight(self) -> Tensor:
        """W_hat as (n, c): each expert column layer-normalised over c, then the gain and bias."""
        w = F.layer_norm(self.weight.t(), (self.weight.shape[0],))                # (n, c)
        return w * self.col_gain + self.col_bias                                  # (n, c)

    def normed_input(self, u: Tensor) -> Tensor:
        """LayerNorm(u) in max(u's dtype, float32). u: (..., c) -> (..., c)."""
        with routing_region(u):
            return self.in_norm(routing_float(u))

    def logits(self, u_normed: Tensor) -> Tensor:
        """u_normed: (..., c), the output of :meth:`normed_input` -> logits (..., n), float32 (float64 blocks: float64)."""
        with routing_region(u_normed):
            return routing_float(u_normed) @ self.normalised_weight().t()

    def forward(self, u: Tensor) -> Tensor:
        """u: (..., c) -> logits (..., n), float32 (float64 blocks: float64)."""
        return self.logits(self.normed_input(u))


def expert_dropout_logits(logits: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Training-only expert dropout: each expert is dropped with probability ``rate``.

    Softmax of the result is the renormalised distribution over the kept experts, as the official
    router's ``adapter_probs * mask`` renormalised (``adapter_utils.py``, ``Router.forward``). A row
    whose experts are all dropped gets the uniform distribution, as there ((0 + 1e-10) / (n * 1e-10)).
    The fill value is the dtype's most negative finite number (-1e9 overflows float16).
    The mask is drawn in float32 (whatever the logits' dtype) from ``generator`` (None: the global RNG).
    """
    if rate <= 0:
        return logits
    drop = torch.rand(logits.shape, dtype=torch.float32, device=logits.device, generator=generator) < rate  # (b, n)
    all_dropped = drop.all(dim=-1, keepdim=True)                          # (b, 1)
    out = logits.masked_fill(drop, torch.finfo(logits.dtype).min)
    return torch.where(all_dropped, torch.zeros_like(logits), out)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


class EpochSampler(Protocol):
    """A torch Sampler over training-example indices that reorders each epoch from what it observes."""

    def set_epoch(self, epoch: int) -> None: ...
    def observe(self, blocks: list[tuple[str, nn.Module]], example_ids: Tensor) -> None: ...
    def __iter__(self) -> Iterator[int]: ...
    def __len__(self) -> int: ...


class RoutingMethod(nn.Module):
    """Base class of every routing method: ``forward(experts, inputs, logits) -> RoutingOutput``.

    Class attributes a method may override:
      uses_router     -- whether the block builds a learned Router for it (logits is None otherwise)
      expert_dropout  -- whether training applies expert dropout to the router logits first
      mixes_positions -- True when outputs at one position depend on other positions (Soft MoE):
                         refused in causal decoder blocks
      two_pass_consistency -- True when training runs the model twice and adds
                         :meth:`consistency` between the passes (AdaMix)
      gradcheck       -- what ``torch.autograd.gradcheck`` checks of a float64 block in training, with the
                         draws fixed by ``RoutingContext.generator`` (tests/test_routing_gradcheck.py):
                         "all" (the default) -- the block output, probabilities and auxiliary loss as
                           functions of the input and every parameter;
                         "experts" -- as functions of the parameters the router does not read (the
                           experts and the block's norm after them) only: the router's gradient is an
                           estimator, not the derivative of the output (a straight-through estimator);
                           say why beside the attribute;
                         "none" -- nothing (say why beside the attribute).
                         Evaluation forwards are checked in full for every method.

    Hooks the train loop reaches through ``smear.routing`` (so that the loop names no method):
      task_loss_terms / block_reduction -- loss terms that need the per-example task loss (REINFORCE)
      step_scalars    -- per-step scalars to log as ``routing/<key>`` (ST-Gumbel's temperature)
      consistency     -- the loss between two stochastic forwards of the model (AdaMix)
      epoch_sampler   -- an order of the training examples for each epoch (adaptive gating's curriculum)
      param_groups    -- learning-rate multipliers of the method's parameters (latent skills)
      size_to_data    -- the config sized to the dataset (hash routing's tables)
    Its hyper-parameters are the fields of its ``Params`` dataclass, in its own file; they join the flat
    ``RoutingConfig`` (``routing.<field>``).
    """

    name: str = "?"
    Params: type | None = None   # a dataclass of this method's ``routing.*`` fields (smear.configs.field)
    uses_router: bool = True
    expert_dropout: bool = False
    mixes_positions: bool = False
    two_pass_consistency: bool = False
    gradcheck: str = "all"

    def __init__(self, cfg: RoutingConfig, *, dim: int, num_experts: int, rank: int, num_tasks: int):
        super().__init__()
        self.cfg, self.dim, self.num_experts, self.rank, self.num_tasks = cfg, dim, num_experts, rank, num_tasks

    @classmethod
    def expert_shape(cls, cfg: RoutingConfig) -> tuple[int, int]:
        """(number of experts, rank) of the block's ExpertBank for this method."""
        return cfg.num_experts, cfg.rank

    def forward(self, experts: ExpertBank, inp: RoutingInputs, logits: Tensor | None) -> RoutingOutput:
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: RoutingConfig) -> None:
        """Rules between this method's fields (a one-line ``ConfigError``), checked when a config is built."""

    @classmethod
    def check_causal(cls, cfg: RoutingConfig) -> None:
        """Refuse (a one-line ``ConfigError``) a config this method cannot run in causal decoder blocks, where
        routing must not change across decoding steps; nothing by default."""

    def share_task_experts(self, aliases: dict[int, int]) -> None:
        """Route task ``a`` as task ``b`` for each ``a -> b`` in ``aliases`` (a setting declares them, e.g. T5's
        RTE with MNLI's expert); nothing for a method that does not route by task."""

    @classmethod
    def size_to_data(cls, cfg: RoutingConfig, num_examples: int) -> RoutingConfig:
        """The config this method needs for a dataset of ``num_examples`` (a copy when it changes anything)."""
        return cfg

    def task_loss_terms(self, out: RoutingOutput, per_example_loss: Tensor) -> Tensor:
        """Loss terms that need the per-example task loss (REINFORCE); zero for most methods."""
        return per_example_loss.new_zeros(())

    def block_reduction(self) -> str:
        """How :meth:`task_loss_terms` combine over the model's blocks: "sum" or "mean" (REINFORCE)."""
        return "sum"

    def step_scalars(self, out: RoutingOutput | None, step: int) -> dict[str, float]:
        """Scalars of the latest forward (``out``; None before any) at training step ``step``, logged as
        ``routing/<key>`` at each evaluation; none for most methods."""
        return {}

    def consistency(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        """The loss between two training forwards' outputs; methods with ``two_pass_consistency`` define it."""
        raise NotImplementedError(f"{self.name} does not run two passes")

    def epoch_sampler(self, *, num_examples: int, num_blocks: int, seed: int) -> "EpochSampler | None":
        """An :class:`EpochSampler` that orders each training epoch (single-process training), or None."""
        return None

    def param_groups(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (relative to this module), e.g. latent skills' 10x."""
        return {}

    def zero(self, like: Tensor) -> Tensor:
        """A zero in max(``like``'s dtype, float32) on its device: the ``aux_loss`` of a method without one."""
        return like.new_zeros((), dtype=routing_dtype(like.dtype))
