"""A CIFAR-sized Vision Transformer (Dosovitskiy et al. 2021) as named blocks: ``embed`` (patch embedding,
class token, position embedding), ``block1..blockN`` (pre-norm transformer blocks), ``classifier``.

Every cut transmits the whole token sequence, shape (1 + number of patches, dim): the class token first,
then the patch tokens in row-major order (the GPZ paper's case where the output shape never shrinks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


class Attention(nn.Module):
    """Multi-head self-attention written with explicit projections and matmuls, so that
    ``torch.utils.flop_counter`` counts all of it (``nn.MultiheadAttention``'s fused inference path and the CPU
    kernel of ``scaled_dot_product_attention`` are not counted)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5   # explicit matmuls: counted on every device
        h = F.dropout(a.softmax(-1), self.dropout, self.training) @ v
        return self.proj(h.transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
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
