"""Every registered routing method (methods.md section 3) on tiny CPU blocks, plus hand-worked numbers.

Parametrised over the registry: shapes, finiteness, gradients to every parameter, seeding,
deterministic evaluation, per-example independence. Then the pure functions (smooth-step, DSelect-k
weights, Gumbel schedules, REINFORCE terms, adaptive choice, balance loss) against numbers worked by
hand, equivalences between methods, and the model-level helpers in ``smear.routing``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smear.configs import ConfigError, build
from smear.routing import (
    ExpertRoutingBlock, RoutingConfig, RoutingContext, Top2Curriculum, aux_loss, available_methods,
    consistency_loss, current_temperature, needs_two_passes, optimizer_param_groups, routing_stats,
    set_context, top2_fractions,
)
from smear.routing._base import ExpertBank, RoutingInputs
from smear.routing._dispatch import apply_dense, apply_topk
from smear.routing.methods.adaptive_gating import adaptive_choice, top1_balance_loss
from smear.routing.methods.dselect_k import dselect_weights, smooth_step
from smear.routing.methods.reinforce import reinforce_terms
from smear.routing.methods.st_gumbel import gumbel_temperature

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


# --- every method ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL)
def test_forward_shape_and_finite(method, layout):
    blk = make_block(method, layout)
    x, mask, ctx = make_batch(layout, 3)
    for train in (True, False):
        blk.train(train)
        out = run(blk, x, mask, ctx)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()
        last = blk.last
        assert last.probs.shape == (3, blk.num_experts) and torch.isfinite(last.probs).all()
        assert last.aux_loss.shape == () and torch.isfinite(last.aux_loss)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL)
def test_every_parameter_gets_gradient(method, layout):
    # b = 64 examples so that every expert is picked by some example in the discrete methods
    # (hash, top_k, st_gumbel, reinforce, adamix: P(an expert unused) < 4 * (3/4)^64 ~ 4e-8 for random picks)
    blk = make_block(method, layout).train()
    x, mask, ctx = make_batch(layout, 64)
    out = run(blk, x, mask, ctx)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    per_example = (out - target).pow(2).flatten(1).mean(1)                      # (b,)
    (per_example.mean() + aux_loss(blk, per_example)).backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if method not in ("adapter", "adapter_large"):
        assert (blk.experts.w_down.grad.abs().sum(dim=(1, 2)) > 0).all(), "an expert got no gradient"
        assert (blk.experts.w_up.grad.abs().sum(dim=(1, 2)) > 0).all(), "an expert got no gradient"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL)
def test_same_seed_same_output(method, layout):
    x, mask, ctx = make_batch(layout, 3)
    outs = []
    for _ in range(2):
        blk = make_block(method, layout, seed=0).train()
        torch.manual_seed(5)                                                    # training randomness
        outs.append(run(blk, x, mask, ctx))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL)
def test_eval_is_deterministic_and_per_example(method, layout):
    blk = make_block(method, layout).eval()
    x, mask, ctx = make_batch(layout, 3)
    with torch.no_grad():
        a, b = run(blk, x, mask, ctx), run(blk, x, mask, ctx)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        # example 1 alone gives its batched output: nothing mixes across examples
        one = {"task_ids": ctx["task_ids"][1:2], "example_ids": ctx["example_ids"][1:2], "step": 0}
        alone = run(blk, x[1:2], None if mask is None else mask[1:2], one)
        torch.testing.assert_close(alone, a[1:2], rtol=1e-5, atol=1e-6)
        if layout == "sequence":
            # garbage in padded positions changes no real position's output (Soft MoE included)
            noisy = x.clone()
            noisy[~mask] = 50.0
            c = run(blk, noisy, mask, ctx)
            torch.testing.assert_close(c[mask], a[mask], rtol=1e-5, atol=1e-6)


def test_soft_moe_sequence_with_padding_masks_dispatch_and_output():
    blk = make_block("soft_moe", "sequence").eval()
    assert blk.method.mixes_positions
    x, mask, ctx = make_batch("sequence", 3)
    with torch.no_grad():
        out = run(blk, x, mask, ctx)
    torch.testing.assert_close(out[~mask], x[~mask])                        # y = 0 at padding: residual only
    torch.testing.assert_close(blk.last.probs.sum(-1), torch.ones(3))       # mean combine weights sum to 1


def test_soft_moe_per_slot_scale_and_several_slots():
    blk = make_block("soft_moe", "sequence", soft_moe_scale="per_slot", soft_moe_slots_per_expert=2).train()
    assert blk.method.scale.shape == (2 * N,) and blk.method.phi.shape == (DIM, 2 * N)
    x, mask, ctx = make_batch("sequence", 4)
    run(blk, x, mask, ctx).pow(2).sum().backward()
    assert blk.method.scale.grad.abs().min() > 0


def test_dselect_k_with_two_selectors_gets_gradients():
    blk = make_block("dselect_k", "sequence", n=6, dselect_k=2).train()
    x, mask, ctx = make_batch("sequence", 8, n=6)
    out = run(blk, x, mask, ctx)
    (out.pow(2).sum() + blk.last.aux_loss).backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("granularity", ["example", "token"])
@pytest.mark.parametrize("normalization", ["softmax", "top2"])
def test_adaptive_gating_variants(granularity, normalization):
    blk = make_block("adaptive_gating", "sequence", adaptive_granularity=granularity,
                     adaptive_normalization=normalization, adaptive_threshold=0.5).train()
    x, mask, ctx = make_batch("sequence", 6)
    out = run(blk, x, mask, ctx)
    frac = blk.last.extras["top2_fraction"]
    assert frac.shape == (6,) and ((frac >= 0) & (frac <= 1)).all()
    (out.pow(2).sum() + blk.last.aux_loss).backward()
    assert blk.method.router.weight.grad.abs().sum() > 0


# --- hand-worked numbers ----------------------------------------------------------------------------

def test_smooth_step_values():
    t = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.6])
    # S(t) = -2t^3/g^3 + 3t/(2g) + 1/2 on (-g/2, g/2), g = 1:
    #   S(0.25)  = -2/64 + 3/8 + 1/2 = -0.03125 + 0.375 + 0.5 = 0.84375
    #   S(-0.25) =  0.03125 - 0.375 + 0.5 = 0.15625
    #   S(+-0.5) = 1, 0 (the cubic meets the constants: -2/8 + 3/4 + 1/2 = 1)
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0])
    torch.testing.assert_close(smooth_step(t), expected)
    # g = 2: S(0.5) = -2 * 0.125 / 8 + 1.5 / 4 + 0.5 = -0.03125 + 0.375 + 0.5 = 0.84375
    torch.testing.assert_close(smooth_step(torch.tensor(0.5), gamma=2.0), torch.tensor(0.84375))


def test_dselect_weights_hand_worked():
    z = torch.tensor([[[0.25, -0.25]]])                                          # (b=1, k=1, m=2)
    # S(z) = [0.84375, 0.15625]; bit j of expert i is (i >> j) & 1:
    #   r_0 (00) = (1 - .84375)(1 - .15625) = .15625 * .84375 = 0.1318359375
    #   r_1 (01) = .84375 * .84375 = 0.7119140625
    #   r_2 (10) = .15625 * .15625 = 0.0244140625
    #   r_3 (11) = .84375 * .15625 = 0.1318359375      sum = 1
    q, r = dselect_weights(z, None, num_experts=4)
    expected = torch.tensor([[0.1318359375, 0.7119140625, 0.0244140625, 0.1318359375]])
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(r[:, 0], expected)
    # N = 3 (not a power of two): only codes 0..2 exist, sum = 1 - 0.1318359375 = 0.8681640625
    q3, _ = dselect_weights(z, None, num_experts=3)
    torch.testing.assert_close(q3, expected[:, :3])
    # k = 2 selectors, softmax(w) = softmax([0, ln 3]) = [0.25, 0.75]; selector 2 has z = [0.5, 0.5] -> expert 3
    z2 = torch.tensor([[[0.25, -0.25], [0.5, 0.5]]])
    q2, _ = dselect_weights(z2, torch.tensor([[0.0, math.log(3.0)]]), num_experts=4)
    torch.testing.assert_close(q2, 0.25 * expected + 0.75 * torch.tensor([[0.0, 0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dselect_regularizer_hand_worked(reduction):
    blk = make_block("dselect_k", "sequence", n=3, dselect_reduction=reduction).train()
    nn.init.zeros_(blk.method.z_proj.weight)                                    # z = 0 -> S = 1/2 -> r_i = 1/4
    x, mask, ctx = make_batch("sequence", 2, n=3)
    run(blk, x, mask, ctx)
    # the SMEAR code's forward_dselectk_routing, per example (r = 1/4 on codes 0..2, k = 1 selector):
    #   entropy  -sum_i r_i ln(r_i + 1e-6) = -0.75 ln(0.250001) = 1.0397178
    #   penalty  1 / sum_i (r_i + 1e-6)    = 1 / 0.750003      = 1.3333280
    #   both weighed by load_loss_weight = 0.1: 0.1 * 2.3730458 = 0.2373046 (mean); x 2 examples (sum)
    per_example = 0.1 * (-0.75 * math.log(0.250001) + 1.0 / 0.750003)
    assert per_example == pytest.approx(0.2373046, abs=1e-7)
    expected = per_example * (1 if reduction == "mean" else 2)
    torch.testing.assert_close(blk.last.aux_loss, torch.tensor(expected))
    torch.testing.assert_close(blk.last.probs, torch.full((2, 3), 1.0 / 3.0))  # q renormalised for logging
    # the switch back to the earlier weighting: penalty weighed 1.0 -> 0.1 * 1.0397178 + 1.3333280 = 1.4373 per example
    old = make_block("dselect_k", "sequence", n=3, dselect_reduction=reduction, dselect_invalid_weight=1.0).train()
    nn.init.zeros_(old.method.z_proj.weight)
    run(old, x, mask, ctx)
    torch.testing.assert_close(old.last.aux_loss, torch.tensor((0.1 * 1.0397178 + 1.3333280) * (expected / per_example)))


def test_dselect_regularizer_entropy_is_averaged_over_selectors():
    blk = make_block("dselect_k", "sequence", n=4, dselect_k=2).train()        # power of 2: entropy only
    r = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])        # (b=1, k=2, n=4)
    # H = [-ln(0.250001), -ln(1.000001)] = [1.3862904, -1e-6]; mean over selectors 0.6931447; x 0.1
    expected = 0.1 * 0.5 * (-math.log(0.250001) - math.log(1.000001))
    torch.testing.assert_close(blk.method.regularizer(r), torch.tensor(expected))


def test_dselect_stuck_selector_gives_a_bounded_penalty():
    # six experts, three bits: a selector whose bits all say 1 picks code 7, which does not exist: sum r = 0
    blk = make_block("dselect_k", "sequence", n=6).train()
    r = torch.zeros(2, 1, 6)
    # official epsilon form: 1 / (0 + 6e-6) = 166,666.67, weighed 0.1 (1 / clamp_min(0, 1e-12) was 1e12)
    torch.testing.assert_close(blk.method.regularizer(r), torch.tensor(0.1 / 6e-6))
    with torch.no_grad():
        blk.method.z_proj.weight.fill_(1.0)                                     # z >> 1/2 on every bit
    x, mask, ctx = make_batch("sequence", 2, n=6)
    run(blk, x, mask, ctx)
    assert 0 < float(blk.last.aux_loss.detach()) <= 0.1 / 6e-6 + 1e-3


def _reference_t5_temperatures(steps: int, *, tau0, tau_min, rate, interval) -> list[float]:
    """The T5 trainer's loop, literally: before training step g, if (g + 1) % I == 0, compound the update."""
    temp, used = tau0, []
    for g in range(steps):
        if (g + 1) % interval == 0:
            temp = max(temp * math.exp(-rate * g), tau_min)
        used.append(temp)
    return used


