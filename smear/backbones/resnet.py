"""ResNet-18 surgery: an expert routing block after each of the 8 BasicBlocks, frozen backbone, new head.

methods.md section 2: the block sits after the BasicBlock's residual add and before its final ReLU;
widths 64, 64, 128, 128, 256, 256, 512, 512. Trained: the routing blocks and the new classifier head.

Frozen BatchNorm statistics: ``backbone_bn="update"`` (default) lets the frozen backbone's BN running
statistics adapt to the new data in training, as the SMEAR reference code does (its backbone BN layers
stay in train mode); ``"frozen"`` keeps them in eval mode. The BN affine weights are frozen either way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, ResNet

from smear.configs import ConfigError
from smear.routing import ExpertRoutingBlock, RoutingConfig, RoutingContext

RESNET18_WIDTHS = (64, 64, 128, 128, 256, 256, 512, 512)


class RoutedBasicBlock(nn.Module):
    """A torchvision BasicBlock with a routing block between its residual add and its final ReLU."""

    def __init__(self, block: BasicBlock, routing: ExpertRoutingBlock):
        super().__init__()
        assert isinstance(block, BasicBlock), type(block)
        self.block, self.routing = block, routing

    def forward(self, x: Tensor) -> Tensor:
        blk = self.block  # torchvision's BasicBlock.forward, with the routing block before the last ReLU
        out = blk.relu(blk.bn1(blk.conv1(x)))
        out = blk.bn2(blk.conv2(out))
        identity = x if blk.downsample is None else blk.downsample(x)
        return blk.relu(self.routing(out + identity))


class RoutedResNet(nn.Module):
    """ResNet-18 with routed BasicBlocks; ``forward(images) -> logits (b, classes)``."""

    def __init__(self, backbone: ResNet, *, backbone_bn: Literal["update", "frozen"] = "update"):
        super().__init__()
        self.backbone, self.backbone_bn = backbone, backbone_bn

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def train(self, mode: bool = True) -> "RoutedResNet":
        super().train(mode)
        if mode and self.backbone_bn == "frozen":
            routing = {id(s) for r in self.modules() if isinstance(r, ExpertRoutingBlock) for s in r.modules()}
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d) and id(m) not in routing:
                    m.eval()
        return self


def inject_routing_blocks(backbone: ResNet, cfg: RoutingConfig, *, num_tasks: int) -> list[str]:
    """Replace each BasicBlock of ``backbone`` in place by a RoutedBasicBlock; return the replaced names
    ("layer1.0" ... "layer4.1"), which are also the routing blocks' labels (their metrics' keys).

    Every routing block shares one RoutingContext.
    """
    context = RoutingContext()
    replaced = []
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        layer: nn.Sequential = getattr(backbone, layer_name)
        for i, blk in enumerate(layer):
            assert isinstance(blk, BasicBlock), f"{layer_name}.{i} is {type(blk).__name__}, expected BasicBlock"
            width = blk.bn2.num_features
            routing = ExpertRoutingBlock(width, cfg, layout="image", num_tasks=num_tasks, context=context)
            layer[i] = RoutedBasicBlock(blk, routing)
            routing.label = f"{layer_name}.{i}"
            replaced.append(routing.label)
    widths = tuple(blk.routing.dim for l in ("layer1", "layer2", "layer3", "layer4") for blk in getattr(backbone, l))
    assert widths == RESNET18_WIDTHS, widths
    return replaced


def imagenet_weights() -> tuple[str, Path]:
    """(URL, local file) of the ImageNet ResNet-18 weights: torchvision downloads the URL into torch hub's
    cache (``$TORCH_HOME/hub/checkpoints``) on first use and reads the file from there afterwards."""
    from torchvision.models import ResNet18_Weights

    from smear.hub import torch_hub_dir

    url = ResNet18_Weights.IMAGENET1K_V1.url
    return url, torch_hub_dir() / "checkpoints" / url.rsplit("/", 1)[-1]


def check_imagenet_weights() -> None:
    """A one-line ConfigError when the ImageNet weights are neither cached here nor downloadable."""
    from smear.hub import url_reachable

    url, path = imagenet_weights()
    if not path.is_file() and not url_reachable(url):
        raise ConfigError(f"pretrained='imagenet' needs {path} (torch hub's cache, $TORCH_HOME/hub), which is "
                          f"missing, and {url} cannot be reached; valid: pretrained: none, or copy that file "
                          "there (downloaded on a machine with network)")


def load_resnet18(pretrained: Literal["none", "imagenet"]) -> ResNet:
    """torchvision ResNet-18: fixed random init (``none``, offline default) or ImageNet weights (``imagenet``)."""
    if pretrained == "imagenet":
        from torchvision.models import ResNet18_Weights

        return resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
    # random weights: the same frozen backbone for every trial, from its own RNG, so that the caller's
    # seeded stream (and with it everything trained) depends on the trial's seed alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return resnet18(weights=None)


def build_routed_resnet18(cfg: RoutingConfig, *, num_classes: int, num_tasks: int,
                          pretrained: Literal["none", "imagenet"] = "none",
                          backbone_bn: Literal["update", "frozen"] = "update") -> RoutedResNet:
    """Frozen ResNet-18 + 8 routing blocks + a new 512 -> ``num_classes`` head (trainable)."""
    backbone = load_resnet18(pretrained)
    for p in backbone.parameters():
        p.requires_grad_(False)
    inject_routing_blocks(backbone, cfg, num_tasks=num_tasks)
    in_features = backbone.fc.in_features
    assert in_features == 512, in_features
    backbone.fc = nn.Linear(in_features, num_classes)
    return RoutedResNet(backbone, backbone_bn=backbone_bn)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def zero_up_projections(model: nn.Module) -> None:
    """Set every expert's up-projection to zero: the routed model then computes the backbone's function."""
    for m in model.modules():
        if isinstance(m, ExpertRoutingBlock):
            m.experts.w_up.zero_()
