"""IR-50 / IR-152 (the "improved residual" face-recognition ResNets used as the GPZ paper's target model),
written as one block per bottleneck unit so that every unit boundary is a cut.

Blocks: ``stem`` (3x3 conv, BN, PReLU, full resolution), ``stage{s}_unit{i}`` for the four stages (64, 128,
256, 512 channels; the first unit of each stage halves the resolution), then ``head`` (BN, dropout, flatten,
linear to ``embedding`` features, BN, linear classifier). With the paper's 64x64 inputs, IR-152 has 52 blocks
and block k (1-based, the stem is block 1) is cut k: blocks 2-4 are (64, 32, 32), 5-12 (128, 16, 16), 13-48
(256, 8, 8) and 49-51 (512, 4, 4) -- the numbering of the paper's Table 2 (block 40: feature level, block 50:
decision level).

An IR bottleneck unit: residual branch BN -> 3x3 conv -> PReLU -> 3x3 conv (carrying the stride) -> BN, plus a
shortcut (identity, subsampled when strided, or a 1x1 conv + BN when the channels change); no activation after
the sum.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, BlockModel, scaled

STAGE_CHANNELS = (64, 128, 256, 512)
UNITS = {"ir50": (3, 4, 14, 3), "ir152": (3, 8, 36, 3)}


class IRUnit(nn.Module):
    """One IR bottleneck unit (see the module docstring)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        if cin == cout:
            self.shortcut: nn.Module = nn.Identity() if stride == 1 else nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class IRHead(nn.Module):
    """BN, dropout, flatten, linear to the embedding, BN1d, then the linear classifier."""

    def __init__(self, channels: int, spatial: tuple[int, int], embedding: int, num_classes: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.Dropout(dropout), nn.Flatten(),
                                  nn.Linear(channels * spatial[0] * spatial[1], embedding), nn.BatchNorm1d(embedding))
        self.fc = nn.Linear(embedding, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _down(n: int) -> int:
    return (n - 1) // 2 + 1   # output size of a stride-2, padding-1, 3x3 conv


def make_ir(units: tuple[int, ...], num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0,
            embedding: int = 512, dropout: float = 0.0) -> BlockModel:
    """IR network with ``units`` bottleneck units per stage; channels scaled by ``width``; ``embedding``
    features before the classifier (scaled by ``width`` too)."""
    if len(units) != len(STAGE_CHANNELS):
        raise ValueError(f"ir: expected {len(STAGE_CHANNELS)} stages, got {len(units)}")
    chans = [scaled(c, width) for c in STAGE_CHANNELS]
    h, w = input_shape[1:]
    blocks: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(input_shape[0], chans[0], 3, 1, 1, bias=False), nn.BatchNorm2d(chans[0]),
                               nn.PReLU(chans[0])))]
    cin = chans[0]
    for s, (n, c) in enumerate(zip(units, chans)):
        for i in range(n):
            stride = 2 if i == 0 else 1
            blocks.append((f"stage{s + 1}_unit{i + 1}", IRUnit(cin, c, stride)))
            if stride == 2:
                h, w = _down(h), _down(w)
            cin = c
    blocks.append(("head", IRHead(cin, (h, w), scaled(embedding, width), num_classes, dropout)))
    return BlockModel(blocks, input_shape)


for _name, _units in UNITS.items():
    MODELS.register(_name, f"IR-{_name[2:]} ({'+'.join(map(str, _units))} IR bottleneck units, GPZ paper's target; "
                    "64x64 inputs): stem, one block per unit, head")(
        lambda num_classes, input_shape, width=1.0, embedding=512, dropout=0.0, _u=_units:
        make_ir(_u, num_classes, input_shape, width, embedding, dropout))