def _reference_resnet_temperatures(steps: int, *, tau0, tau_min, rate, interval) -> list[float]:
    """cvl/src/train.py's loop, literally: train step g, then, if (g + 1) % I == 0, compound the update."""
    temp, used = tau0, []
    for g in range(steps):
        used.append(temp)
        if (g + 1) % interval == 0:
            temp = max(temp * math.exp(-rate * g), tau_min)
    return used


@pytest.mark.parametrize("layout,offset", [("t5", 1), ("resnet", 0)])
def test_gumbel_schedule_equals_the_reference_loops(layout, offset):
    kw = dict(tau0=10.0, tau_min=0.5, rate=0.004, interval=7)                  # small, to cover clipping
    ref = (_reference_t5_temperatures if layout == "t5" else _reference_resnet_temperatures)(300, **kw)
    ours = [gumbel_temperature(s, tau0=10.0, tau_min=0.5, rate=0.004, update_every=7, step_offset=offset)
            for s in range(300)]
    assert ours == pytest.approx(ref, rel=1e-12)
    assert min(ref) == 0.5 and ref[0] == 10.0


def test_gumbel_compounding_schedule_t5():
    kw = dict(tau0=10.0, tau_min=0.5, rate=1e-6, update_every=5000, schedule="compounding", step_offset=1)
    # K = (step + 1) // 5000 updates; tau = 10 exp(-1e-6 (5000 K(K+1)/2 - K))
    assert gumbel_temperature(4998, **kw) == 10.0                                  # K = 0: no update yet
    assert gumbel_temperature(4999, **kw) == pytest.approx(10 * math.exp(-0.004999))  # K = 1: 9.950135
    assert gumbel_temperature(4999, **kw) == pytest.approx(9.950135, abs=1e-6)
    assert gumbel_temperature(29999, **kw) == pytest.approx(9.003299, abs=1e-6)    # K = 6: exp(-0.104994)
    # <= 0.5 <=> 5000 K(K+1)/2 - K >= 1e6 ln 20 = 2,995,732: K = 34 gives 2,974,966, K = 35 gives 3,149,965
    assert gumbel_temperature(174998, **kw) == pytest.approx(10 * math.exp(-2.974966))  # 0.5105 > 0.5
    assert gumbel_temperature(174999, **kw) == 0.5
    first = next(s for s in range(0, 400001) if gumbel_temperature(s, **kw) == 0.5)
    assert first == 174999


