"""CEM with a per-class mixture surrogate (Xia et al., CVPR 2025; DESIGN.md section 3; docs/cem.md).

Refit (after every epoch, as the released code): the encoder's eval-mode, noise-free features of the training
split (or of a seeded sample of ``refit_per_class`` images per class, the same images every epoch), encoded by
an inference copy of the encoder with each BN folded into its convolution and each ReLU moved after its
max-pool (models/fuse.py: the same features up to float rounding, about twice as fast on CPU), are
clustered per class by k-means in torch on the device: k-means++ start the first time a class is fitted,
warm-started from the previous centroids afterwards, up to ``kmeans_iters`` Lloyd iterations (stopping early
when no assignment changes), classes processed in chunks of bounded memory, random draws from the defense's
own generator (seeded from the run seed and the epoch). The refit stores per class and cluster the centroid
mu, the weight pi (share of the class's points) and the variance var (mean over points and dimensions of the
squared distance to mu). Until the first refit (end of epoch 1) the term is 0.

Per training step, each sample goes to the nearest stored centroid of its own class, and:

- ``form: reference`` (default; the released code's loss): per class c and cluster j present in the batch,
  v = a * mean_{batch members} mean_d (z - mu_cj)^2 + (1 - a) var_cj, a = 10 n_cj / (pi_cj N_c) (0.99 where
  that is >= 1; n_cj the batch members, N_c the class's training images, 10 = ``var_mix_scale``), and
  L_c = sum_j pi_cj relu(log(v + gamma) - log tau), tau = var_threshold sigma^2 + gamma; L_C is the mean of
  L_c over the classes present. (The released code reads pi and var of the wrong class; not reproduced.)
- ``form: hinge_diag``: per-dimension variances of the batch's members around their batch mean, batch weights:
  L_c = sum_j p_cj mean_d relu(log(var_cjd + gamma) - log tau).
- ``form: logdet`` (the paper's equation, diagonal covariances, batch statistics):
  L_c = sum_j p_cj (-log p_cj + 1/2 log |diag(var_cj) + s2 I| / |s2 I|), s2 = sigma^2; divided by D with
  ``reduce: mean`` (default), the full log-det with ``reduce: sum``.

The weight is lambda_t = lambda * c_t with ``lambda_schedule: reference`` (cem_common), which makes the
trainer's single backward of L_task + lambda_t L_C give the released code's update exactly (it back-propagates
L_C alone, keeps the encoder gradient, and adds lambda c_t times it to the task gradient; L_C reaches no other
parameter). Nothing in the training step copies to the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..params import require
from .base import DEFENSES
from .cem_common import CEMDefense, CEMParams, class_masks, component_stats, encode_images, flat


@dataclass
class CEMGMMParams(CEMParams):
    k: int = 5                                 # clusters per class (the reference's sigmoid VGG: 5)
    form: Literal["reference", "hinge_diag", "logdet"] = "reference"
    reduce: Literal["mean", "sum"] = "mean"    # logdet form: log-det / D (mean) or the full log-det (sum)
    kmeans_iters: int = 50                     # maximum Lloyd iterations per refit
    refit_per_class: int | None = None         # null: the whole training split; n: a seeded sample of n per class
    refit_batch_size: int = 256                # batch size of the feature extraction for the refit
    var_mix_scale: float = 10.0                # reference form: a = var_mix_scale * n_cj / (pi_cj N_c)
    refit_chunk_elements: int = 1 << 26        # bound on classes x points x dim held by one k-means chunk

    def validate(self) -> None:
        super().validate()
        require(self.k >= 1, "k", "must be >= 1")
        require(self.kmeans_iters >= 1, "kmeans_iters", "must be >= 1")
        require(self.refit_per_class is None or self.refit_per_class >= 1, "refit_per_class", "must be >= 1 or null")
        require(self.refit_batch_size >= 1, "refit_batch_size", "must be >= 1")
        require(self.var_mix_scale > 0, "var_mix_scale", "must be positive")
        require(self.refit_chunk_elements >= 1, "refit_chunk_elements", "must be >= 1")


# -- k-means ------------------------------------------------------------------------------------------------
def _sqdist(x: torch.Tensor, cent: torch.Tensor, xx: torch.Tensor | None = None) -> torch.Tensor:
    """Squared distances (C, P, k) between x (C, P, D) and cent (C, k, D) (x centred per class by the caller);
    ``xx``: the precomputed squared norms (C, P, 1) of x."""
    if xx is None:
        xx = (x * x).sum(-1, keepdim=True)
    return (xx - 2 * x @ cent.transpose(1, 2) + (cent * cent).sum(-1).unsqueeze(1)).clamp_min(0)


def kmeans_pp(x: torch.Tensor, valid: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ start for each class: x (C, P, D), valid (C, P). Returns (C, k, D)."""
    C = x.shape[0]
    rows = torch.arange(C, device=x.device)
    w = valid.to(x.dtype)
    w_safe = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    idx = torch.multinomial(w_safe, 1, generator=generator).squeeze(1)
    cents = [x[rows, idx]]
    dmin = ((x - cents[0].unsqueeze(1)) ** 2).sum(-1)
    for _ in range(1, k):
        prob = dmin * w
        prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, w_safe)     # all points equal: uniform
        idx = torch.multinomial(prob, 1, generator=generator).squeeze(1)
        cents.append(x[rows, idx])
        dmin = torch.minimum(dmin, ((x - cents[-1].unsqueeze(1)) ** 2).sum(-1))
    return torch.stack(cents, 1)


