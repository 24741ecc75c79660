"""The inversion decoder shared by the decoder attacks (``attacks/inverse_network*``, ``attacks/gan``) and by the
``noise_arl`` defense's simulated attacker: features z (C, h, w), tokens (T, dim) or a vector (d,) -> an image
in [0, 1]. It lives here, below both attacks/ and defenses/, so neither imports the other for it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def make_activation(kind: str, channels: int) -> nn.Module:
    return {"prelu": lambda: nn.PReLU(channels), "tanh": nn.Tanh, "relu": lambda: nn.ReLU(inplace=True)}[kind]()


def token_grid(n_tokens: int) -> int:
    """Side of the square patch grid of ``n_tokens`` transformer tokens (n = side^2, or 1 + side^2 with a class
    token first); 0 if there is none."""
    for n in (n_tokens, n_tokens - 1):
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return side
    return 0


class TokensToMap(nn.Module):
    """Tokens (N, T, dim) -> map (N, dim, side, side): drops a leading class token, patch tokens row-major."""

    def __init__(self, n_tokens: int, side: int):
        super().__init__()
        self.skip, self.side = n_tokens - side * side, side

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, self.skip:].transpose(1, 2).reshape(z.shape[0], z.shape[2], self.side, self.side)


def auto_width(c_in: int) -> int:
    """The decoder's first-stage width for ``c_in`` input channels: clamp(C_in / 2, 64, 256)."""
    return int(min(256, max(64, c_in // 2)))


class ResidualBlock(nn.Module):
    """act(x + BN(conv(act(BN(conv(x)))))), the last BN's scale initialised at 0 (Goyal et al. 2017)."""

    def __init__(self, channels: int, act: str):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  make_activation(act, channels),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.act = make_activation(act, channels)
        nn.init.zeros_(self.body[-1].weight)   # zero-init residual branch: each block starts as act(x), a shallow net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class InversionDecoder(nn.Module):
    """z (C, h, w), tokens (T, dim) or (d,) -> image (C_x, H, W) in [0, 1]: a stem at the feature map's size,
    log2(H/h) x2 upsamplings (transposed convs, width halved, >= 32), a conv head and a sigmoid.

    ``arch="residual"`` (default): conv stem of width ``channels`` (None: clamp(C_in / 2, 64, 256)), ``blocks``
    residual blocks, and one residual block after every upsampling. ``arch="plain"``: the old two-conv stem
    and bare upsamplings (5 layers at 8x8 -> 32x32). ``stage_hook(channels, size)`` may return a module
    inserted after each stage (attention blocks)."""

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], channels: int | None = 128,
                 activation: str = "auto", stage_hook=None, arch: str = "plain", blocks: int = 0):
        super().__init__()
        cx, H, W = image_shape
        self.image_size = (H, W)
        if len(feature_shape) == 2 and token_grid(feature_shape[0]):  # ViT tokens (T, dim): patch tokens -> map
            side = token_grid(feature_shape[0])
            c_in, h = feature_shape[1], side
            self.project = TokensToMap(feature_shape[0], side)
            width = channels or auto_width(c_in)
        elif len(feature_shape) <= 2:   # vector features (or tokens without a square grid): project to a 4x4 map
            n_in = math.prod(feature_shape)
            width = channels or auto_width(n_in // 16 if n_in >= 16 else 1)
            c_in, h = width, 4
            self.project = nn.Sequential(nn.Flatten(), nn.Linear(n_in, width * 16), nn.Unflatten(1, (width, 4, 4)))
        else:
            c_in, h = feature_shape[0], feature_shape[1]
            self.project = nn.Identity()
            width = channels or auto_width(c_in)
        residual = arch == "residual"
        act = activation if activation != "auto" else ("prelu" if h <= 8 else ("relu" if residual else "tanh"))
        n_up = max(0, round(math.log2(max(H, 1) / max(h, 1))))
        c = width
        if residual:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), make_activation(act, c)]
            layers += [ResidualBlock(c, act) for _ in range(blocks)]
        else:
            layers = [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), make_activation(act, c),
                      nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), make_activation(act, c)]
        size = h
        if stage_hook:
            layers.append(stage_hook(c, size))
        for _ in range(n_up):
            c_out = max(32, c // 2)
            size *= 2
            # small maps keep the stem's activation, larger ones (> 8x8) ReLU (residual) / Tanh (plain) under "auto"
            a = ("prelu" if size <= 8 else "relu") if residual and activation == "auto" else act
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), make_activation(a, c_out)]
            if residual:
                layers.append(ResidualBlock(c_out, a))
            c = c_out
            if stage_hook:
                layers.append(stage_hook(c, size))
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, cx, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.project(z))
        if tuple(h.shape[-2:]) != self.image_size:
            h = F.interpolate(h, size=self.image_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(h))


__all__ = ["InversionDecoder", "ResidualBlock", "TokensToMap", "auto_width", "make_activation", "token_grid"]
