"""Shared pieces of the CEM defenses (``cem_gmm``, ``cem_slot_cross``, ``cem_gated_pool``; DESIGN.md section 3).

All three penalise, per class, the spread of the encoder's clean features z = f(x) relative to the noise floor
that the edge adds afterwards (z' = z + N(0, sigma^2 I): ``gaussian_noise`` in the stack, or ``noise: true``).
What differs is how a class's features are grouped into components (k-means clusters refit between epochs,
soft slots, one attention-pooled group). This module holds what they share:

- :class:`CEMParams`: the common parameters, with the CEM paper's defaults (sigma 0.025, lambda 16,
  var_threshold 0.125, gamma 0.01) and :func:`threshold` tau = var_threshold * sigma^2 + gamma;
- the lambda schedule: ``reference`` multiplies lambda by c_t = 0.001 / lr_t while lr_t >= 4.1e-4 and by 1
  after (:func:`reference_lambda_factor`), which reproduces the released code's gradient injection (see
  ``docs/cem.md``); ``constant`` uses lambda as it is;
- :func:`component_stats`: per-class, per-component mass, mean and per-dimension variance of float32 features
  under (C, S, N) weights, in two passes (no E[z^2] - mu^2 cancellation), as matrix products;
- :func:`guarded_input` / :func:`guarded_term`: the non-finite guard. A term that is NaN/Inf is replaced by 0,
  its gradient is blocked *at the features* (so NaN cannot reach the encoder through 0 * NaN), and both events
  are counted on the device; the surrogate's own parameters get non-finite gradient entries zeroed;
- :func:`feature_diagnostics`: the feature scale and scale-free spread ratios recorded in ``metrics.json``;
- :class:`CEMDefense`: the common hooks (own noise, warm-up, the stack checks, the guard, the diagnostics).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..models.fuse import inference_copy
from ..params import ConfigError, require
from .base import Defense

log = logging.getLogger("splitveil.defenses.cem")

REFERENCE_LR_SWITCH = 4.1e-4   # below this learning rate the reference adds lambda * g_C unscaled
REFERENCE_LR_SCALE = 1e-3      # above it, lambda * g_C * (0.001 / lr)


@dataclass
class CEMParams:
    sigma: float = 0.025         # std of the Gaussian noise on the features (the noise floor of the threshold)
    lambda_: float = 16.0        # CEM weight (config key: lambda); see lambda_schedule
    var_threshold: float = 0.125  # tau = var_threshold * sigma^2 + gamma
    gamma: float = 0.01          # small variance added inside the logs
    warmup_epochs: int = 0       # epochs trained with the task loss only before the surrogate switches on
    lambda_schedule: Literal["reference", "constant"] = "reference"  # reference: lambda * c_t (see module doc)
    noise: bool = False          # True: this defense adds N(0, sigma^2) itself (use it without gaussian_noise)

    def validate(self) -> None:
        require(self.sigma >= 0, "sigma", "must be >= 0")
        require(self.lambda_ >= 0, "lambda", "must be >= 0")
        require(self.var_threshold > 0, "var_threshold", "must be positive")
        require(self.gamma > 0, "gamma", "must be positive")
        require(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        require(self.lambda_ == 0 or self.sigma > 0, "sigma",
                f"is 0 with lambda = {self.lambda_} > 0: the threshold tau = gamma would penalise any spread with "
                "no noise to justify it; set sigma to the noise level or lambda: 0")


def threshold(sigma: float, var_threshold: float, gamma: float) -> float:
    """The noise-derived variance threshold tau = var_threshold * sigma^2 + gamma."""
    return var_threshold * sigma ** 2 + gamma


def reference_lambda_factor(lr: float) -> float:
    """c_t of the released code: 0.001 / lr while lr >= 4.1e-4, else 1."""
    return 1.0 if lr < REFERENCE_LR_SWITCH else REFERENCE_LR_SCALE / lr


def class_masks(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(C, N) mask, row c = 1 where y == c. Classes missing from the batch give rows of zeros."""
    return (y.unsqueeze(0) == torch.arange(num_classes, device=y.device).unsqueeze(1)).to(dtype)


