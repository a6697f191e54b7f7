"""ResNet-18 surgery: 8 routing blocks, exact backbone output with zero up-projections, what trains."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from smear.backbones.resnet import RESNET18_WIDTHS, build_routed_resnet18, trainable_parameter_names, zero_up_projections
from smear.routing import RoutingConfig, routing_blocks, set_context


@pytest.mark.parametrize("method", ["smear", "tag", "adapter"])
def test_zero_up_projection_gives_backbone_output(method):
    torch.manual_seed(0)
    model = build_routed_resnet18(RoutingConfig(method=method), num_classes=10, num_tasks=6)
    zero_up_projections(model)
    reference = resnet18(weights=None)
    state = {k.replace(".block.", ".", 1): v for k, v in model.backbone.state_dict().items() if ".routing." not in k}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = reference.load_state_dict(state, strict=False)
    assert set(missing.missing_keys) == {"fc.weight", "fc.bias"} and not missing.unexpected_keys
    reference.fc = model.backbone.fc
    model.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32)
    set_context(model, task_ids=torch.tensor([0, 5]))
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_eight_blocks_with_resnet18_widths_and_only_blocks_and_head_train():
    model = build_routed_resnet18(RoutingConfig(), num_classes=345, num_tasks=6)
    blocks = routing_blocks(model)
    assert len(blocks) == 8
    assert tuple(b.dim for _, b in blocks) == RESNET18_WIDTHS
    names = trainable_parameter_names(model)
    assert names and all(".routing." in n or n.startswith("backbone.fc.") for n in names), names
    assert model.backbone.fc.out_features == 345
    # the frozen backbone really is frozen, blocks and head really train
    assert any(n.startswith("backbone.fc.") for n in names)
    assert sum(".routing.experts." in n for n in names) == 8 * 3


def test_frozen_bn_mode_keeps_backbone_statistics():
    model = build_routed_resnet18(RoutingConfig(method="adapter"), num_classes=10, num_tasks=6, backbone_bn="frozen")
    before = model.backbone.bn1.running_mean.clone()
    model.train()
    set_context(model, task_ids=torch.zeros(4, dtype=torch.long))
    model(torch.randn(4, 3, 32, 32) + 3)
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)
    # the routing blocks' own BN still trains
    assert model.backbone.layer1[0].routing.pre_norm.training
