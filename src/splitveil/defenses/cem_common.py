"""Shared pieces of the CEM defenses (``cem_gmm``, ``cem_slot_cross``, ``cem_gated_pool``; DESIGN.md section 3).

All three penalise, per class, the spread of the encoder's (clean) features z = f(x) relative to the noise
floor that the edge adds afterwards (z' = z + N(0, sigma^2 I), usually by listing ``gaussian_noise`` before the
CEM defense). What differs is how the batch's features of a class are grouped into "components" (hard
k-means clusters, soft slots, one attention-pooled group). This module holds what they share:

- :class:`CEMParams`: the common parameters (``sigma``, ``lambda``, ``var_threshold``, ``gamma``,
  ``warmup_epochs``, ``noise``) and :func:`threshold` tau = var_threshold * sigma^2 + gamma;
- :func:`class_masks`: per-class membership of a batch, as a (C, N) float mask (absent classes are rows of 0);
- :func:`weighted_stats`: per-group mass, mean and per-dimension variance for any (G, N) weighting, as
  matrix products (no Python loop over classes or groups, no device-to-host copy);
- :class:`CEMDefense`: the common hooks: optional own noise, warm-up, the composition check, a guard that
  drops a non-finite term and counts it (on the device; read out by ``info()``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..params import ConfigError, require
from .base import Defense

log = logging.getLogger("splitveil.defenses.cem")


@dataclass
class CEMParams:
    sigma: float = 0.1           # std of the Gaussian noise on the features (the noise floor of the threshold)
    lambda_: float = 1.0         # weight of the surrogate in L = L_task + lambda * L_C (config key: lambda)
    var_threshold: float = 1.0   # tau = var_threshold * sigma^2 + gamma
    gamma: float = 1e-3          # small variance added inside the logs (keeps log finite at zero spread)
    warmup_epochs: int = 0       # epochs trained with the task loss only before the surrogate switches on
    noise: bool = False          # True: this defense adds N(0, sigma^2) itself (use it without gaussian_noise)

    def validate(self) -> None:
        require(self.sigma >= 0, "sigma", "must be >= 0")
        require(self.lambda_ >= 0, "lambda", "must be >= 0")
        require(self.var_threshold > 0, "var_threshold", "must be positive")
        require(self.gamma > 0, "gamma", "must be positive")
        require(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")


def threshold(sigma: float, var_threshold: float, gamma: float) -> float:
    """The noise-derived variance threshold tau = var_threshold * sigma^2 + gamma."""
    return var_threshold * sigma ** 2 + gamma


def class_masks(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(C, N) mask, row c = 1 where y == c. Classes missing from the batch give rows of zeros."""
    return (y.unsqueeze(0) == torch.arange(num_classes, device=y.device).unsqueeze(1)).to(dtype)


