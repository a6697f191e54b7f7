"""Every registered routing method (methods.md section 3) on tiny CPU blocks.

Parametrised over the registry: shapes, finiteness, gradients to every parameter, seeding, draws
reproduced from a generator in the routing context, float64 blocks, deterministic evaluation, per-example
independence. Then equivalences between methods, hash routing,
the model-level helpers in ``smear.routing`` and the curriculum. Hand-worked formulas:
tests/test_routing_math.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smear.configs import ConfigError, build
from smear.routing import (
    ExpertRoutingBlock, RoutingConfig, RoutingContext, Top2Curriculum, aux_loss, consistency_loss, get_method_class,
    needs_two_passes, optimizer_param_groups, routing_stats, set_context, top2_fractions,
)
from smear.routing._base import ExpertBank, RoutingInputs
from smear.routing._dispatch import apply_dense, apply_topk
from tests.helpers.blocks import ALL, DIM, LAYOUTS, N, RANK, S, make_batch, make_block, run


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


def _training_draw(blk, x, mask, ctx, generator=None):
    """One training forward with ``generator`` in the routing context: (output, probabilities)."""
    out = run(blk.train(), x, mask, dict(ctx, generator=generator))
    return out, blk.last.probs


def _draws_from_the_global_rng(method, layout) -> bool:
    """Whether the method's training forward depends on the global RNG (two seeds, two outputs)."""
    blk = make_block(method, layout, expert_dropout=0.5)
    x, mask, ctx = make_batch(layout, 16)
    torch.manual_seed(1)
    a, _ = _training_draw(blk, x, mask, ctx)
    torch.manual_seed(2)
    b, _ = _training_draw(blk, x, mask, ctx)
    return not torch.equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL)
def test_a_generator_in_the_context_reproduces_the_draws(method, layout):
    # RoutingContext.generator: every draw of a forward from one torch.Generator, none from the global RNG
    blk = make_block(method, layout, expert_dropout=0.5)
    x, mask, ctx = make_batch(layout, 16)
    rng = torch.get_rng_state()
    first = _training_draw(blk, x, mask, ctx, torch.Generator().manual_seed(0))
    out, _ = first
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), rng), "a forward with a generator drew from the global RNG"
    again = _training_draw(blk, x, mask, ctx, torch.Generator().manual_seed(0))
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the default (None) is the global RNG: a generator seeded s draws what the global RNG seeded s draws
    torch.manual_seed(0)
    default = _training_draw(blk, x, mask, ctx)
    for a, b in zip(first, default):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if _draws_from_the_global_rng(method, layout):                      # a stochastic method: the draw matters
        other, _ = _training_draw(blk, x, mask, ctx, torch.Generator().manual_seed(1))
        assert not torch.equal(other, out)


def test_the_stochastic_methods_are_seen_as_such():
    # the check above is not vacuous: methods with expert dropout draw, and some methods draw nothing
    stochastic = {m for m in ALL if _draws_from_the_global_rng(m, "sequence")}
    assert {m for m in ALL if get_method_class(m).expert_dropout} <= stochastic
    assert stochastic != set(ALL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL)
def test_a_float64_block_computes_in_float64(method, layout):
    # the routing math runs in max(input dtype, float32): a .double() block is float64 end to end
    blk = make_block(method, layout)
    ref = make_block(method, layout).double()
    x, mask, ctx = make_batch(layout, 3)
    with torch.no_grad():                                               # evaluation: float32 within its rounding
        y32, y64 = run(blk.eval(), x, mask, ctx), run(ref.eval(), x.double(), mask, ctx)
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-6)
    for train in (False, True):
        out = run(ref.train(train), x.double(), mask, ctx)
        last = ref.last
        assert out.dtype == last.y.dtype == last.probs.dtype == last.aux_loss.dtype == torch.float64
        assert torch.isfinite(out).all() and torch.isfinite(last.probs).all() and torch.isfinite(last.aux_loss)


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
