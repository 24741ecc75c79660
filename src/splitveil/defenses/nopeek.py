"""NoPeek (Vepakomma et al. 2020): loss += alpha * dCor(x, z), the sample distance correlation between the
inputs and the transmitted features of a batch.

Vectorised on the device: two (n, n) distance matrices from ``torch.cdist`` (memory quadratic in the batch
size n, linear in the feature size), double-centred, then three means; no Python loop over pairs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..params import require
from .base import DEFENSES, Defense, StepContext


def _centred_distances(a: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1)
    d = torch.cdist(a, a, compute_mode="donot_use_mm_for_euclid_dist")   # exact |a_i - a_j|, 0 on the diagonal
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sample distance correlation (Szekely et al. 2007) of paired samples x (n, ...) and z (n, ...), in [0, 1].

    dCov^2(x, z) = mean_ij A_ij B_ij with A, B the double-centred distance matrices, and
    dCor = sqrt(dCov^2(x, z) / sqrt(dCov^2(x, x) dCov^2(z, z))); 0 when either sample is constant.
    It is 1 when z = a Q x + b (a != 0, Q orthogonal) and tends to 0 with n for independent x and z."""
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"distance_correlation: {x.shape[0]} samples of x but {z.shape[0]} of z")
    a, b = _centred_distances(x), _centred_distances(z.to(x.dtype))
    dcov_xz = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()
    dcor = (dcov_xz.clamp_min(0) / dvar.clamp_min(eps).sqrt()).clamp_min(eps).sqrt()
    return torch.where(dvar > eps, dcor, torch.zeros_like(dcor))   # no host sync: stays on the device


@dataclass
class NoPeekParams:
    alpha: float = 0.5                       # weight of dCor(x, z) in the loss
    features: Literal["sent", "raw"] = "sent"  # sent: after every transform (what leaves the edge); raw: f(x)

    def validate(self) -> None:
        require(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")


@DEFENSES.register("nopeek", "NoPeek: loss += alpha * distance correlation dCor(x, z), vectorised (param: alpha)")
class NoPeek(Defense):
    Params = NoPeekParams

    def loss(self, step: StepContext) -> dict[str, torch.Tensor]:
        if self.params.alpha == 0:
            return {}
        z = step.z_sent if self.params.features == "sent" else step.z
        return {"dcor": self.params.alpha * distance_correlation(step.x, z)}