def component_stats(z: torch.Tensor, w: torch.Tensor, y: torch.Tensor, eps: float = 1e-12):
    """Per-class, per-component mass (C, S), mean (C, S, D) and per-dimension variance (C, S, D) of flat
    features ``z`` (N, D) under weights ``w`` (C, S, N), where w[c, s, n] may be nonzero only if y[n] == c.

    float32 whatever the input precision (and outside autocast), in two passes: first the class means, then
    the weighted first and second moments of the class-centred features (the shifted-data variance: the
    cancellation of E[z^2] - mu^2 scales with the distance of a component's mean from its class mean, not with
    the feature's offset; in float32 the error is ~1e-6 relative where a raw one-pass form loses 1e-3 and
    bf16 all digits). Two (C*S, N) @ (N, D) products, no (N, S, D) temporary: this is the slot surrogate's
    inner loop. var is the biased (ML) variance; a component with zero mass gets mean 0 and variance 0
    (callers weight it by its zero mass)."""
    with torch.autocast(z.device.type, enabled=False):
        z32, w32 = z.float(), w.float()
        C, S, N = w32.shape
        D = z32.shape[1]
        mass = w32.sum(-1)
        denom = mass.clamp_min(eps).unsqueeze(-1)
        onehot = class_masks(y, C, z32.dtype)                                   # (C, N)
        class_mean = (onehot @ z32) / onehot.sum(1, keepdim=True).clamp_min(1)  # pass 1
        zc = z32 - class_mean[y]
        wf = w32.reshape(C * S, N)
        m1 = (wf @ zc).view(C, S, D) / denom                                    # pass 2
        m2 = (wf @ (zc * zc)).view(C, S, D) / denom
        mean = (m1 + class_mean.unsqueeze(1)) * (mass > 0).unsqueeze(-1)
        var = (m2 - m1 * m1).clamp_min(0)
    return mass, mean, var


def weighted_stats(z: torch.Tensor, w: torch.Tensor, eps: float = 1e-12):
    """Mass (G,), mean (G, D) and per-dimension variance (G, D) of ``z`` (N, D) under arbitrary weights ``w``
    (G, N); float32, two passes (memory G x N x D: for small problems and tests)."""
    with torch.autocast(z.device.type, enabled=False):
        z32, w32 = z.float(), w.float()
        mass = w32.sum(1)
        denom = mass.clamp_min(eps).unsqueeze(1)
        mean = (w32 @ z32) / denom
        diff = z32.unsqueeze(0) - mean.unsqueeze(1)
        var = torch.einsum("gn,gnd->gd", w32, diff * diff) / denom
    return mass, mean, var


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


# -- the non-finite guard -------------------------------------------------------------------------------------
class GuardState:
    """One training step's guard: ``ok`` (a device bool) turns False when any guarded term is non-finite."""

    def __init__(self, device: torch.device, counters: torch.Tensor):
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.counters = counters   # long (2,): [terms dropped, backward passes whose feature gradient was blocked]


class _GuardEntry(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, state):
        ctx.state = state
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        ok = ctx.state.ok & torch.isfinite(g).all()
        ctx.state.counters[1] += (~ok).long()
        return torch.where(ok, g, torch.zeros_like(g)), None


class _GuardExit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, state):
        ok = torch.isfinite(value).all()
        state.ok = state.ok & ok
        state.counters[0] += (~ok).long()
        ctx.save_for_backward(ok)
        return torch.where(ok, value, torch.zeros_like(value))

    @staticmethod
    def backward(ctx, g):
        (ok,) = ctx.saved_tensors
        return torch.where(ok, g, torch.zeros_like(g)), None


def guarded_input(z: torch.Tensor, state: GuardState) -> torch.Tensor:
    """The features as the CEM terms see them: in backward, the gradient reaching ``z`` from the terms is
    replaced by zeros when any guarded term of the step was non-finite or the gradient itself is not finite."""
    return _GuardEntry.apply(z, state)


def guarded_term(value: torch.Tensor, state: GuardState) -> torch.Tensor:
    """A term's value, or 0 when it is not finite (counted; no sync with the host)."""
    return _GuardExit.apply(value, state)


def _zero_nonfinite(g: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient with its NaN and +-inf entries replaced by 0 (one op: this runs per parameter)."""
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def _count_nonfinite(counters: torch.Tensor):
    """One hook for all the surrogate's parameters (registered before the per-parameter zeroing hooks, so it
    sees the raw gradients): counts a backward pass in which any of them had a non-finite entry. The inf-norm
    is non-finite exactly when an entry is (NaN propagates through the max)."""
    def hook(grads) -> None:
        gs = [g for g in grads if g is not None]
        if gs:
            norm = torch.nn.utils.get_total_norm(gs, norm_type=float("inf"), foreach=True)
            counters[1] += (~torch.isfinite(norm)).long()
    return hook


# -- diagnostics ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_images(encoder, data, split, device, batch_size: int = 256, amp=None):
    """Eval-mode, noise-free encoder features (N, D) float32 and labels of the images of ``split`` (an
    ImageSplit), encoded by an inference copy of ``encoder`` (models/fuse.py: BN folded, ReLU after max-pool; the
    encoder itself is not touched). ``amp``: a :class:`~splitveil.precision.MixedPrecision`, to encode at the
    training loop's precision and layout."""
    enc, _ = inference_copy(encoder)
    zs, ys = [], []
    for x, y in data.batches(split, batch_size, device):
        if amp is None:
            z = enc(x)
        else:
            with amp.autocast():
                z = enc(amp.input(x))
        zs.append(z.float().flatten(1))
        ys.append(y)
    return torch.cat(zs), torch.cat(ys)


