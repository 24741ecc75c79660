"""Top-k feature pruning: zero the smallest-magnitude fraction of each transmitted feature map, at training
and at inference (a cheap baseline: the edge sends a sparse map)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..params import require
from .base import DEFENSES, Defense


@dataclass
class TopkPruneParams:
    fraction: float = 0.5                       # share of values zeroed in each map (0 keeps everything)
    per: Literal["channel", "sample"] = "channel"  # channel: each (h, w) map of each image; sample: all of an image

    def validate(self) -> None:
        require(0.0 <= self.fraction < 1.0, "fraction", f"must be in [0, 1), got {self.fraction}")


def topk_mask(z: torch.Tensor, fraction: float, per: str = "channel") -> torch.Tensor:
    """0/1 mask of z's shape keeping the n - floor(fraction * n) largest |values| of every group of n values
    (a group is one channel map of one image for ``per='channel'`` on (N, C, H, W) features, else one image).
    Exactly floor(fraction * n) values per group are zeroed, ties broken by ``topk``."""
    if per == "channel" and z.dim() >= 3:
        flat = z.flatten(2)
    else:
        flat = z.flatten(1)
    n = flat.shape[-1]
    n_drop = int(fraction * n)
    mask = torch.zeros_like(flat)
    if n_drop < n:
        idx = flat.abs().topk(n - n_drop, dim=-1).indices
        mask.scatter_(-1, idx, 1.0)
    return mask.view_as(z)


@DEFENSES.register("topk_prune", "zero the smallest fraction of each transmitted feature map (param: fraction)")
class TopkPrune(Defense):
    Params = TopkPruneParams

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        if self.params.fraction == 0:
            return z
        return z * topk_mask(z.detach(), self.params.fraction, self.params.per)
