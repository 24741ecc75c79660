"""Representation probes (GPZ paper): intra-class mean squared radius R_c^2, global feature variance
sigma_feat^2 and the paper's entropy bound terms."""
from __future__ import annotations

import math
from typing import Any

import torch


MIN_CLASS_SAMPLES = 2   # a class with one sample has R_c^2 = 0 by construction: it is left out, not counted as 0


def intra_class_radius(features: torch.Tensor, labels: torch.Tensor,
                       min_samples: int = MIN_CLASS_SAMPLES) -> dict[int, float]:
    """R_c^2 = (1/N_c) sum_{i in c} ||z_i - mu_c||^2 for every class c with at least ``min_samples`` samples
    (features flattened; classes with fewer samples are left out)."""
    z = features.flatten(1).double()
    out = {}
    for c in torch.unique(labels).tolist():
        zc = z[labels == c]
        if len(zc) < min_samples:
            continue
        out[int(c)] = float(((zc - zc.mean(0)) ** 2).sum(1).mean())
    return out


def mean_intra_class_radius(features: torch.Tensor, labels: torch.Tensor) -> float:
    r = intra_class_radius(features, labels)
    if not r:
        raise ValueError(f"R_c^2: no class has {MIN_CLASS_SAMPLES} or more samples")
    return sum(r.values()) / len(r)


def bootstrap_class_groups(labels: torch.Tensor, resamples: int, seed: int,
                           min_samples: int = MIN_CLASS_SAMPLES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The resampling plan of ``bootstrap_mean_radius``: per class (>= ``min_samples`` samples, ascending class
    id) its sample indices and a (resamples, N_c) matrix of draw counts (N_c draws with replacement within the
    class: a stratified bootstrap, so every resample has the same classes and class sizes). Deterministic in
    (labels, resamples, seed): every cut of a sweep uses the same resamples of the same images."""
    g = torch.Generator().manual_seed(int(seed))
    groups = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < min_samples:
            continue
        draws = torch.randint(0, len(idx), (resamples, len(idx)), generator=g)
        counts = torch.zeros(resamples, len(idx), dtype=torch.float64)
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
        groups.append((idx, counts))
    return groups


def bootstrap_mean_radius(features: torch.Tensor, labels: torch.Tensor, resamples: int = 200,
                          seed: int = 0) -> torch.Tensor:
    """Class-mean R_c^2 of ``resamples`` stratified bootstrap resamples of the samples (float64, shape
    (resamples,)). Exact: with y_i = z_i - mu_c, Gram matrix G = Y Y^T and draw counts m (sum N_c), a resample's
    R_c^2 = sum_i m_i G_ii / N_c - m^T G m / N_c^2, so the cost is one Gram matrix per class. Each resample's
    R_c^2 is multiplied by N_c / (N_c - 1): the expectation of the plug-in R_c^2 over resamples with replacement is
    exactly (N_c - 1) / N_c times the sample's, and without the factor the interval sits below the estimate
    (by 1/6 with 6 images per class)."""
    z = features.flatten(1).double()
    groups = bootstrap_class_groups(labels, resamples, seed)
    if not groups:
        raise ValueError(f"R_c^2: no class has {MIN_CLASS_SAMPLES} or more samples")
    total = torch.zeros(resamples, dtype=torch.float64)
    for idx, m in groups:
        y = z[idx] - z[idx].mean(0)
        gram = y @ y.T
        n = len(idx)
        r = (m @ gram.diagonal()) / n - ((m @ gram) * m).sum(1) / n ** 2
        total += r * (n / (n - 1))   # resampling with replacement shrinks R_c^2 by (N_c - 1) / N_c in expectation
    return total / len(groups)


def global_variance(features: torch.Tensor) -> float:
    """sigma_feat^2 = tr(Sigma) / d: the mean per-dimension variance of the flattened features."""
    z = features.flatten(1).double()
    return float(z.var(0, unbiased=False).mean())


def feature_entropy_bound(d: int, sigma2: float) -> float:
    """The paper's feature-level bound h(Z_feat) <= d/2 ln(2 pi e sigma_feat^2) (GPZ paper, Eq. 3).

    ``sigma2`` = 0 (constant features) gives -inf."""
    if sigma2 <= 0:
        return float("-inf")
    return 0.5 * d * math.log(2 * math.pi * math.e * sigma2)


def decision_entropy_bound(D: int, radius2: float, num_classes: int) -> float:
    """The paper's decision-level bound h(Z_dec) <= D/2 ln(2 pi e R_c^2 / D) + ln K (GPZ paper, Eqs. 2 and 4).

    ``radius2`` is R_c^2 (the bound on max_c h(Z | Y=c) uses the largest class radius); R_c^2 = 0 gives -inf."""
    if radius2 <= 0:
        return float("-inf")
    return 0.5 * D * math.log(2 * math.pi * math.e * radius2 / D) + math.log(num_classes)


def probe_values(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> dict[str, Any]:
    """Every probe value of one layer's features (N, ...) with integer ``labels`` (N,).

    - ``d``: flattened feature dimension (the paper's d at feature level, D at decision level: the same
      number for one layer, so both bounds use it);
    - ``rc2_per_class`` / ``rc2_mean`` / ``rc2_std`` / ``rc2_max``: R_c^2 per class, its mean, spread
      (population std over classes) and maximum, over the classes with >= 2 samples (``rc2_classes`` of them;
      ``rc2_excluded`` classes with one sample are left out);
    - ``sigma2``: sigma_feat^2 = tr(Sigma) / d;
    - ``within_fraction``: mean_c R_c^2 / tr(Sigma), the share of the total variance that lies within classes
      (scale-free, in [0, ~1]; about 0 when every class collapses to one point): what the GPZ detector uses;
    - ``h_feat_bound`` = d/2 ln(2 pi e sigma_feat^2) and ``h_dec_bound`` = D/2 ln(2 pi e max_c R_c^2 / D) + ln K
      (K = ``num_classes``, default: the classes present), in nats.
    """
    rc = intra_class_radius(features, labels)
    if not rc:
        raise ValueError(f"R_c^2: no class has {MIN_CLASS_SAMPLES} or more samples among {len(labels)} probe images")
    vals = torch.tensor(list(rc.values()), dtype=torch.float64)
    d = int(features[0].numel())
    sigma2 = global_variance(features)
    k = int(num_classes) if num_classes else len(torch.unique(labels))
    mean = float(vals.mean())
    total = sigma2 * d
    return {
        "d": d,
        "num_classes": k,
        "rc2_per_class": rc,
        "rc2_classes": len(rc),
        "rc2_excluded": len(torch.unique(labels)) - len(rc),
        "rc2_mean": mean,
        "rc2_std": float(vals.std(unbiased=False)),
        "rc2_max": float(vals.max()),
        "sigma2": sigma2,
        "within_fraction": mean / total if total > 0 else 0.0,
        "h_feat_bound": feature_entropy_bound(d, sigma2),
        "h_dec_bound": decision_entropy_bound(d, float(vals.max()), k),
    }
