"""Representation probes (GPZ paper): intra-class mean squared radius R_c^2, global feature variance
sigma_feat^2 and the paper's entropy bound terms."""
from __future__ import annotations

import math
from typing import Any

import torch


def intra_class_radius(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """R_c^2 = (1/N_c) sum_{i in c} ||z_i - mu_c||^2 for every class c present (features flattened)."""
    z = features.flatten(1).double()
    out = {}
    for c in torch.unique(labels).tolist():
        zc = z[labels == c]
        out[int(c)] = float(((zc - zc.mean(0)) ** 2).sum(1).mean())
    return out


def mean_intra_class_radius(features: torch.Tensor, labels: torch.Tensor) -> float:
    r = intra_class_radius(features, labels)
    return sum(r.values()) / len(r)


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
      (population std over classes) and maximum;
    - ``sigma2``: sigma_feat^2 = tr(Sigma) / d;
    - ``within_fraction``: mean_c R_c^2 / tr(Sigma), the share of the total variance that lies within classes
      (scale-free, in [0, ~1]; about 0 when every class collapses to one point): what the GPZ detector uses;
    - ``h_feat_bound`` = d/2 ln(2 pi e sigma_feat^2) and ``h_dec_bound`` = D/2 ln(2 pi e max_c R_c^2 / D) + ln K
      (K = ``num_classes``, default: the classes present), in nats.
    """
    rc = intra_class_radius(features, labels)
    vals = torch.tensor(list(rc.values()), dtype=torch.float64)
    d = int(features[0].numel())
    sigma2 = global_variance(features)
    k = int(num_classes) if num_classes else len(rc)
    mean = float(vals.mean())
    total = sigma2 * d
    return {
        "d": d,
        "num_classes": k,
        "rc2_per_class": rc,
        "rc2_mean": mean,
        "rc2_std": float(vals.std(unbiased=False)),
        "rc2_max": float(vals.max()),
        "sigma2": sigma2,
        "within_fraction": mean / total if total > 0 else 0.0,
        "h_feat_bound": feature_entropy_bound(d, sigma2),
        "h_dec_bound": decision_entropy_bound(d, float(vals.max()), k),
    }