def kmeans(x: torch.Tensor, valid: torch.Tensor, init: torch.Tensor, iters: int):
    """Batched Lloyd iterations over classes: x (C, P, D), valid (C, P) bool, init (C, k, D). Stops when no
    valid point changes cluster (checked on the host: this runs between epochs). A centroid that loses all its
    points keeps its position. Returns (centroids (C, k, D), assignment (C, P), iterations run)."""
    cent = init.clone()
    k = cent.shape[1]
    w_valid = valid.to(x.dtype).unsqueeze(-1)
    xx = (x * x).sum(-1, keepdim=True)          # once: the points do not move
    prev = None
    it = 0
    for it in range(1, iters + 1):
        a = _sqdist(x, cent, xx).argmin(-1)
        if prev is not None and not bool(((a != prev) & valid).any()):
            break
        prev = a
        onehot = (a.unsqueeze(-1) == torch.arange(k, device=x.device)).to(x.dtype) * w_valid
        counts = onehot.sum(1)
        sums = onehot.transpose(1, 2) @ x
        cent = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), cent)
    return cent, _sqdist(x, cent, xx).argmin(-1), it


def assign(z: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each sample's own class. z (N, D), y (N,), centroids (C, k, D)."""
    return ((z.unsqueeze(1) - centroids[y]) ** 2).sum(-1).argmin(1)


# -- the per-batch surrogates ---------------------------------------------------------------------------------
def reference_surrogate(z, y, centroids, fitted, weights, variances, class_count, tau, gamma, var_mix_scale=10.0):
    """The released code's loss (module doc). z (N, D) float32; centroids (C, k, D); weights, variances (C, k)
    from the refit; class_count (C,) training images per class. Returns (L_C, stats)."""
    C, k, _ = centroids.shape
    with torch.no_grad():
        comp = assign(z.detach(), y, centroids)
        member = class_masks(y * k + comp, C * k, z.dtype)                   # (C*k, N)
        n = member.sum(1).view(C, k)
        expected = weights * class_count.to(z.dtype).unsqueeze(1)
        a = var_mix_scale * n / expected.clamp_min(1e-12)
        a = torch.where((a >= 1) | (expected <= 0), torch.full_like(a, 0.99), a)
    d2 = ((z - centroids[y, comp]) ** 2).mean(-1)                            # (N,) distance to the stored centroid
    batch_var = (member @ d2).view(C, k) / n.clamp_min(1)
    v = a * batch_var + (1 - a) * variances
    term = weights * torch.relu(torch.log(v + gamma) - math.log(tau)) * (n > 0).to(z.dtype)
    per_class = term.sum(1)
    present = ((n.sum(1) > 0) & fitted).to(z.dtype)
    l_c = (per_class * present).sum() / present.sum().clamp_min(1)
    return l_c, {"v": v, "a": a, "n": n, "per_class": per_class, "present": present}


def gmm_surrogate(z: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor, fitted: torch.Tensor,
                  form: str, tau: float, noise_var: float, gamma: float, reduce: str = "mean"):
    """``hinge_diag`` / ``logdet`` forms: batch statistics under hard assignment to the class's centroids.

    stats: ``pi`` (C, k) batch masses within each class, ``var`` (C, k, D) per-dimension variances around the
    batch mean of each cluster, ``mean`` (C, k, D), ``per_class`` (C,), ``present`` (C,)."""
    num_classes, k, _ = centroids.shape
    z = flat(z)
    with torch.no_grad():
        comp = assign(z.detach().float(), y, centroids.float())
        w = class_masks(y * k + comp, num_classes * k).view(num_classes, k, -1)
    mass, mean, var = component_stats(z, w, y)
    n_c = mass.sum(1)
    pi = mass / n_c.clamp_min(1).unsqueeze(1)
    if form == "hinge_diag":
        per_class = (pi * torch.relu(torch.log(var + gamma) - math.log(tau)).mean(-1)).sum(1)
    else:
        logdet = torch.log1p(var / noise_var)
        logdet = logdet.mean(-1) if reduce == "mean" else logdet.sum(-1)
        per_class = (-torch.special.xlogy(pi, pi) + pi * 0.5 * logdet).sum(1)
    present = ((n_c > 0) & fitted).to(var.dtype)
    l_c = (per_class * present).sum() / present.sum().clamp_min(1)
    return l_c, {"pi": pi, "mean": mean, "var": var, "per_class": per_class, "present": present}


@DEFENSES.register("cem_gmm", "CEM (the paper): per-class k-means refit each epoch on eval-mode training features, "
                   "the released loss (form=reference|hinge_diag|logdet), lambda schedule reference|constant "
                   "(params: sigma, lambda, k, form)")
class CEMGMM(CEMDefense):
    Params = CEMGMMParams

    def __init__(self, params: Any = None):
        super().__init__(params)
        self.seed = 0
        self.refit_iterations: list[int] = []

    def allocate(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        """Create the mixture state for ``num_classes`` classes of ``dim``-dimensional (flattened) features."""
        super().allocate(num_classes, dim, device)
        p, C = self.params, num_classes
        self.register_buffer("centroids", torch.zeros(C, p.k, dim, device=device))
        self.register_buffer("fitted", torch.zeros(C, dtype=torch.bool, device=device))
        self.register_buffer("mix_weights", torch.zeros(C, p.k, device=device))
        self.register_buffer("mix_vars", torch.zeros(C, p.k, device=device))
        self.register_buffer("class_count", torch.zeros(C, device=device))
        self.register_buffer("refits", torch.zeros((), dtype=torch.long, device=device))

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.class_count.copy_(torch.bincount(ctx.data.train.labels.long(), minlength=self.num_classes).float())

    # -- refitting -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_features(self, z: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Refit the per-class k-means on features ``z`` (N, ...) with labels ``y``: k-means++ for a class not
        yet fitted, warm start otherwise; a class with fewer than k points keeps its previous state."""
        p, C = self.params, self.num_classes
        z = flat(z).to(self.centroids.dtype)
        y = y.to(z.device).long()
        counts = torch.bincount(y, minlength=C)
        if not bool(self.class_count.any()):      # direct use (tests): N_c from the given features
            self.class_count.copy_(counts.to(self.class_count.dtype))
        order = torch.argsort(y, stable=True)
        starts = counts.cumsum(0) - counts
        counts_h = counts.tolist()
        D = z.shape[1]
        c0, iters = 0, 0
        while c0 < C:   # chunks of classes with bounded memory
            c1, p_max = c0 + 1, max(1, counts_h[c0])
            while c1 < C and (c1 + 1 - c0) * max(p_max, counts_h[c1]) * max(D, p.k) <= p.refit_chunk_elements:
                p_max = max(p_max, counts_h[c1])
                c1 += 1
            cls = torch.arange(c0, c1, device=z.device)
            pos = torch.arange(p_max, device=z.device).unsqueeze(0)
            valid = pos < counts[cls].unsqueeze(1)
            take = order[(starts[cls].unsqueeze(1) + torch.minimum(pos, (counts[cls] - 1).clamp_min(0).unsqueeze(1)))
                         .clamp(max=max(0, len(y) - 1))]
            x = z[take] * valid.unsqueeze(-1)
            centre = x.sum(1) / counts[cls].clamp_min(1).unsqueeze(1).to(x.dtype)
            xc = (x - centre.unsqueeze(1)) * valid.unsqueeze(-1)               # centred: precise distances
            init = torch.where(self.fitted[cls].view(-1, 1, 1), self.centroids[cls] - centre.unsqueeze(1),
                               kmeans_pp(xc, valid, p.k, generator))
            cent, a, it = kmeans(xc, valid, init, p.kmeans_iters)
            iters = max(iters, it)
            onehot = (a.unsqueeze(-1) == torch.arange(p.k, device=z.device)).to(x.dtype) * valid.unsqueeze(-1)
            n_k = onehot.sum(1)                                                  # (c, k)
            d2 = torch.stack([((xc - cent[:, j:j + 1]) ** 2).mean(-1) for j in range(p.k)], -1)   # exact
            var = (onehot * d2).sum(1) / n_k.clamp_min(1)
            ok = (counts[cls] >= p.k).view(-1, 1)
            self.centroids[cls] = torch.where(ok.unsqueeze(-1), cent + centre.unsqueeze(1), self.centroids[cls])
            self.mix_weights[cls] = torch.where(ok, n_k / counts[cls].clamp_min(1).unsqueeze(1), self.mix_weights[cls])
            self.mix_vars[cls] = torch.where(ok, var, self.mix_vars[cls])
            self.fitted[cls] |= ok.squeeze(1)
            c0 = c1
        self.refits += 1
        self.refit_iterations.append(iters)

    def refit_source(self, data):
        """The training images the refit encodes: all, or a seeded sample of ``refit_per_class`` per class
        (drawn once from the run seed, so every epoch refits on the same images)."""
        n = self.params.refit_per_class
        if n is None:
            return data.train
        g = torch.Generator().manual_seed(10_007 * self.seed + 17)
        labels = data.train.labels.long()
        keep = []
        for c in range(self.num_classes):
            idx = torch.nonzero(labels == c).squeeze(1)
            keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
        return data.train.subset(torch.sort(torch.cat(keep)).values)

    @torch.no_grad()
    def refit(self, model, data, device, epoch: int, amp=None) -> None:
        """Eval-mode, noise-free features of the refit images, then the k-means. ``amp``: the training loop's
        :class:`~splitveil.precision.MixedPrecision`, so the encoding runs at the precision and layout of the
        training step (the features are cast to float32 before any statistic)."""
        z, y = encode_images(model.encoder, data, self.refit_source(data), device, self.params.refit_batch_size, amp)
        dev = self.centroids.device
        gen = torch.Generator(device=dev).manual_seed(1_000_003 * self.seed + 7919 * epoch + 11)
        self.fit_features(z.to(dev), y.to(dev), gen)

    def on_epoch_start(self, ctx, epoch: int) -> None:
        super().on_epoch_start(ctx, epoch)
        self.seed = int(ctx.seed)

    def on_epoch_end(self, ctx, epoch: int) -> None:
        if self.params.lambda_ > 0:
            self.refit(ctx.model, ctx.data, ctx.device, epoch, ctx.amp)
        super().on_epoch_end(ctx, epoch)

    def mixture(self) -> dict[str, torch.Tensor]:
        """The last refit: weights (C, k), centroids (C, k, D), variances (C, k) (mean over dimensions), fitted."""
        return {"weights": self.mix_weights, "means": self.centroids, "variances": self.mix_vars,
                "fitted": self.fitted}

    # -- the per-batch surrogate -----------------------------------------------------------------------------
    def surrogate(self, z, y, epoch):
        p = self.params
        z = flat(z)
        if p.form == "reference":
            l_c, _ = reference_surrogate(z, y, self.centroids, self.fitted, self.mix_weights, self.mix_vars,
                                         self.class_count, self.tau, p.gamma, p.var_mix_scale)
        else:
            l_c, _ = gmm_surrogate(z, y, self.centroids, self.fitted, p.form, self.tau, p.sigma ** 2, p.gamma, p.reduce)
        return l_c, {}

    def diagnostic_centroids(self) -> torch.Tensor | None:
        return self.centroids if bool(self.fitted.all()) else None

    def info(self) -> dict[str, Any]:
        if not hasattr(self, "refits"):   # not set up yet
            return super().info()
        return {**super().info(), "refits": int(self.refits), "classes_fitted": int(self.fitted.sum()),
                "kmeans_iterations": self.refit_iterations}
