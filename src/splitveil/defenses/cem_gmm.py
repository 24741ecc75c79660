"""CEM with a per-class Gaussian-mixture surrogate (Xia et al., CVPR 2025; DESIGN.md section 3).

Between epochs, a k-component mixture of each class's features is refit in torch on the device (batched
Lloyd / k-means over all classes at once, warm-started from the previous centroids) from features gathered
during the epoch (a per-class ring buffer filled in ``after_step``). In every training step, each sample of
class c is assigned to the nearest centroid of class c; the step's per-component mass pi, mean and per-dimension
variance var (diagonal covariance) give the surrogate:

- ``form: logdet`` (the paper): L_C = sum_i pi_i (-log pi_i + 1/2 log |diag(var_i) + s2 I| / |s2 I|),
  s2 = sigma^2 + gamma (the noise covariance Sigma_p = sigma^2 I, gamma guarding sigma = 0); with
  ``reduce: mean`` (default) the log-det is divided by the feature dimension D so that lambda has the same
  scale as the hinge form, ``reduce: sum`` is the paper's exact log-det.
- ``form: hinge`` (the released code): L_C = sum_i pi_i mean_d relu(log(var_id + gamma) - log tau),
  tau = var_threshold * sigma^2 + gamma: only the components whose spread exceeds the noise floor are pushed.

Both are averaged over the classes present in the batch (and fitted). The trainer backpropagates
L_task + lambda L_C once: every encoder parameter receives grad(L_task) + lambda grad(L_C), which is exactly
what the reference's order (backpropagate L_C to the encoder first, keep its gradient, add the task gradient)
produces, because L_C does not depend on the cloud decoder. Until the first refit (end of epoch 1) there are
no centroids and the term is 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..params import require
from .base import DEFENSES
from .cem_common import CEMDefense, CEMParams, class_masks, flat, weighted_stats


@dataclass
class CEMGMMParams(CEMParams):
    k: int = 3                                # mixture components per class
    form: Literal["hinge", "logdet"] = "hinge"
    reduce: Literal["mean", "sum"] = "mean"   # logdet form: log-det / D (mean) or the full log-det (sum)
    bank_size: int = 512                      # features kept per class for the refit (the latest of the epoch)
    kmeans_iters: int = 20                    # Lloyd iterations per refit

    def validate(self) -> None:
        super().validate()
        require(self.k >= 1, "k", "must be >= 1")
        require(self.bank_size >= 1, "bank_size", "must be >= 1")
        require(self.kmeans_iters >= 1, "kmeans_iters", "must be >= 1")


def kmeans(x: torch.Tensor, valid: torch.Tensor, init: torch.Tensor, iters: int) -> torch.Tensor:
    """Batched Lloyd iterations. x (C, P, D) points, valid (C, P) bool, init (C, k, D) centroids.
    A centroid that loses all its points keeps its previous position. Returns (C, k, D)."""
    cent = init.clone()
    w_valid = valid.to(x.dtype).unsqueeze(-1)
    x2 = (x * x).sum(-1, keepdim=True)
    for _ in range(iters):
        d = x2 - 2 * x @ cent.transpose(1, 2) + (cent * cent).sum(-1).unsqueeze(1)     # (C, P, k)
        onehot = (d.argmin(-1).unsqueeze(-1) == torch.arange(cent.shape[1], device=x.device)).to(x.dtype) * w_valid
        counts = onehot.sum(1)                                                           # (C, k)
        sums = onehot.transpose(1, 2) @ x                                                # (C, k, D)
        cent = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), cent)
    return cent


def assign(z: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each sample's own class. z (N, D), y (N,), centroids (C, k, D)."""
    c = centroids[y]                                                                      # (N, k, D)
    d = ((z.unsqueeze(1) - c) ** 2).sum(-1)
    return d.argmin(1)


def gmm_surrogate(z: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor, fitted: torch.Tensor,
                  form: str, tau: float, noise_var: float, gamma: float, reduce: str = "mean"):
    """L_C of a batch under hard assignment to the class's centroids; returns (L_C, stats dict).

    stats: ``pi`` (C, k) component masses within each class, ``var`` (C, k, D) per-dimension variances,
    ``mean`` (C, k, D), ``per_class`` (C,) the class terms, ``present`` (C,) classes that count."""
    num_classes, k, _ = centroids.shape
    z = flat(z)
    with torch.no_grad():
        comp = assign(z.detach(), y, centroids.to(z.dtype))
        groups = y * k + comp
        w = class_masks(groups, num_classes * k, z.dtype)                                 # (C*k, N)
    mass, mean, var = weighted_stats(z, w)
    mass, mean, var = mass.view(num_classes, k), mean.view(num_classes, k, -1), var.view(num_classes, k, -1)
    n_c = mass.sum(1)
    pi = mass / n_c.clamp_min(1).unsqueeze(1)
    if form == "hinge":
        per_class = (pi * torch.relu(torch.log(var + gamma) - math.log(tau)).mean(-1)).sum(1)
    else:
        per_class = _logdet_class(pi, var, noise_var, reduce)
    present = ((n_c > 0) & fitted).to(z.dtype)
    l_c = (per_class * present).sum() / present.sum().clamp_min(1)
    return l_c, {"pi": pi, "mean": mean, "var": var, "per_class": per_class, "present": present}


