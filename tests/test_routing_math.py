"""Routing math against numbers worked by hand: smooth-step, DSelect-k weights and regulariser, the Gumbel
schedules (and the reference loops written out), REINFORCE terms, adaptive choice and balance loss."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smear.routing import RoutingContext, aux_loss, current_temperature, set_context
from smear.routing.methods.adaptive_gating import adaptive_choice, top1_balance_loss
from smear.routing.methods.dselect_k import dselect_weights, smooth_step
from smear.routing.methods.reinforce import reinforce_terms
from smear.routing.methods.st_gumbel import gumbel_temperature
from tests.helpers.blocks import make_batch, make_block, run


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