def test_gumbel_compounding_schedule_resnet():
    kw = dict(tau0=10.0, tau_min=0.5, rate=1e-4, update_every=1000, schedule="compounding", step_offset=0)
    # K = step // 1000; tau = 10 exp(-1e-4 (1000 K(K+1)/2 - K)): K = 7 -> exp(-2.7993) = 0.6085 > 0.5, K = 8 -> 0.5
    assert gumbel_temperature(7999, **kw) == pytest.approx(10 * math.exp(-2.7993))
    assert gumbel_temperature(8000, **kw) == 0.5
    first = next(s for s in range(0, 100001) if gumbel_temperature(s, **kw) == 0.5)
    assert first == 8000


def test_gumbel_exponential_schedule():
    kw = dict(tau0=10.0, tau_min=0.5, rate=1e-4, update_every=1000, schedule="exponential")
    # tau = max(10 exp(-1e-4 * 1000 K), 0.5): updates at multiples of 1000 only
    assert gumbel_temperature(999, **kw) == 10.0
    assert gumbel_temperature(1000, **kw) == pytest.approx(10 * math.exp(-0.1))   # 9.048374
    assert gumbel_temperature(1500, **kw) == pytest.approx(9.048374, abs=1e-6)
    # 10 exp(-1e-4 t) <= 0.5 <=> t >= 1e4 ln 20 = 29957: the first update at or after it is 30000
    assert gumbel_temperature(29000, **kw) > 0.5
    assert gumbel_temperature(30000, **kw) == 0.5
    # T5: rate 1e-6 every 5000 reaches 0.5 at ~3.0M steps (1e6 ln 20 = 2.9957M -> 3,000,000)
    t5 = dict(kw, rate=1e-6, update_every=5000)
    assert gumbel_temperature(2_995_000, **t5) > 0.5 and gumbel_temperature(3_000_000, **t5) == 0.5