def _logdet_class(pi: torch.Tensor, var: torch.Tensor, noise_var: float, reduce: str) -> torch.Tensor:
    """sum_i pi_i (-log pi_i + 1/2 log|Sigma_i + Sigma_p|/|Sigma_p|) per class, diagonal covariances."""
    logdet = torch.log1p(var / noise_var)
    logdet = logdet.mean(-1) if reduce == "mean" else logdet.sum(-1)
    return (-torch.special.xlogy(pi, pi) + pi * 0.5 * logdet).sum(1)


@DEFENSES.register("cem_gmm", "CEM: per-class k-means/GMM refit each epoch, lambda * L_C on the feature spread "
                   "vs the noise floor (params: sigma, lambda, k, form=hinge|logdet)")
class CEMGMM(CEMDefense):
    name = "cem_gmm"
    Params = CEMGMMParams

    def allocate(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        """Create the mixture state for ``num_classes`` classes of ``dim``-dimensional (flattened) features."""
        super().allocate(num_classes, dim, device)
        p, C = self.params, num_classes
        self.register_buffer("centroids", torch.zeros(C, p.k, dim, device=device))
        self.register_buffer("fitted", torch.zeros(C, dtype=torch.bool, device=device))
        self.register_buffer("mix_weights", torch.zeros(C, p.k, device=device))
        self.register_buffer("mix_vars", torch.zeros(C, p.k, dim, device=device))
        self.register_buffer("bank", torch.zeros(C, p.bank_size, dim, device=device), persistent=False)
        self.register_buffer("bank_count", torch.zeros(C, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("refits", torch.zeros((), dtype=torch.long, device=device))

    # -- gathering and refitting ---------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Append a batch's features to the per-class ring buffers (device ops only)."""
        z = flat(z).to(self.bank.dtype)
        onehot = (y.unsqueeze(1) == torch.arange(self.num_classes, device=y.device)).long()   # no host sync
        rank = (onehot.cumsum(0) - 1).gather(1, y.unsqueeze(1)).squeeze(1)
        pos = (self.bank_count[y] + rank) % self.bank.shape[1]
        self.bank[y, pos] = z
        self.bank_count += onehot.sum(0)

    @torch.no_grad()
    def refit(self, generator: torch.Generator | None = None) -> None:
        """k-means per class on the gathered features, warm-started from the previous centroids (a class
        fitted for the first time starts from k random gathered samples); then empties the buffers."""
        p = self.params
        cap = self.bank.shape[1]
        n = self.bank_count.clamp(max=cap)
        valid = torch.arange(cap, device=n.device).unsqueeze(0) < n.unsqueeze(1)              # (C, P)
        score = torch.rand(valid.shape, device=valid.device, generator=generator) if generator is not None \
            else torch.rand(valid.shape, device=valid.device)
        idx = torch.where(valid, score, torch.full_like(score, -1.0)).topk(min(p.k, cap), dim=1).indices
        init = torch.gather(self.bank, 1, idx.unsqueeze(-1).expand(-1, -1, self.bank.shape[2]))
        if init.shape[1] < p.k:  # bank smaller than k: repeat
            init = init.repeat(1, -(-p.k // init.shape[1]), 1)[:, :p.k]
        init = torch.where(self.fitted.view(-1, 1, 1), self.centroids, init)
        cent = kmeans(self.bank, valid, init, p.kmeans_iters)
        has = n > 0
        self.centroids.copy_(torch.where(has.view(-1, 1, 1), cent, self.centroids))
        # mixture weights and diagonal variances of the refit (recorded; the loss uses each batch's own)
        groups = torch.arange(self.num_classes, device=n.device).unsqueeze(1) * p.k + \
            assign(self.bank.flatten(0, 1), torch.arange(self.num_classes, device=n.device).repeat_interleave(cap),
                   self.centroids).view(self.num_classes, cap)
        w = class_masks(groups.flatten(), self.num_classes * p.k, self.bank.dtype) * valid.flatten().to(self.bank.dtype)
        mass, _, var = weighted_stats(self.bank.flatten(0, 1), w)
        mass = mass.view(self.num_classes, p.k)
        self.mix_weights.copy_(torch.where(has.unsqueeze(1), mass / n.clamp_min(1).unsqueeze(1), self.mix_weights))
        self.mix_vars.copy_(torch.where(has.view(-1, 1, 1), var.view_as(self.mix_vars), self.mix_vars))
        self.fitted |= has
        self.bank_count.zero_()
        self.refits += 1

    def fit_features(self, z: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Gather ``z`` (in bank-sized chunks) and refit: the between-epoch step on given features."""
        self.gather(z, y)
        self.refit(generator)

    def mixture(self) -> dict[str, torch.Tensor]:
        """The last refit: weights (C, k), means (C, k, D), diagonal variances (C, k, D), fitted (C,)."""
        return {"weights": self.mix_weights, "means": self.centroids, "variances": self.mix_vars,
                "fitted": self.fitted}

    def after_step(self, step, trainer) -> None:
        self.gather(step.z, step.y)

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        self.refit()

    # -- the per-batch surrogate -----------------------------------------------------------------------
    def surrogate(self, z, y, epoch):
        p = self.params
        l_c, _ = gmm_surrogate(z, y, self.centroids, self.fitted, p.form, self.tau, p.sigma ** 2 + p.gamma,
                               p.gamma, p.reduce)
        return l_c, {}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "refits": int(self.refits), "classes_fitted": int(self.fitted.sum())}
