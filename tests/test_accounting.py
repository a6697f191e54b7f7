"""Compute accounting (trainables/accounting.py): FLOPs worked by hand for single blocks and the real
settings, routing attribution, and that measuring changes nothing.

What FlopCounterMode counts: 2 FLOPs per multiply-add of mm / addmm / bmm / baddbmm / convolution (addmm and
baddbmm: the product only, not the added bias); nothing for elementwise ops (bias add, swish, residual add),
reductions (the masked mean), LayerNorm / BatchNorm, softmax or indexing.
Shapes of the tiny blocks (tests/helpers/blocks.py): C = DIM = 16, r = RANK = 4, N = 4 experts, S = 5 positions.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from smear.routing import set_context
from tests.helpers.blocks import DIM, N, RANK, S, make_batch, make_block
from trainables.accounting import (
    BATCH_SIZE, FLOPS_PER_EXAMPLE, FORWARD_PASSES, METRIC_NAMES, PARAMS_TOTAL, PARAMS_TRAINABLE,
    ROUTING_FLOPS_PER_EXAMPLE, build_for_measure, count_flops, measure, measure_trial_config,
)

B = 3
C, R = DIM, RANK


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (as the settings' smoke profiles): the tests share a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Upstream(nn.Module):
    """A trainable (zero-FLOP) LayerNorm before the block: the block's input then needs a gradient, as in the
    real models (ResNet: the block's own BatchNorm; T5: the trainable T5 LayerNorm weights upstream)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm, self.block = nn.LayerNorm(DIM), block

    def forward(self, x, mask):
        return self.block(self.norm(x), mask)


def _sequence_flops(method: str, *, backward: bool, upstream: bool = False) -> int:
    block = make_block(method, "sequence")
    block.train()
    x, mask, ctx = make_batch("sequence", B)
    model = _Upstream(block) if upstream else block

    def loss():
        set_context(block, **ctx)
        return model(x, mask).sum()

    flops = count_flops(model, loss, backward=backward)
    assert flops.routing == flops.total  # every counted op runs inside the block (the sum and the LayerNorm: 0)
    return flops.total


def test_adapter_block_flops_by_hand():
    # forward, x (B, S, C): h = swish(x @ W_down + b) -> mm (B*S, C) x (C, r): 2*B*S*C*r
    #                       y = h @ W_up             -> mm (B*S, r) x (r, C): 2*B*S*r*C
    # no router; bias, swish, LayerNorm_post and the residual add count 0. 2*B*S*C*r*2 = 4*3*5*16*4 = 3840
    assert _sequence_flops("adapter", backward=False) == 2 * B * S * C * R * 2 == 3840
    # backward with x needing no gradient (the block is the whole model): each mm's weight gradient costs as
    # much as its forward (dW_up = h^T g, dW_down = x^T g_pre: 2*B*S*C*r each), the up-projection's input
    # gradient too (dh = g W_up^T, needed for W_down), the down-projection's input gradient (dx) is not run:
    # forward 4 + backward 6 = 10*B*S*C*r = 9600
    assert _sequence_flops("adapter", backward=True) == 10 * B * S * C * R == 9600
    # x needs a gradient (trainable parameters upstream, as in the real models): + dx = g_pre W_down^T,
    # 2*B*S*C*r: 12*B*S*C*r = 3 x forward = 11520
    assert _sequence_flops("adapter", backward=True, upstream=True) == 12 * B * S * C * R == 11520


def test_smear_block_is_one_adapter_plus_the_router_and_the_merge():
    # SMEAR's forward = the adapter's two products, batched per example (baddbmm (B,S,C)x(B,C,r) and bmm
    # (B,S,r)x(B,r,C): 4*B*S*C*r, as the adapter), plus
    #   router logits: LN(u) (B, C) @ W_hat^T (C, N): 2*B*C*N = 2*3*16*4 = 384 (normalising W: 0)
    #   merge (SMEAR eq. 2): p (B, N) @ W_down (N, C*r), @ b_down (N, r), @ W_up (N, r*C):
    #          B*N*(C*r + r + r*C) multiply-adds = 3*4*(64 + 4 + 64) = 1584, i.e. 2 x 1584 = 3168 FLOPs
    router, merge = 2 * B * C * N, 2 * B * N * (C * R + R + R * C)
    assert (router, merge) == (384, 3168)
    adapter = _sequence_flops("adapter", backward=False)
    smear = _sequence_flops("smear", backward=False)
    assert smear - adapter == merge + router
    # forward + backward (x needs no gradient): router and merge products run their forward, their weight
    # gradient (dW_hat, dW) and their input gradient (dLN(u), dp: p needs one for the router): 3 x each;
    # the per-example products as the adapter's: 10*B*S*C*r. 3*(384 + 3168) + 9600 = 20256
    assert _sequence_flops("smear", backward=True) == 3 * (router + merge) + 10 * B * S * C * R == 20256


# --- the real settings ------------------------------------------------------------------------------------

def _resnet(root, method: str) -> dict:
    return {"batch_size": 4, "torch_threads": 1, "routing": {"method": method},
            "data": {"root": str(root), "resolution": 16, "augment": "none", "domains": ["real", "sketch"],
                     "loader_workers": 0}}


def _t5(method: str) -> dict:
    return {"setting": "t5_glue", "batch_size": 4, "torch_threads": 1, "routing": {"method": method},
            "t5": {"val_holdout": 20, "max_target_len": 16}}


def _snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "grads": [p.grad for p in model.parameters()],
            "training": [m.training for m in model.modules()],
            "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(), "np_rng": np.random.get_state()[1].copy()}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():  # parameters and buffers (BN running stats, hash tables), bit for bit
        assert torch.equal(v, after["state"][k]), k
    assert all(g is None for g in after["grads"])  # no gradient was written
    assert before["training"] == after["training"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert before["py_rng"] == after["py_rng"] and np.array_equal(before["np_rng"], after["np_rng"])


def _measure_unchanged(config: dict) -> tuple[dict, object]:
    """measure() on the setting's model and first batch, checking that it changes nothing."""
    setting, model, batch, cfg = build_for_measure(config)
    model.eval()  # not the mode measured in: the flags must come back
    before = _snapshot(model)
    m = measure(setting, model, batch, cfg)
    _assert_unchanged(model, before)
    assert set(m) == set(METRIC_NAMES)
    assert m[BATCH_SIZE] == len(batch.ids) == 4
    assert 0 < m[PARAMS_TRAINABLE] < m[PARAMS_TOTAL]
    assert 0 < m[ROUTING_FLOPS_PER_EXAMPLE] < m[FLOPS_PER_EXAMPLE]
    return m, batch


def test_resnet_flops_by_hand_and_per_method(digits_root):
    m = {k: _measure_unchanged(_resnet(digits_root, k))[0] for k in ("adapter", "smear", "ensemble", "adamix")}
    # 16 px images: conv1 (stride 2) 8x8, maxpool 4x4 = layer1; layer2 2x2; layer3 1x1; layer4 1x1 (stride 2 of
    # a 1x1 map with padding 1). Blocks (S = h*w, C): 2 x (16, 64), 2 x (4, 128), 2 x (1, 256), 2 x (1, 512):
    # sum S*C = 2*(1024 + 512 + 256 + 512) = 4608. Each block's input needs a gradient (its own BatchNorm is
    # trainable), so an adapter of rank r = 32 (the setting's default) costs 12*S*C*r per example (see
    # test_adapter_block_flops_by_hand): 12 * 32 * 4608 = 1,769,472
    assert m["adapter"][ROUTING_FLOPS_PER_EXAMPLE] == 12 * 32 * 4608 == 1_769_472
    # AdaMix: two training forwards of one (gathered, same cost) adapter per block, each with its backward;
    # the first block's input needs no gradient from the frozen backbone below it, yet both passes count in it
    assert m["adamix"][FORWARD_PASSES] == 2 and m["adapter"][FORWARD_PASSES] == 1
    assert m["adamix"][ROUTING_FLOPS_PER_EXAMPLE] == 2 * 1_769_472
    backbone = {k: v[FLOPS_PER_EXAMPLE] - v[ROUTING_FLOPS_PER_EXAMPLE] for k, v in m.items()}
    assert backbone["adapter"] == backbone["smear"] == backbone["ensemble"] == backbone["adamix"] / 2
    # ensemble runs all 6 experts at every position; SMEAR one merged expert plus the merge
    assert m["ensemble"][ROUTING_FLOPS_PER_EXAMPLE] > m["smear"][ROUTING_FLOPS_PER_EXAMPLE] > 0
    assert m["smear"][PARAMS_TRAINABLE] > m["adapter"][PARAMS_TRAINABLE]


def test_t5_flops_by_hand_and_per_method(offline_data):
    runs = {k: _measure_unchanged(_t5(k)) for k in ("adapter", "smear", "ensemble")}
    m = {k: v[0] for k, v in runs.items()}
    # tiny T5: C = d_model = 64, r = 24 (the setting's default), L = 2 layers each side; blocks: 2 per encoder
    # layer at the padded source length S_src, 3 per decoder layer at the padded target length S_tgt. Every
    # block's input needs a gradient (trainable T5 LayerNorm weights upstream): 12*S*C*r per example each
    batch = runs["adapter"][1]
    s_src, s_tgt = batch.inputs["input_ids"].shape[1], batch.targets.shape[1]
    assert m["adapter"][ROUTING_FLOPS_PER_EXAMPLE] == 12 * 64 * 24 * (2 * 2 * s_src + 3 * 2 * s_tgt)
    backbone = {k: v[FLOPS_PER_EXAMPLE] - v[ROUTING_FLOPS_PER_EXAMPLE] for k, v in m.items()}
    assert backbone["adapter"] == backbone["smear"] == backbone["ensemble"]
    assert m["ensemble"][ROUTING_FLOPS_PER_EXAMPLE] > m["smear"][ROUTING_FLOPS_PER_EXAMPLE] > 0


def test_measure_trial_config_leaves_the_caller_as_it_was(digits_root):
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    got = measure_trial_config(_resnet(digits_root, "smear"))
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    assert got == measure(*build_for_measure(_resnet(digits_root, "smear")))  # the loop's build, seeded


def test_the_buffer_check_has_teeth(digits_root):
    """A plain training forward changes the BN running statistics, and the check above sees it."""
    setting, model, batch, cfg = build_for_measure(_resnet(digits_root, "smear"))
    model.train()
    before = _snapshot(model)
    with torch.no_grad():
        setting.per_example_loss(model, batch)
    with pytest.raises(AssertionError, match="running_mean"):
        _assert_unchanged(model, before)