def test_st_gumbel_temperature_in_extras_and_current_temperature():
    ctx = RoutingContext()
    model = nn.Sequential(make_block("st_gumbel", context=ctx), make_block("smear", context=ctx))
    assert current_temperature(model) == 10.0                                      # step 0, before any forward
    x, mask, c = make_batch("sequence", 3)
    set_context(model, **dict(c, step=5000), mask=mask)
    model.train()(x)
    expected = gumbel_temperature(5000, tau0=10.0, tau_min=0.5, rate=1e-4, update_every=1000)
    assert model[0].last.extras["temperature"] == expected == current_temperature(model)
    assert current_temperature(nn.Sequential(make_block("smear"))) is None


def test_reinforce_terms_hand_worked():
    log_p = torch.log(torch.tensor([0.5, 0.25])).requires_grad_()              # log p_e of the sampled experts
    base = torch.tensor([1.0, 0.5], requires_grad=True)                        # baseline b(u)
    ent = torch.tensor([0.5, 1.0])                                             # H(p)
    loss = torch.tensor([3.0, 0.0], requires_grad=True)                        # L_ex
    # advantage sg(L - b) = [2.0, -0.5]
    # pg    = mean(ln .5 * 2, ln .25 * -0.5) = mean(-1.3862944, 0.6931472) = -0.3465736
    # ent   = mean(0.5, 1.0) = 0.75
    # value = mean(Huber(2.0), Huber(-0.5)) with delta 1 = mean(2 - 0.5, 0.5 * 0.25) = mean(1.5, 0.125) = 0.8125
    # total = 0.01 * -0.3465736 + 5e-4 * 0.75 + 0.01 * 0.8125 = -0.003465736 + 0.000375 + 0.008125 = 0.005034264
    out = reinforce_terms(log_p, base, ent, loss, w_pg=0.01, w_ent=5e-4, w_value=0.01)
    torch.testing.assert_close(out, torch.tensor(0.005034264))
    out.backward()
    torch.testing.assert_close(log_p.grad, torch.tensor([0.01, -0.0025]))      # w_pg * adv / 2
    # d/db mean Huber(L - b) = -clip(L - b, -1, 1) / 2 = [-0.5, 0.25], times 0.01
    torch.testing.assert_close(base.grad, torch.tensor([-0.005, 0.0025]))
    assert loss.grad is None                                                   # L_ex is only a reward
    # entropy sign -1 (an exploration bonus): 0.005034264 - 2 * 0.000375 = 0.004284264
    neg = reinforce_terms(log_p, base, ent, loss, w_pg=0.01, w_ent=5e-4, w_value=0.01, entropy_sign=-1.0)
    torch.testing.assert_close(neg, torch.tensor(0.004284264))


def test_reinforce_block_terms_train_and_eval():
    blk = make_block("reinforce", "sequence")
    x, mask, ctx = make_batch("sequence", 3)
    per_example = torch.tensor([1.0, 2.0, 3.0])
    blk.train()
    run(blk, x, mask, ctx)
    e = blk.last.extras
    assert e["log_prob"].shape == e["baseline"].shape == e["entropy"].shape == (3,)
    expected = reinforce_terms(e["log_prob"], e["baseline"], e["entropy"], per_example,
                               w_pg=0.01, w_ent=5e-4, w_value=0.01)
    torch.testing.assert_close(aux_loss(blk, per_example), expected)
    blk.eval()
    run(blk, x, mask, ctx)
    assert aux_loss(blk, per_example) == 0                                     # no sample, no policy gradient
    assert (blk.last.extras["experts"] == blk.last.probs.argmax(-1)).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reinforce_terms_are_averaged_over_blocks(reduction):
    ctx = RoutingContext()
    model = nn.Sequential(*[make_block("reinforce", "sequence", seed=i, context=ctx,
                                       reinforce_block_reduction=reduction) for i in range(3)]).train()
    x, mask, c = make_batch("sequence", 4)
    set_context(model, **c, mask=mask)
    model(x)
    per_example = torch.tensor([1.0, 2.0, 3.0, 4.0])
    terms = [reinforce_terms(b.last.extras["log_prob"], b.last.extras["baseline"], b.last.extras["entropy"],
                             per_example, w_pg=0.01, w_ent=5e-4, w_value=0.01) for b in model]
    # official trainers: each term's mean over (batch, blocks) = the mean over blocks of per-block means
    expected = sum(terms) / 3 if reduction == "mean" else sum(terms)
    torch.testing.assert_close(aux_loss(model, per_example), expected)


