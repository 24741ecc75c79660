"""Dropout on the transmitted features, at training *and* at inference (the attacker sees dropped features)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import require
from .base import DEFENSES, Defense


@dataclass
class DropoutParams:
    rate: float = 0.3      # probability that a transmitted value is zeroed
    rescale: bool = True   # multiply kept values by 1 / (1 - rate) (inverted dropout), as nn.Dropout does

    def validate(self) -> None:
        require(0.0 <= self.rate < 1.0, "rate", f"must be in [0, 1), got {self.rate}")


@DEFENSES.register("dropout", "dropout on the transmitted features at training and inference (param: rate)")
class FeatureDropout(Defense):
    """z' = m * z / (1 - rate), m ~ Bernoulli(1 - rate) element-wise, fresh at every call. Unlike ``nn.Dropout``
    it stays active in eval mode: the deployed edge sends dropped features and the attacker sees them."""

    Params = DropoutParams

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        p = self.params.rate
        if p == 0:
            return z
        if self.params.rescale:
            return F.dropout(z, p, training=True)
        return z * (torch.rand_like(z) >= p).to(z.dtype)
