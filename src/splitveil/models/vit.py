"""A CIFAR-sized Vision Transformer (Dosovitskiy et al. 2021) as named blocks: ``embed`` (patch embedding,
class token, position embedding), ``block1..blockN`` (pre-norm transformer blocks), ``classifier``.

Every cut transmits the whole token sequence, shape (1 + number of patches, dim): the class token first,
then the patch tokens in row-major order (the GPZ paper's case where the output shape never shrinks).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import MODELS, BlockModel, scaled


class PatchEmbed(nn.Module):
    """Image (C, H, W) -> tokens (1 + (H/p)(W/p), dim): conv patchify, prepend the class token, add positions."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch: int, dim: int):
        super().__init__()
        h, w = image_size
        if h % patch or w % patch:
            raise ValueError(f"vit: image size {h}x{w} is not divisible by the patch size {patch}")
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + (h // patch) * (w // patch), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(x).flatten(2).transpose(1, 2)            # (N, patches, dim)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ClassTokenHead(nn.Module):
    """LayerNorm, then a linear classifier on the class token."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x)[:, 0])


def make_vit(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0, depth: int = 6,
             dim: int = 128, heads: int = 4, patch: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0) -> BlockModel:
    """``dim`` is scaled by ``width`` (rounded to a multiple of ``heads``); defaults: 6 blocks, dim 128, 4x4 patches
    (32x32 input -> 64 patch tokens + the class token)."""
    d = max(heads, scaled(dim, width) // heads * heads)
    blocks: list[tuple[str, nn.Module]] = [("embed", PatchEmbed(input_shape[0], tuple(input_shape[1:]), patch, d))]
    blocks += [(f"block{i + 1}", TransformerBlock(d, heads, mlp_ratio, dropout)) for i in range(depth)]
    blocks.append(("classifier", ClassTokenHead(d, num_classes)))
    return BlockModel(blocks, input_shape)


MODELS.register("vit", "CIFAR-sized ViT: patch embedding, transformer blocks (tokens are transmitted), class-token head")(
    make_vit)