def test_reinforce_baseline_reads_the_layernormed_router_input_and_starts_small():
    blk = make_block("reinforce", "sequence").train()
    first, second = blk.method.baseline
    assert float(first.weight.detach().std()) == pytest.approx(0.01, rel=0.2) and (first.bias == 0).all()
    assert float(second.weight.detach().std()) == pytest.approx(0.01, rel=0.6) and (second.bias == 0).all()
    x, mask, ctx = make_batch("sequence", 3)
    run(blk, x, mask, ctx)
    u = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)                     # masked mean (b, c)
    torch.testing.assert_close(blk.last.extras["baseline"], blk.method.baseline(blk.router.in_norm(u)).squeeze(-1))
    raw = make_block("reinforce", "sequence", reinforce_baseline_input="raw").train()
    run(raw, x, mask, ctx)
    torch.testing.assert_close(raw.last.extras["baseline"], raw.method.baseline(u).squeeze(-1))


def test_adaptive_choice_at_the_threshold():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125],      # p1 - p2 = 0.25  <= T = 0.25 -> top-2 (tie goes to top-2)
                      [0.625, 0.25, 0.125, 0.0]])     # p1 - p2 = 0.375 >  T = 0.25 -> top-1
    idx, w, use2 = adaptive_choice(p, 0.25)
    assert use2.tolist() == [True, False]
    assert idx[:, 0].tolist() == [0, 0] and idx[0, 1] == 1
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.25], [0.625, 0.0]]))
    # top2 normalisation: [0.5, 0.25] / 0.75 = [2/3, 1/3]; a top-1 item gets weight 1
    _, w2, _ = adaptive_choice(p, 0.25, normalization="top2")
    torch.testing.assert_close(w2, torch.tensor([[2 / 3, 1 / 3], [1.0, 0.0]]))
    # T = 0.375: the second row's gap 0.625 - 0.25 = 0.375 (exact in binary) now takes top-2
    assert adaptive_choice(p, 0.375)[2].tolist() == [True, True]
    # top-1 evaluation overrides the rule
    assert adaptive_choice(p, 0.25, top1_only=True)[2].tolist() == [False, False]


def test_top1_balance_loss_hand_worked():
    p = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]])
    # top-1 items 0 and 2: f = [1/2, 1/2], P = [(0.75 + 0.25)/2, (0.25 + 0.75)/2] = [0.5, 0.5]
    # loss = N sum f P = 2 * (0.25 + 0.25) = 1.0 (perfect balance)
    torch.testing.assert_close(top1_balance_loss(p, torch.tensor([True, False, True])), torch.tensor(1.0))
    # only item 0: f = [1, 0], P = [0.75, 0.25] -> 2 * 0.75 = 1.5 (item 1, routed top-2, is ignored)
    torch.testing.assert_close(top1_balance_loss(p, torch.tensor([True, False, False])), torch.tensor(1.5))
    torch.testing.assert_close(top1_balance_loss(p, torch.tensor([False, False, False])), torch.tensor(0.0))


def test_adaptive_gating_block_uses_one_or_two_experts():
    blk = make_block("adaptive_gating", "sequence", adaptive_threshold=1.0).eval()   # gap <= 1 always: top-2
    x, mask, ctx = make_batch("sequence", 3)
    run(blk, x, mask, ctx)
    assert blk.last.extras["top2_fraction"].tolist() == [1.0, 1.0, 1.0]
    blk.cfg.adaptive_threshold = 0.0                                                   # gap > 0: top-1
    y = run(blk, x, mask, ctx)
    assert blk.last.extras["top2_fraction"].tolist() == [0.0, 0.0, 0.0]
    p = blk.last.probs
    e = p.argmax(-1)
    inner = blk.experts.apply(x, *blk.experts.gather(e)) * p.max(-1).values[:, None, None]
    torch.testing.assert_close(y[mask], (x + blk.post_norm(inner))[mask])


# --- equivalences ------------------------------------------------------------------------------------

def _inputs(x, training=False, **ctx):
    b, s, _ = x.shape
    return RoutingInputs(x=x, mask=torch.ones(b, s, dtype=torch.bool), u=x.mean(1), ctx=RoutingContext(**ctx),
                         training=training)


def _one_hot_logits(idx, n):
    return torch.full((len(idx), n), -1e9).scatter(1, torch.tensor(idx)[:, None], 0.0)


@pytest.mark.parametrize("method", ["smear", "ensemble", "top_k"])
def test_one_hot_routing_equals_that_expert(method):
    blk = make_block(method)
    x = torch.randn(3, S, DIM)
    y = blk.method(blk.experts, _inputs(x), _one_hot_logits([2, 0, 3], N)).y
    for i, e in enumerate([2, 0, 3]):
        torch.testing.assert_close(y[i:i + 1], blk.experts.apply_shared(x[i:i + 1], e))


def _averaged_expert(bank: ExpertBank) -> ExpertBank:
    avg = ExpertBank(1, bank.dim, bank.rank)
    with torch.no_grad():
        avg.w_down.copy_(bank.w_down.mean(0, keepdim=True))
        avg.b_down.copy_(bank.b_down.mean(0, keepdim=True))
        avg.w_up.copy_(bank.w_up.mean(0, keepdim=True))
    return avg


