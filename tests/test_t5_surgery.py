"""T5 v1.1 surgery: 60 blocks on a 12+12 config, exact backbone logits with zero up-projections,
decoder routing fixed across decoding steps, only blocks and LayerNorms trainable."""
from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5LayerNorm

from smear.backbones.resnet import zero_up_projections
from smear.backbones.t5 import build_routed_t5, tiny_t5_config
from smear.routing import RoutingConfig, routing_blocks, set_context


def _batch():
    tok = ByT5Tokenizer()
    enc = tok(["sst2 sentence: a fine film", "cola sentence: cat the sat"], padding=True, return_tensors="pt")
    labels = tok(["positive", "unacceptable"], padding=True, return_tensors="pt").input_ids
    return enc.input_ids, enc.attention_mask, labels.masked_fill(labels == 0, -100)


def test_sixty_blocks_on_a_12_plus_12_layer_config():
    model = build_routed_t5(RoutingConfig(num_experts=2, rank=2), num_tasks=8,
                            tiny={"num_layers": 12, "num_decoder_layers": 12, "d_model": 16, "d_ff": 32, "num_heads": 2, "d_kv": 8})
    blocks = routing_blocks(model)
    assert len(blocks) == 60
    assert sum(".encoder." in n for n, _ in blocks) == 24 and sum(".decoder." in n for n, _ in blocks) == 36
    assert sum(b.route_from == "encoder" for _, b in blocks) == 36


def test_tiny_config_counts_blocks_the_same_way():
    model = build_routed_t5(RoutingConfig(), num_tasks=8)
    assert len(routing_blocks(model)) == 2 * 2 + 3 * 2


@pytest.mark.parametrize("method", ["smear", "tag", "soft_moe", "adapter"])
def test_zero_up_projections_give_the_backbones_logits(method):
    model = build_routed_t5(RoutingConfig(method=method, num_experts=8, rank=4), num_tasks=8).eval()
    zero_up_projections(model)
    torch.manual_seed(0)
    reference = T5ForConditionalGeneration(tiny_t5_config()).eval()   # load_t5 seeds 0 too: same weights
    ids, mask, labels = _batch()
    set_context(model, task_ids=torch.tensor([1, 7]))
    dec_in = reference._shift_right(labels.masked_fill(labels == -100, 0))
    expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in).logits
    # equal up to float32 rounding: `x + 0` materialises a new tensor, and the following matmuls may take
    # another kernel path (the ResNet surgery test is bit-exact)
    got = model(ids, mask, labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_decoder_routing_is_identical_across_decoding_steps():
    model = build_routed_t5(RoutingConfig(method="smear", num_experts=4, rank=4), num_tasks=8).eval()
    for _, b in routing_blocks(model):  # make routing depend strongly on the input
        torch.nn.init.normal_(b.router.weight, std=1.0) if b.router is not None else None
    seen: dict[str, list[torch.Tensor]] = {}
    for name, b in routing_blocks(model):
        if b.route_from == "encoder":
            b.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, []).append(m.last.probs.clone()))
    ids, mask, _ = _batch()
    model.generate(ids, mask, max_new_tokens=6)
    assert len(seen) == 6
    for name, steps in seen.items():
        assert len(steps) >= 5, name                   # one call per decoding step
        for p in steps[1:]:
            torch.testing.assert_close(p, steps[0])    # same routing at every step
    # and the two examples are routed differently (the routing does depend on the input)
    first = next(iter(seen.values()))[0]
    assert not torch.allclose(first[0], first[1])


def test_padding_does_not_change_encoder_routing():
    model = build_routed_t5(RoutingConfig(method="smear", num_experts=4, rank=4), num_tasks=8).eval()
    tok = ByT5Tokenizer()
    short = tok(["rte sentence1: a b"], return_tensors="pt")
    padded = tok(["rte sentence1: a b", "rte sentence1: a much longer input here"], padding=True, return_tensors="pt")
    labels = torch.tensor([[3, 4]])
    model(short.input_ids, short.attention_mask, labels)
    alone = {n: b.last.probs.clone() for n, b in routing_blocks(model)}
    model(padded.input_ids, padded.attention_mask, labels.repeat(2, 1))
    for n, b in routing_blocks(model):
        torch.testing.assert_close(b.last.probs[:1], alone[n], rtol=1e-5, atol=1e-6)


def test_only_blocks_and_layernorms_train():
    model = build_routed_t5(RoutingConfig(), num_tasks=8)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    ln = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, T5LayerNorm)}
    assert ln and ln <= names
    assert all(".routing." in n or n in ln for n in names), sorted(names)[:5]
    assert not model.t5.shared.weight.requires_grad and not model.t5.lm_head.weight.requires_grad


@pytest.mark.parametrize("method", __import__("smear.routing", fromlist=["available_methods"]).available_methods())
def test_generation_with_the_kv_cache_gives_the_tokens_of_a_full_rerun(method):
    """Issue 13: greedy generation uses the decoder's key/value cache; the decoder blocks route on the encoder
    summary (fixed for the whole decode) and mix experts per position, so the cache changes nothing."""
    model = build_routed_t5(RoutingConfig(method=method, num_experts=8, rank=4).sized_for(2), num_tasks=8).eval()
    gen = torch.Generator().manual_seed(1)
    for _, b in routing_blocks(model):  # routing and experts that matter (up-projections start at zero)
        for p in b.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    head = model.t5.lm_head.weight.data   # random T5 weights greedily repeat pad (0) from the start token (0):
    head.copy_(torch.randn(head.shape, generator=gen))
    head[:2] = 0                          # pad and eos never win, so the decode runs its 8 steps over real tokens
    ids, mask, _ = _batch()
    set_context(model, task_ids=torch.tensor([1, 7]), example_ids=torch.tensor([0, 1]))
    cached = model.generate(ids, mask, max_new_tokens=8)
    full = model.generate(ids, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, full), (cached, full)
    assert cached.shape == (2, 9) and (cached[:, 1:] > 1).all()   # 8 steps of real tokens (no pad, no eos)
