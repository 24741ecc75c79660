"""CEM with a gated-attention-pooling surrogate (Ilse et al. 2018 attention; the slides' variant).

Per class c present in the batch, attention weights over the class's samples
    a_m = softmax_m( w^T [tanh(V x_m) * sigmoid(U x_m)] / temperature ),   x_m = LayerNorm(z_m)
give an attention-weighted mean and per-dimension variance of the clean features,
    mu = sum_m a_m z_m,   var = sum_m a_m (z_m - mu)^2,
and the term  L_c = mean_d max(0, log(var_d + gamma) - log tau),  tau = var_threshold * sigma^2 + gamma.
L_C is the mean of L_c over the classes present. Warm-up: 5 epochs by default (the slides).

How the attention network (V, U, w) is trained: it is in the trainer's optimizer (the same optimizer as the
model, via ``trainable_parameters``). With ``surrogate_update: adversarial`` (default) its gradient from L_C is
reversed, so it *maximises* the estimate: it seeks the weighting under which the class looks most spread,
and the encoder shrinks that worst-case spread; the scores are computed from detached features, so the encoder
is moved only through the weighted statistics. Minimising the term over the attention instead (``joint``,
the literal reading of the slides) lets the attention put all weight on one sample, which makes the variance 0
and switches the penalty off; it is kept as an option for comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..params import require
from .base import DEFENSES
from .cem_common import CEMDefense, CEMParams, class_masks, component_stats, flat, grad_reverse


@dataclass
class CEMGatedPoolParams(CEMParams):
    warmup_epochs: int = 5            # the slides' warm-up for gated pooling
    hidden: int = 64                  # attention width (V, U: D -> hidden; w: hidden -> 1)
    temperature: float = 1.0          # softmax temperature of the attention scores
    surrogate_update: Literal["adversarial", "joint"] = "adversarial"

    def validate(self) -> None:
        super().validate()
        require(self.hidden >= 1, "hidden", "must be >= 1")
        require(self.temperature > 0, "temperature", "must be positive")


class GatedAttentionPool(nn.Module):
    """Per-group gated attention weights (Ilse et al. 2018) over a batch of flat features."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        x = self.norm(z)
        return self.w(torch.tanh(self.V(x)) * torch.sigmoid(self.U(x))).squeeze(-1)     # (N,)

    def weights(self, z: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(G, N) softmax weights over the members of each group (rows of ``mask``); empty groups get 0."""
        e = (self.scores(z) / temperature).unsqueeze(0).expand_as(mask)
        e = torch.where(mask > 0, e, torch.full_like(e, -1e4))
        return torch.softmax(e, dim=1) * mask


def pooled_hinge(z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, tau: float, gamma: float):
    """Mean over present classes of mean_d relu(log(var_d + gamma) - log tau) under weights ``a`` (C, N)
    (a[c, n] > 0 only for y[n] == c); float32 two-pass statistics."""
    mass, mu, var = component_stats(z, a.unsqueeze(1), y)
    mu, var = mu.squeeze(1), var.squeeze(1)
    per_group = torch.relu(torch.log(var + gamma) - math.log(tau)).mean(-1)
    present = (mask.sum(1) > 0).to(z.dtype)
    return (per_group * present).sum() / present.sum().clamp_min(1), {"mean": mu, "var": var, "present": present}


@DEFENSES.register("cem_gated_pool", "CEM with gated attention pooling per class: hinge on the attention-weighted "
                   "log variance vs the noise floor (params: sigma, lambda, hidden)")
class CEMGatedPool(CEMDefense):
    Params = CEMGatedPoolParams

    def allocate(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        super().allocate(num_classes, dim, device)
        self.pool = GatedAttentionPool(dim, self.params.hidden).to(device)

    def surrogate(self, z, y, epoch):
        p = self.params
        z = flat(z)
        mask = class_masks(y, self.num_classes, z.dtype)
        if p.surrogate_update == "adversarial":
            a = grad_reverse(self.pool.weights(z.detach(), mask, p.temperature))
        else:
            a = self.pool.weights(z, mask, p.temperature)
        l_c, _ = pooled_hinge(z, y, a, mask, self.tau, p.gamma)
        return l_c, {}
