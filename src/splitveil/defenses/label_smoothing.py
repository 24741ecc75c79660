"""Label smoothing: soft targets (1 - alpha) one-hot + alpha / K, alpha in [-0.1, 0.5].

A negative alpha sharpens the targets beyond one-hot (the GPZ paper's "LS-" control): the true class gets
1 - alpha + alpha / K > 1 and every other class alpha / K < 0; the targets still sum to one."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import require
from .base import DEFENSES, Defense


@dataclass
class LabelSmoothingParams:
    alpha: float = 0.1   # smoothing weight; 0 is plain cross-entropy, negative values sharpen (LS-)

    def validate(self) -> None:
        require(-0.1 <= self.alpha <= 0.5, "alpha", f"must be in [-0.1, 0.5], got {self.alpha}")


def smooth_targets(y: torch.Tensor, num_classes: int, alpha: float, dtype=torch.float32) -> torch.Tensor:
    """(N,) integer labels -> (N, K) targets (1 - alpha) one-hot(y) + alpha / K."""
    onehot = F.one_hot(y, num_classes).to(dtype)
    return (1.0 - alpha) * onehot + alpha / num_classes


@DEFENSES.register("label_smoothing", "soft targets (1 - alpha) one-hot + alpha / K, alpha in [-0.1, 0.5] (param: alpha)")
class LabelSmoothing(Defense):
    Params = LabelSmoothingParams
    changes_targets = True

    def targets(self, y: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        if self.params.alpha == 0:
            return None   # the trainer's plain F.cross_entropy, bit for bit
        return smooth_targets(y, num_classes, self.params.alpha)