@torch.no_grad()
def feature_diagnostics(z: torch.Tensor, y: torch.Tensor, num_classes: int, sigma: float, tau: float,
                        centroids: torch.Tensor | None = None) -> dict[str, float]:
    """Feature scale and spread of clean features ``z`` (N, D), float32.

    - ``std_z``: sqrt of the mean over dimensions of the per-dimension variance over all samples;
    - ``snr`` = std_z / sigma (how far the features stand above the noise);
    - ``within_cluster_var``: mean over samples and dimensions of the squared distance to the nearest of its
      class's ``centroids`` (C, k, D) (to its class mean when no centroids are given); ``within_cluster_var_over_tau``;
    - ``within_class_var`` / ``between_class_var``: mean squared distance (per dimension) of a sample to its class
      mean, and of the class means (weighted by class size) to the global mean; ``between_within_ratio`` is
      their scale-free ratio: shrinking every feature leaves it unchanged, a contraction of the classes raises it.
    """
    z = z.float()
    onehot = class_masks(y, num_classes)
    n_c = onehot.sum(1)
    mu_c = (onehot @ z) / n_c.clamp_min(1).unsqueeze(1)
    mu = z.mean(0)
    std_z = float(z.var(0, unbiased=False).mean().sqrt())
    within_class = float(((z - mu_c[y]) ** 2).mean())
    between = float((n_c.unsqueeze(1) * (mu_c - mu) ** 2).sum() / (n_c.sum() * z.shape[1]))
    if centroids is not None:
        total = torch.zeros((), device=z.device)
        for s in range(0, z.shape[0], 2048):   # chunks: (chunk, k, D) at a time
            zc, cc = z[s:s + 2048], centroids.float()[y[s:s + 2048]]
            total += ((zc.unsqueeze(1) - cc) ** 2).sum(-1).min(1).values.sum()
        within_cluster = float(total / z.numel())
    else:
        within_cluster = within_class
    return {
        "std_z": std_z,
        "snr": std_z / sigma if sigma > 0 else float("inf"),
        "within_cluster_var": within_cluster,
        "within_cluster_var_over_tau": within_cluster / tau,
        "within_class_var": within_class,
        "between_class_var": between,
        "between_within_ratio": between / within_class if within_class > 0 else float("inf"),
    }


