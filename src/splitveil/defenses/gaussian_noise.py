"""Additive Gaussian noise on the transmitted features, at training and at inference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import require
from .base import DEFENSES, Defense


@dataclass
class NoiseParams:
    sigma: float = 0.1   # standard deviation of the noise added to every feature

    def validate(self) -> None:
        require(self.sigma >= 0, "sigma", "must be >= 0")


@DEFENSES.register("gaussian_noise", "z' = z + N(0, sigma^2 I) at training and inference (param: sigma)")
class GaussianNoise(Defense):
    Params = NoiseParams
    shared_params = ("sigma",)   # CEM's threshold uses the same noise level

    def noise_std(self) -> float | None:
        return float(self.params.sigma) if self.params.sigma > 0 else None

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        if self.params.sigma == 0:
            return z
        return z + self.params.sigma * torch.randn_like(z)
