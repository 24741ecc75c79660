"""Representation probes: intra-class mean squared radius R_c^2 and global feature variance (GPZ paper)."""
from __future__ import annotations

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
