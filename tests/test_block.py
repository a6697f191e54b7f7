"""Expert routing block (methods.md section 1): SMEAR merge math, masked router input, gradients, router init."""
from __future__ import annotations

import pytest
import torch

from smear.routing import ExpertRoutingBlock, RoutingConfig, set_context
from smear.routing.block import masked_mean


def _block(method="smear", layout="sequence", n=4, dim=16, rank=4, **kw):
    torch.manual_seed(0)
    return ExpertRoutingBlock(dim, RoutingConfig(method=method, num_experts=n, rank=rank, **kw), layout=layout, num_tasks=n)


def test_smear_one_hot_equals_that_expert_alone():
    blk = _block().eval()
    x = torch.randn(3, 5, 16)                                    # (b, s, c)
    p = torch.nn.functional.one_hot(torch.tensor([2, 0, 3]), 4).float()
    merged = blk.experts.apply(x, *blk.experts.merge(p))
    for i, e in enumerate([2, 0, 3]):
        alone = blk.experts.apply_shared(x[i:i + 1], e)          # expert e run by itself
        torch.testing.assert_close(merged[i:i + 1], alone)


def test_smear_merge_is_weighted_parameter_average():
    blk = _block()
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    w_down, b_down, w_up = blk.experts.merge(p)
    torch.testing.assert_close(w_down[0], (p[0, :, None, None] * blk.experts.w_down).sum(0))
    torch.testing.assert_close(b_down[0], (p[0, :, None] * blk.experts.b_down).sum(0))
    torch.testing.assert_close(w_up[0], (p[0, :, None, None] * blk.experts.w_up).sum(0))


def test_padding_does_not_change_router_input_or_output():
    blk = _block().eval()
    x = torch.randn(1, 4, 16)
    mask = torch.tensor([[True, True, True, False]])
    padded = x.clone()
    padded[0, 3] = 100.0                                         # garbage in the padded position
    torch.testing.assert_close(masked_mean(x, mask), masked_mean(padded, mask))
    torch.testing.assert_close(masked_mean(x, mask), x[:, :3].mean(1))
    y1, y2 = blk(x, mask), blk(padded, mask)
    torch.testing.assert_close(y1[:, :3], y2[:, :3])
    # an example's routing does not depend on its batch-mates' lengths
    other = torch.randn(1, 4, 16)
    both = blk(torch.cat([x, other]), torch.cat([mask, torch.ones(1, 4, dtype=torch.bool)]))
    torch.testing.assert_close(both[:1, :3], y1[:, :3])


@pytest.mark.parametrize("layout", ["sequence", "image"])
def test_gradients_reach_every_expert_and_the_router(layout):
    blk = _block(layout=layout).train()
    x = torch.randn(4, 16, 3, 3) if layout == "image" else torch.randn(4, 5, 16)
    blk(x).pow(2).sum().backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # every expert's slice of the stacked weights gets gradient
    assert (blk.experts.w_down.grad.abs().sum(dim=(1, 2)) > 0).all()
    assert (blk.experts.w_up.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_router_starts_near_uniform():
    blk = _block(dim=64, n=6)
    probs = blk.router(torch.randn(32, 64) * 5).softmax(-1)       # (b, n)
    assert (probs - 1 / 6).abs().max() < 0.1


def test_expert_dropout_only_in_training():
    blk = _block(expert_dropout=0.5)
    x = torch.randn(64, 2, 16)
    blk.train()
    blk(x)
    dropped = (blk.last.probs < 1e-6).float().mean()
    assert 0.2 < dropped < 0.8                                     # about half the experts dropped per example
    blk.eval()
    blk(x)
    assert (blk.last.probs > 1e-6).all()


def test_tag_routes_by_domain_and_refuses_too_few_experts():
    blk = _block("tag").eval()
    set_context(blk, task_ids=torch.tensor([1, 3]))
    x = torch.randn(2, 5, 16)
    blk(x)
    assert blk.last.probs.argmax(-1).tolist() == [1, 3]
    from smear.configs import ConfigError
    with pytest.raises(ConfigError, match="num_experts"):
        ExpertRoutingBlock(16, RoutingConfig(method="tag", num_experts=2), layout="sequence", num_tasks=6)


def test_unknown_method_lists_valid_names():
    from smear.configs import ConfigError, build
    with pytest.raises(ConfigError, match=r"routing.method='nope' is not valid; valid: .*smear"):
        build(RoutingConfig, {"method": "nope"})