def test_smear_uniform_equals_averaged_expert():
    blk = make_block("smear")
    with torch.no_grad():
        blk.experts.b_down.normal_()                                    # make the biases count too
    x = torch.randn(3, S, DIM)
    y = blk.method(blk.experts, _inputs(x), torch.zeros(3, N)).y      # logits 0 -> p = 1/N
    torch.testing.assert_close(y, _averaged_expert(blk.experts).apply_shared(x))


def test_adamix_eval_equals_uniformly_merged_adapter():
    blk = make_block("adamix").eval()
    with torch.no_grad():
        blk.experts.b_down.normal_()
    x = torch.randn(3, S, DIM)
    y = blk.method(blk.experts, _inputs(x), None).y
    torch.testing.assert_close(y, _averaged_expert(blk.experts).apply_shared(x))


def test_adamix_training_mixes_down_and_up_experts():
    blk = make_block("adamix").train()
    x = torch.randn(5, S, DIM)
    out = blk.method(blk.experts, _inputs(x, training=True), None)
    d, u = out.extras["down"], out.extras["up"]
    ex = blk.experts
    expected = F.silu(torch.einsum("bsc,bcr->bsr", x, ex.w_down[d]) + ex.b_down[d][:, None]) @ ex.w_up[u]
    torch.testing.assert_close(out.y, expected)


def test_ensemble_equals_weighted_sum_of_all_experts():
    blk = make_block("ensemble")
    x, logits = torch.randn(3, S, DIM), torch.randn(3, N)
    y = blk.method(blk.experts, _inputs(x), logits).y
    expected = torch.einsum("bn,bnsc->bsc", logits.softmax(-1), blk.experts.apply_all(x))
    torch.testing.assert_close(y, expected)


def test_dispatch_helpers_match_apply_all():
    bank = make_block("smear").experts
    with torch.no_grad():
        bank.b_down.normal_()
    x = torch.randn(3, S, DIM)
    every = bank.apply_all(x)                                                        # (b, n, s, c)
    idx, w = torch.tensor([[1, 3], [0, 0], [2, 1]]), torch.rand(3, 2)
    expected = torch.einsum("bk,bksc->bsc", w, every[torch.arange(3)[:, None], idx])
    torch.testing.assert_close(apply_topk(bank, x, idx, w), expected)
    per_token = torch.rand(3, S, N)
    torch.testing.assert_close(apply_dense(bank, x, per_token), torch.einsum("bsn,bnsc->bsc", per_token, every))


def test_soft_moe_single_position_is_softmax_mixture():
    blk = make_block("soft_moe")
    with torch.no_grad():
        blk.method.scale.fill_(3.0)
    x = torch.randn(3, 1, DIM)                                                       # one position per example
    y = blk.method(blk.experts, _inputs(x), None).y
    # one token: dispatch = 1, every slot = x; combine = softmax_n(scale * cos(x, phi_n))
    cos = F.normalize(x[:, 0], dim=-1) @ F.normalize(blk.method.phi, dim=0)          # (b, n)
    expected = torch.einsum("bn,bnsc->bsc", (3.0 * cos).softmax(-1), blk.experts.apply_all(x))
    torch.testing.assert_close(y, expected)


def test_top_k_is_p_max_times_argmax_expert_and_k2():
    blk = make_block("top_k")
    x, logits = torch.randn(3, S, DIM), torch.randn(3, N)
    p = logits.softmax(-1)
    y = blk.method(blk.experts, _inputs(x), logits).y
    every = blk.experts.apply_all(x)
    top = p.max(-1)
    torch.testing.assert_close(y, top.values[:, None, None] * every[torch.arange(3), top.indices])
    blk2 = make_block("top_k", top_k=2)
    y2 = blk2.method(blk2.experts, _inputs(x), logits).y
    g, i = p.topk(2, -1)
    torch.testing.assert_close(y2, torch.einsum("bk,bksc->bsc", g, blk2.experts.apply_all(x)[torch.arange(3)[:, None], i]))


def test_st_gumbel_forward_value_is_the_chosen_expert():
    blk = make_block("st_gumbel")
    x, logits = torch.randn(3, S, DIM), torch.randn(3, N, requires_grad=True)
    every = blk.experts.apply_all(x)
    out = blk.method(blk.experts, _inputs(x, training=True, step=0), logits)
    e = out.extras["experts"]
    torch.testing.assert_close(out.y, every[torch.arange(3), e])                      # (1 - sg(y_e) + y_e) = 1
    out.y.sum().backward()
    assert logits.grad.abs().sum() > 0                                                # gradient through y_e
    ev = blk.method(blk.experts, _inputs(x, training=False), logits.detach())
    torch.testing.assert_close(ev.y, every[torch.arange(3), logits.argmax(-1)])


def test_latent_skills_eval_weights_are_normalised_sigmoid():
    blk = make_block("latent_skills").eval()
    with torch.no_grad():
        blk.method.skill_logits.normal_()
    x = torch.randn(3, S, DIM)
    tasks = torch.tensor([1, 1, 3])
    out = blk.method(blk.experts, _inputs(x, task_ids=tasks), None)
    a = torch.sigmoid(blk.method.skill_logits[tasks])
    torch.testing.assert_close(out.probs, a / a.sum(-1, keepdim=True))
    torch.testing.assert_close(out.y, blk.experts.apply(x, *blk.experts.merge(out.probs)))
    assert blk.method.skill_logits.abs().max() > 1e-3                                  # (init is U(+-1e-3))
    assert make_block("latent_skills").method.skill_logits.abs().max() <= 1e-3


