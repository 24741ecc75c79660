"""Representation probes (GPZ paper): intra-class mean squared radius R_c^2, global feature variance
sigma_feat^2, the paper's entropy bound terms, and the scale-free within-class fraction R_c^2 / tr(Sigma) beside
them (R_c^2 moves with any rescaling of the features, which an inverse network undoes)."""
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


def _class_resamples(z: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor]]
                     ) -> list[tuple[int, torch.Tensor, float]]:
    """Per class of the plan: (N_c, the resamples' R_c^2 corrected by N_c / (N_c - 1), the sample's plug-in R_c^2).

    Exact: with y_i = z_i - mu_c, Gram matrix G = Y Y^T and draw counts m (sum N_c), a resample's plug-in
    R_c^2 = sum_i m_i G_ii / N_c - m^T G m / N_c^2, so the cost is one Gram matrix per class. Its expectation over
    resamples with replacement is exactly (N_c - 1) / N_c times the sample's: without the factor N_c / (N_c - 1)
    the interval sits below the estimate (by 1/6 with 6 images per class)."""
    out = []
    for idx, m in groups:
        y = z[idx] - z[idx].mean(0)
        gram = y @ y.T
        n = len(idx)
        r = (m @ gram.diagonal()) / n - ((m @ gram) * m).sum(1) / n ** 2
        out.append((n, r * (n / (n - 1)), float(gram.diagonal().sum()) / n))
    return out


def bootstrap_probe(features: torch.Tensor, labels: torch.Tensor, resamples: int = 200, seed: int = 0,
                    chunk: int = 16384) -> dict[str, torch.Tensor]:
    """Stratified bootstrap resamples (the plan of ``bootstrap_class_groups``: the same resamples as
    ``bootstrap_mean_radius``) of the class-mean R_c^2, the total variance tr(Sigma) and the within-class fraction
    mean_c R_c^2 / tr(Sigma), each float64 of shape (resamples,).

    - ``rc2``: as ``bootstrap_mean_radius`` (identical values).
    - ``total``: tr(Sigma) of the resample = the class-size-weighted within part sum_c p_c R_c^2 (p_c = N_c / N,
      R_c^2 corrected as above) plus the between part sum_c p_c ||mu_c^m - mu^m||^2 of the resampled class means,
      less its exact resampling bias sum_c p_c (1 - p_c) R_c^2 / N_c (R_c^2 the sample's plug-in value: a
      resampled class mean varies by R_c^2 / N_c around the sample's). Both parts are so centred on the sample's
      values, whose sum is tr(Sigma) exactly (the law of total variance). Classes with one sample stay fixed in
      every resample (a draw from one sample is that sample).
    - ``within_fraction``: ``rc2 / total`` (scale-free: multiplying the features by a constant leaves it unchanged).

    Memory is bounded by computing the between part over ``chunk`` feature columns at a time."""
    z = features.flatten(1).double()
    groups = bootstrap_class_groups(labels, resamples, seed)
    if not groups:
        raise ValueError(f"R_c^2: no class has {MIN_CLASS_SAMPLES} or more samples")
    n_all = len(labels)
    per_class = _class_resamples(z, groups)
    rc2 = sum(r for _, r, _ in per_class) / len(per_class)
    within = sum(r * (n / n_all) for n, r, _ in per_class)
    bias = sum((n / n_all) * (1 - n / n_all) * plug / n for n, _, plug in per_class)
    grouped = set(torch.cat([idx for idx, _ in groups]).tolist())
    fixed = [i for i in range(n_all) if i not in grouped]
    between = torch.zeros(resamples, dtype=torch.float64)
    for lo in range(0, z.shape[1], chunk):
        zc = z[:, lo:lo + chunk]
        grand = torch.zeros(resamples, zc.shape[1], dtype=torch.float64)
        sq = torch.zeros(resamples, dtype=torch.float64)
        for idx, m in groups:
            mu = (m @ zc[idx]) / len(idx)                       # (resamples, chunk): the class mean per resample
            w = len(idx) / n_all
            grand += w * mu
            sq += w * (mu * mu).sum(1)
        for i in fixed:                                         # singleton classes (each its own mean)
            grand += zc[i] / n_all
            sq += float((zc[i] * zc[i]).sum()) / n_all
        between += sq - (grand * grand).sum(1)
    total = within + (between - bias).clamp_min(0.0)
    frac = torch.where(total > 0, rc2 / total.clamp_min(1e-300), torch.zeros_like(rc2))
    return {"rc2": rc2, "total": total, "within_fraction": frac}


def bootstrap_mean_radius(features: torch.Tensor, labels: torch.Tensor, resamples: int = 200,
                          seed: int = 0) -> torch.Tensor:
    """Class-mean R_c^2 of ``resamples`` stratified bootstrap resamples of the samples (float64, shape
    (resamples,)): exact via one Gram matrix per class, each resample corrected by N_c / (N_c - 1) so that the
    interval is centred on the estimate (see ``_class_resamples``). Deterministic in (labels, resamples, seed)."""
    z = features.flatten(1).double()
    groups = bootstrap_class_groups(labels, resamples, seed)
    if not groups:
        raise ValueError(f"R_c^2: no class has {MIN_CLASS_SAMPLES} or more samples")
    per_class = _class_resamples(z, groups)
    return sum(r for _, r, _ in per_class) / len(per_class)


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
    - ``sigma2``: sigma_feat^2 = tr(Sigma) / d; ``total_variance``: tr(Sigma) (plug-in, global mean);
    - ``within_fraction``: mean_c R_c^2 / tr(Sigma), the share of the total variance that lies within classes
      (scale-free, in [0, ~1]; about 0 when every class collapses to one point): the scale-free probe, on which
      the GPZ zone rule also runs (R_c^2 itself moves with any rescaling of the features);
    - ``between_within``: (tr(Sigma) - W) / W with W = sum_c (N_c / N) R_c^2 the class-size-weighted within
      part: the between/within variance ratio (scale-free; inf when the classes collapse to points);
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
    n_all = len(labels)
    weighted = sum(rc[c] * int((labels == c).sum()) for c in rc) / n_all
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
        "total_variance": total,
        "within_fraction": mean / total if total > 0 else 0.0,
        "between_within": (total - weighted) / weighted if weighted > 0 else float("inf"),
        "h_feat_bound": feature_entropy_bound(d, sigma2),
        "h_dec_bound": decision_entropy_bound(d, float(vals.max()), k),
    }
