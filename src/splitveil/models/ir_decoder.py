"""Inverse network from reversed IR bottleneck units (the GPZ paper's "Inversion-IR152" attacker): features
z (C, h, w) -- or a vector (d,) / tokens (T, dim), first projected to a 4x4 map -- to an image in [0, 1].

A reversed IR unit mirrors ``models.ir.IRUnit``: residual branch BN -> 3x3 transposed conv -> PReLU -> transposed
conv carrying the upsampling (4x4, stride 2) or a 3x3 one -> BN, plus a shortcut (identity, or a 2x2 stride-2
transposed conv + BN when upsampling, or a 1x1 conv + BN when the channels change). The decoder stacks
log2(H / h) upsampling stages of ``units`` reversed units each (channels halved per stage, at least 32), then
BN, a 3x3 conv to the image channels and a sigmoid. This module holds the network only; the decoder attacks
train it (see docs/gpz.md for the one-line option that selects it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ReversedIRUnit(nn.Module):
    """One reversed IR bottleneck unit (see the module docstring); ``up`` doubles the resolution."""

    def __init__(self, cin: int, cout: int, up: bool):
        super().__init__()
        last = nn.ConvTranspose2d(cout, cout, 4, 2, 1, bias=False) if up else nn.ConvTranspose2d(cout, cout, 3, 1, 1,
                                                                                                 bias=False)
        self.residual = nn.Sequential(nn.BatchNorm2d(cin), nn.ConvTranspose2d(cin, cout, 3, 1, 1, bias=False),
                                      nn.PReLU(cout), last, nn.BatchNorm2d(cout))
        if up:
            self.shortcut: nn.Module = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout))
        elif cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class IRInversionDecoder(nn.Module):
    """``feature_shape`` -> ``image_shape`` (C, H, W) in [0, 1]; ``channels``: width of the first stage;
    ``units``: reversed IR units per stage (the first of a stage upsamples)."""

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], channels: int = 128,
                 units: int = 2):
        super().__init__()
        if units < 1:
            raise ValueError("units must be >= 1")
        cx, H, W = image_shape
        self.image_size = (H, W)
        if len(feature_shape) == 3:
            c_in, h = feature_shape[0], feature_shape[1]
            self.project: nn.Module = nn.Identity()
        else:   # vectors and token sequences: a learned projection to a 4x4 map
            c_in, h = channels, 4
            self.project = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(feature_shape), channels * 16),
                                         nn.Unflatten(1, (channels, 4, 4)))
        n_up = max(0, round(math.log2(max(H, 1) / max(h, 1))))
        layers: list[nn.Module] = [ReversedIRUnit(c_in, channels, up=False)]
        c = channels
        for _ in range(n_up):
            c_out = max(32, c // 2)
            layers.append(ReversedIRUnit(c, c_out, up=True))
            layers += [ReversedIRUnit(c_out, c_out, up=False) for _ in range(units - 1)]
            c = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, cx, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.project(z))
        if tuple(h.shape[-2:]) != self.image_size:
            h = F.interpolate(h, size=self.image_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(h))
