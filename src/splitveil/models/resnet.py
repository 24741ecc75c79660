"""CIFAR-style ResNet (He et al. 2016, section 4.2): ResNet-20/32/56, one block per residual unit."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import MODELS, BlockModel, scaled


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_resnet(depth: int, num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> BlockModel:
    """Blocks: ``stem``, ``layer{s}_{i}`` for stage s = 1..3 and unit i, then ``classifier``."""
    if (depth - 2) % 6:
        raise ValueError("CIFAR ResNet depth must be 6n + 2")
    n = (depth - 2) // 6
    widths = [scaled(c, width) for c in (16, 32, 64)]
    blocks: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)))]
    cin = widths[0]
    for s, c in enumerate(widths):
        for i in range(n):
            blocks.append((f"layer{s + 1}_{i}", BasicBlock(cin, c, 2 if (s > 0 and i == 0) else 1)))
            cin = c
    blocks.append(("classifier", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))))
    return BlockModel(blocks, input_shape)


for _d in (20, 32, 56):
    MODELS.register(f"resnet{_d}", f"CIFAR ResNet-{_d}: stem, {(_d - 2) // 2} residual units as blocks, classifier")(
        lambda num_classes, input_shape, width=1.0, _d=_d: make_resnet(_d, num_classes, input_shape, width))