def test_expert_shapes_of_the_sized_variants():
    assert make_block("smear_2x").num_experts == 2 * N
    big = make_block("adapter_large")
    assert big.num_experts == 1 and big.experts.rank == N * RANK
    # methods.md: r = 192 in both settings: 8 x 24 (T5) and 6 x 32 (ResNet)
    from smear.routing.methods.adapter_large import AdapterLarge
    assert AdapterLarge.expert_shape(RoutingConfig(num_experts=8, rank=24)) == (1, 192)
    assert AdapterLarge.expert_shape(RoutingConfig(num_experts=6, rank=32)) == (1, 192)


# --- hash routing ------------------------------------------------------------------------------------

def test_hash_table_is_fixed_persisted_and_differs_between_blocks():
    ctx = RoutingContext()
    cfg = build(RoutingConfig, {"method": "hash", "num_experts": N, "rank": RANK, "hash_num_examples": 256})
    torch.manual_seed(0)                                                               # one seed, two blocks
    model = nn.Sequential(*[ExpertRoutingBlock(DIM, cfg, layout="sequence", num_tasks=N, context=ctx) for _ in range(2)])
    t0, t1 = model[0].method.table, model[1].method.table
    assert t0.shape == (256,) and int(t0.max()) < N
    assert not torch.equal(t0, t1)                                                     # blocks differ
    assert "0.method.table" in model.state_dict()
    # the same seed rebuilds the same table; a different hash_seed redraws it, same weight init
    assert torch.equal(make_block("hash", seed=3).method.table, make_block("hash", seed=3).method.table)
    other = make_block("hash", seed=3, hash_seed=7)
    assert not torch.equal(other.method.table, make_block("hash", seed=3).method.table)
    torch.testing.assert_close(other.experts.w_down, make_block("hash", seed=3).experts.w_down)
    # restoring a checkpoint restores the routing
    fresh = make_block("hash", seed=99)
    fresh.load_state_dict(model[0].state_dict())
    assert torch.equal(fresh.method.table, t0)
    x, mask, c = make_batch("sequence", 3)
    run(model[0], x, mask, c)
    assert (model[0].last.probs.argmax(-1) == t0[:3].long()).all()


def test_hash_rejects_unknown_example_ids():
    blk = make_block("hash")
    x, mask, c = make_batch("sequence", 3)
    with pytest.raises(IndexError, match="hash_num_examples"):
        run(blk, x, mask, dict(c, example_ids=torch.tensor([0, 256, 1])))
    with pytest.raises(ValueError, match="example_ids"):
        run(blk, x, mask, dict(c, example_ids=None))


# --- model-level helpers ----------------------------------------------------------------------------

def test_optimizer_param_groups_latent_skills_lr():
    ctx = RoutingContext()
    model = nn.Sequential(make_block("latent_skills", context=ctx), make_block("smear", context=ctx), nn.Linear(3, 3))
    model[2].weight.requires_grad_(False)                                              # frozen: left out
    groups = optimizer_param_groups(model, 1e-3)
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    assert groups[1]["lr"] == pytest.approx(1e-2) and groups[0]["lr"] == 1e-3
    assert len(groups[1]["params"]) == 1 and groups[1]["params"][0] is model[0].method.skill_logits
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    torch.optim.Adam(groups)                                                           # accepted as-is
    assert len(optimizer_param_groups(nn.Sequential(make_block("smear")), 1e-3)) == 1


def test_routing_stats_entropy_and_load():
    ctx = RoutingContext()
    model = nn.Sequential(make_block("smear", context=ctx), make_block("tag", context=ctx)).eval()
    x, mask, c = make_batch("sequence", 4)
    set_context(model, **c, mask=mask)
    model(x)
    stats = routing_stats(model)
    assert set(stats) == {f"routing/{b}/{k}" for b in ("0", "1") for k in ["entropy"] + [f"load_{n}" for n in range(N)]}
    assert sum(stats[f"routing/0/load_{n}"] for n in range(N)) == pytest.approx(1.0)
    assert 0 < stats["routing/0/entropy"] <= math.log(N) + 1e-6                      # near uniform at init
    assert stats["routing/1/entropy"] == pytest.approx(0.0)                           # tag: one-hot
    assert [stats[f"routing/1/load_{n}"] for n in range(N)] == [0.25] * 4            # tasks 0..3 once each