class CEMDefense(Defense):
    """Common behaviour of the CEM variants. Subclasses implement :meth:`surrogate` (the unweighted L_C and
    optional extra terms); this class weights it by lambda_t, applies warm-up and the non-finite guard."""

    conflicts = ()
    shared_params = ("sigma",)    # the noise level: the same number as the noise defense's sigma
    adapts_to_feature_size = True  # rebuilt for a new feature size at the next epoch start
    trains_during_warmup = False   # True: the surrogate's own fitting term runs during warm-up too
    dim: int = 0                   # flattened feature size the state was allocated for (set by ``allocate``)

    def __init__(self, params: Any = None):
        super().__init__(params)
        self.num_classes = 0
        # [terms dropped as non-finite, backward passes whose gradient to the features (or to a surrogate
        # parameter) had non-finite entries and was zeroed]
        self.register_buffer("nonfinite", torch.zeros(2, dtype=torch.long))
        self.lr: float | None = None      # the optimizer's learning rate this epoch (reference schedule)
        self._protected: set[int] = set()
        self._warned = False

    @property
    def tau(self) -> float:
        p = self.params
        return threshold(p.sigma, p.var_threshold, p.gamma)

    # -- noise and the stack checks -------------------------------------------------------------------------
    def noise_std(self) -> float | None:
        return self.params.sigma if self.params.noise and self.params.sigma > 0 else None

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        if self.params.noise and self.params.sigma > 0:
            return z + self.params.sigma * torch.randn_like(z)
        return z

    def check_stack(self, defenses: list[Defense]) -> None:
        p, me = self.params, f"defense.{self.name}"
        others = []
        for d in defenses:
            if d is self:
                continue
            if d.adds_noise:
                others.append((d.name, d.noise_std()))
        if p.noise and others:
            raise ConfigError(f"{me}.noise: true adds the noise a second time on top of {others[0][0]}; use one of them")
        if p.lambda_ == 0:
            return
        if not p.noise and not others:
            raise ConfigError(f"{me}.lambda: {p.lambda_} > 0 but no defense adds noise to the features: CEM's "
                              f"threshold is relative to the noise; list a noise defense (e.g. gaussian_noise, "
                              f"sigma {p.sigma}) in defense.name or set {me}.noise: true")
        for name, s in others:
            if abs(s - p.sigma) > 1e-12 * max(1.0, abs(s)):
                raise ConfigError(f"{me}.sigma: {p.sigma} differs from defense.{name}.sigma: {s}; the CEM threshold "
                                  "must use the noise actually added (give one flat defense.sigma)")

    # -- state ---------------------------------------------------------------------------------------------
    def allocate(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        """Create the surrogate's state for ``num_classes`` classes of ``dim``-dimensional flat features."""
        self.num_classes, self.dim = num_classes, dim

    def _protect(self) -> None:
        """Zero non-finite gradient entries of the surrogate's own parameters (counted once per backward pass).
        Two hooks instead of a check per parameter: the surrogate has ~40 small parameters and the per-parameter
        isfinite/any/where cost ~15% of the slot surrogate's step on CPU."""
        new = [prm for prm in self.parameters() if id(prm) not in self._protected and prm.requires_grad]
        if not new:
            return
        torch.autograd.graph.register_multi_grad_hook(new, _count_nonfinite(self.nonfinite))   # first: raw grads
        for prm in new:
            prm.register_hook(_zero_nonfinite)
            self._protected.add(id(prm))

    def setup(self, ctx) -> None:
        self.num_classes = int(ctx.data.num_classes)
        self.allocate(self.num_classes, feature_dim(ctx.model, ctx.data), ctx.device)
        self._protect()

    def on_epoch_start(self, ctx, epoch: int) -> None:
        # a defense listed before this one may have changed the transmitted features (PATROL with
        # prune_output): rebuild the surrogate for the new size and give its parameters to the optimizer
        dim = feature_dim(ctx.model, ctx.data)
        if dim != self.dim:
            log.info("%s: feature size changed %d -> %d; surrogate rebuilt", self.name, self.dim, dim)
            self.allocate(self.num_classes, dim, ctx.device)
            self._protect()
            ctx.parameters_changed()
        self.lr = ctx.lr

    def on_epoch_end(self, ctx, epoch: int) -> None:
        self.warn_nonfinite()

    def warn_nonfinite(self) -> None:
        """Warn once (between epochs: reads the device counters) if the guard had to act."""
        if self._warned:
            return
        dropped, blocked = (int(v) for v in self.nonfinite)
        if dropped or blocked:
            self._warned = True
            log.warning("%s: %d non-finite CEM term(s) dropped and %d non-finite gradient(s) blocked so far; "
                        "training goes on without them (counts in defense_info)", self.name, dropped, blocked)

    # -- the loss ------------------------------------------------------------------------------------------
    def active(self, epoch: int) -> bool:
        return epoch >= self.params.warmup_epochs and self.params.lambda_ > 0

    def lambda_t(self) -> float:
        """The weight of L_C in this epoch's summed loss."""
        p = self.params
        if p.lambda_schedule == "reference" and self.lr is not None:
            return p.lambda_ * reference_lambda_factor(self.lr)
        return p.lambda_

    def surrogate(self, z: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_C, extra already-weighted terms such as the surrogate's own fitting loss)."""
        raise NotImplementedError

    def loss(self, step) -> dict[str, torch.Tensor]:
        if not self.active(step.epoch) and not self.trains_during_warmup:
            return {}
        if step.z[0].numel() != self.dim:
            raise ConfigError(f"defense.{self.name}: the features changed size ({self.dim} -> "
                              f"{step.z[0].numel()}) during an epoch; list the defense that changes them before it")
        state = GuardState(step.z.device, self.nonfinite)
        with torch.autocast(step.z.device.type, enabled=False):
            z = guarded_input(step.z, state).float()
            l_c, extra = self.surrogate(z, step.y, step.epoch)
            out = {k: guarded_term(v, state) for k, v in extra.items()}
            if self.active(step.epoch):
                out["L_C"] = guarded_term(self.lambda_t() * l_c, state)
        return out

    # -- reporting -----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        dropped, blocked = (int(v) for v in self.nonfinite)
        out = {"tau": self.tau, "nonfinite_skipped": dropped, "nonfinite_grads_blocked": blocked}
        if self.lr is not None:
            out["lambda_last_epoch"] = self.lambda_t()
        return out

    def diagnostic_centroids(self) -> torch.Tensor | None:
        return None

    def diagnostics(self, model, data, device) -> dict[str, Any]:
        z, y = encode_images(model.encoder, data, data.test, device)
        return feature_diagnostics(z, y, self.num_classes or int(data.num_classes), self.params.sigma, self.tau,
                                   self.diagnostic_centroids())


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