def weighted_stats(z: torch.Tensor, w: torch.Tensor, eps: float = 1e-12):
    """Per-group mass, mean and per-dimension variance of flat features ``z`` (N, D) under weights ``w`` (G, N).

    mass_g = sum_n w_gn; mu_g = sum_n w_gn z_n / mass_g; var_g = sum_n w_gn (z_n - mu_g)^2 / mass_g (biased,
    as an ML mixture fit). Computed as E[z^2] - mu^2 on batch-centred features (two matrix products), clamped
    at 0. A group with zero mass gets mean 0 and variance 0 (callers weight it by its zero mass)."""
    zc = z - z.mean(0, keepdim=True).detach()
    mass = w.sum(1)
    denom = mass.clamp_min(eps).unsqueeze(1)
    mu_c = (w @ zc) / denom
    var = ((w @ (zc * zc)) / denom - mu_c * mu_c).clamp_min(0)
    return mass, mu_c + z.mean(0, keepdim=True).detach(), var


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -g


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, negated gradient backward: the parameters upstream *maximise* what follows."""
    return _GradReverse.apply(x)


class CEMDefense(Defense):
    """Common behaviour of the CEM variants. Subclasses implement :meth:`surrogate` (the unweighted L_C and
    optional extra terms); this class weights it by lambda, applies warm-up and the non-finite guard."""

    conflicts = ()

    def __init__(self, params: Any = None):
        super().__init__(params)
        self.num_classes = 0
        self.register_buffer("nonfinite_skipped", torch.zeros((), dtype=torch.long))
        self._checked = False

    @property
    def tau(self) -> float:
        p = self.params
        return threshold(p.sigma, p.var_threshold, p.gamma)

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        if self.params.noise and self.params.sigma > 0:
            return z + self.params.sigma * torch.randn_like(z)
        return z

    dim: int = 0           # flattened feature size the state was allocated for (set by ``allocate``)

    def allocate(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        """Create the surrogate's state for ``num_classes`` classes of ``dim``-dimensional flat features."""
        self.num_classes, self.dim = num_classes, dim

    def setup(self, model, data, device) -> None:
        self.num_classes = int(data.num_classes)
        self.allocate(self.num_classes, feature_dim(model, data), device)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        # a defense listed before this one may have changed the transmitted features (PATROL with
        # prune_output): rebuild the surrogate for the new size and give its parameters to the optimizer
        dim = feature_dim(trainer.model, trainer.data)
        if dim != self.dim:
            log.info("%s: feature size changed %d -> %d; surrogate rebuilt", self.name, self.dim, dim)
            self.allocate(self.num_classes, dim, trainer.device)
            trainer.rebuild_optimizer()
        if self._checked:
            return
        self._checked = True
        names = [d.name for d in trainer.defenses]
        if self.params.noise and "gaussian_noise" in names:
            raise ConfigError(f"defense.{self.name}.noise: true adds the noise a second time on top of "
                              "gaussian_noise; use one of them")
        if not self.params.noise and self.params.sigma > 0 and "gaussian_noise" not in names:
            log.warning("%s: sigma=%g sets the threshold but no noise is added; list gaussian_noise before it "
                        "or set %s.noise: true", self.name, self.params.sigma, self.name)

    def active(self, epoch: int) -> bool:
        return epoch >= self.params.warmup_epochs and self.params.lambda_ > 0

    def surrogate(self, z: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_C, extra already-weighted terms such as the surrogate's own fitting loss)."""
        raise NotImplementedError

    def guard(self, value: torch.Tensor) -> torch.Tensor:
        """Drop a non-finite term (value 0, no gradient from it) and count it, without a host sync."""
        ok = torch.isfinite(value)
        self.nonfinite_skipped += (~ok).long()
        return torch.where(ok, value, torch.zeros_like(value))

    trains_during_warmup = False   # True: the surrogate's own fitting term runs during warm-up too

    def loss(self, step) -> dict[str, torch.Tensor]:
        if not self.active(step.epoch) and not self.trains_during_warmup:
            return {}
        if step.z[0].numel() != self.dim:
            raise ConfigError(f"defense.{self.name}: the features changed size ({self.dim} -> "
                              f"{step.z[0].numel()}) during an epoch; list the defense that changes them before it")
        l_c, extra = self.surrogate(step.z, step.y, step.epoch)
        out = {k: self.guard(v) for k, v in extra.items()}
        if self.active(step.epoch):
            out["L_C"] = self.guard(self.params.lambda_ * l_c)
        return out

    def info(self) -> dict[str, Any]:
        return {"tau": self.tau, "nonfinite_skipped": int(self.nonfinite_skipped)}


def flat(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(1)


def softplus_margin(x: torch.Tensor, sharpness: float) -> torch.Tensor:
    """(1/beta') log(1 + exp(beta' x)): a smooth hinge max(0, x)."""
    return nn.functional.softplus(x, beta=sharpness)


@torch.no_grad()
def feature_dim(model, data) -> int:
    """Flattened size of the encoder's output for one input (a forward pass in eval mode)."""
    enc = model.encoder
    was = enc.training
    enc.eval()
    try:
        dev = next(iter(enc.parameters()), torch.zeros(())).device
        return int(enc(torch.zeros(1, *data.image_shape, device=dev)).flatten(1).shape[1])
    finally:
        enc.train(was)