def test_two_passes_and_consistency_loss():
    assert needs_two_passes(nn.Sequential(make_block("adamix")))
    assert not needs_two_passes(nn.Sequential(make_block("smear")))
    model = nn.Sequential(make_block("adamix", adamix_consistency_weight=2.0))
    a = torch.tensor([[0.0, 0.0]])                                                     # P = [0.5, 0.5]
    b = torch.tensor([[math.log(3.0), 0.0]])                                           # Q = [0.75, 0.25]
    # official: 0.5 * (KL(P||Q) + KL(Q||P)) = 0.5 * sum (P - Q)(ln P - ln Q)
    #   = 0.5 * ((-0.25)(ln 0.5 - ln 0.75) + (0.25)(ln 0.5 - ln 0.25)) = 0.5 * 0.2746531 = 0.1373266; x weight 2
    torch.testing.assert_close(consistency_loss(model, a, b), torch.tensor(0.2746531))
    assert consistency_loss(model, b, b) == 0
    # sequence outputs (b, t, vocab): averaged over every (example, token), padded positions included (T5 trainer)
    seq_a = torch.stack([a[0], torch.tensor([5.0, -5.0])])[None]                      # (1, 2, 2)
    seq_b = torch.stack([b[0], torch.tensor([-5.0, 5.0])])[None]
    p = torch.sigmoid(torch.tensor(10.0))                                              # P = [p, 1 - p], Q = [1 - p, p]
    second = 0.5 * 2 * (2 * p - 1) * 10.0                                              # 9.999092
    torch.testing.assert_close(consistency_loss(model, seq_a, seq_b), 2 * (0.1373266 + second) / 2)
    assert consistency_loss(nn.Sequential(make_block("smear")), a, b) == 0


def test_two_adamix_passes_differ_in_training():
    blk = make_block("adamix").train()
    x, mask, c = make_batch("sequence", 8)
    assert not torch.allclose(run(blk, x, mask, c), run(blk, x, mask, c))


# --- curriculum ---------------------------------------------------------------------------------------

def test_curriculum_orders_by_cosine_to_fewest_top2():
    cur = Top2Curriculum(4, 2)
    cur.update(torch.tensor([0, 1, 2, 3]), torch.tensor([[0.2, 0.0], [1.0, 1.0], [0.6, 0.1], [0.0, 0.5]]))
    # reference = example 0 (sum 0.2, the fewest); cosine to [0.2, 0] = cosine to [1, 0]:
    #   ex0: 1; ex1: 1/sqrt(2) = 0.7071; ex2: 0.6/sqrt(0.37) = 0.9864; ex3: 0
    assert cur.epoch_order() == [0, 2, 1, 3]
    assert list(cur) == [0, 2, 1, 3] and len(cur) == 4


def test_curriculum_fallback_when_reference_is_zero():
    cur = Top2Curriculum(4, 2)
    cur.update(torch.tensor([3, 2, 1, 0]), torch.tensor([[0.25, 0.5], [0.5, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    # example 0 is all top-1 ([0, 0]): cosine undefined -> ascending totals: 0 (0), 2 (0.5), 3 (0.75), 1 (2)
    assert cur.epoch_order() == [0, 2, 3, 1]


def test_curriculum_first_epoch_is_a_seeded_shuffle():
    cur = Top2Curriculum(50, 3, seed=1)
    first = cur.epoch_order()
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert first == Top2Curriculum(50, 3, seed=1).epoch_order()
    cur.set_epoch(1)
    assert cur.epoch_order() != first
    with pytest.raises(ValueError, match="fractions"):
        cur.update(torch.tensor([0]), torch.zeros(1, 2))


def test_curriculum_fed_from_adaptive_gating_blocks():
    ctx = RoutingContext()
    model = nn.Sequential(*[make_block("adaptive_gating", context=ctx, adaptive_threshold=t) for t in (0.0, 1.0)])
    x, mask, c = make_batch("sequence", 3)
    set_context(model, **c, mask=mask)
    model.train()(x)
    frac = top2_fractions(model)                                                      # (b, L)
    assert frac.shape == (3, 2) and frac[:, 0].eq(0).all() and frac[:, 1].eq(1).all()
    cur = Top2Curriculum(3, 2)
    cur.update(c["example_ids"], frac)
    assert sorted(cur.epoch_order()) == [0, 1, 2]
    assert top2_fractions(nn.Sequential(make_block("smear"))) is None


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="gumbel_schedule"):
        build(RoutingConfig, {"gumbel_schedule": "linear"})
    with pytest.raises(ConfigError, match="hash_num_examples"):
        build(RoutingConfig, {"hash_num_examples": -1})
    with pytest.raises(ConfigError, match="hash_num_examples=0"):                 # "sized to the data", unresolved
        make_block("hash", hash_num_examples=0)
    assert build(RoutingConfig, {"method": "hash"}).sized_for(1234).hash_num_examples == 1234   # 0 = the data's size
    assert build(RoutingConfig, {"method": "hash", "hash_num_examples": 99}).sized_for(1234).hash_num_examples == 99
    assert build(RoutingConfig, {"method": "smear"}).sized_for(1234).hash_num_examples == 0     # nothing to size
    for key in ("router_weight_norm", "router_pooling", "image_router_input", "post_norm", "latent_skills_sample",
                "reinforce_block_reduction", "reinforce_baseline_input", "adamix_task_loss"):
        with pytest.raises(ConfigError, match=key):
            build(RoutingConfig, {key: "nope"})
    with pytest.raises(ConfigError, match="gumbel_step_offset"):
        build(RoutingConfig, {"gumbel_step_offset": 2})
    with pytest.raises(ConfigError, match="adaptive_gating"):
        make_block("adaptive_gating", n=1)
