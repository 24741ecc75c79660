"""The attack interface (DESIGN.md section 4) and the shared evaluation on transmitted test features.

Every attack is a class with the same two calls: ``fit(edge, data)`` (learn from the attacker's data,
seeing features exactly as the defended edge sends them) and ``invert(z)`` (reconstruct images in [0, 1]
from transmitted features). ``fit_split``/``eval_split`` choose which images each uses.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..data import DataBundle, ImageSplit
from ..defenses import Edge
from ..metrics import image_metrics
from ..params import NoParams
from ..registry import Registry

ATTACKS: Registry[type["Attack"]] = Registry("attack")


class Attack:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None, device: torch.device | str = "cpu", seed: int = 0,
                 show_progress: bool = True, workdir: str | Path | None = None):
        self.params = params if params is not None else self.Params()
        self.device = torch.device(device)
        self.seed = seed
        self.show_progress = show_progress
        self.workdir = Path(workdir) if workdir else None

    def fit_split(self, data: DataBundle) -> ImageSplit:
        """Images the attacker learns from (default: the aux split, disjoint from train and test)."""
        return data.aux

    def eval_split(self, data: DataBundle) -> ImageSplit:
        """Images whose transmitted features are attacked and scored (default: the test split)."""
        return data.test

    def fit(self, edge: Edge, data: DataBundle) -> dict[str, Any]:
        """Learn the inversion; returns facts about the fit (losses, steps)."""
        return {}

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct [0, 1] images from transmitted features ``z``."""
        raise NotImplementedError

    def checkpoint_path(self) -> Path | None:
        return self.workdir / f"attack_{self.name}.pt" if self.workdir else None


@torch.no_grad()
def transmitted(edge: Edge, data: DataBundle, split: ImageSplit, device: torch.device, seed: int,
                batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features as the edge sends them, the [0, 1] originals) for ``split``; the defense's randomness is
    drawn from ``seed`` so every attack of a run sees the same transmitted features."""
    edge.eval()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        zs, xs = [], []
        for x, _ in data.batches(split, batch_size, device):
            zs.append(edge(x).cpu())
            xs.append(data.denormalize(x).cpu())
    return torch.cat(zs), torch.cat(xs)


@torch.no_grad()
def reconstruct(attack: Attack, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    out = [attack.invert(zb.to(attack.device)).float().cpu() for zb in z.split(batch_size)]
    return torch.cat(out)


def run_attack(attack: Attack, edge: Edge, data: DataBundle, seed: int) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Fit ``attack``, reconstruct its evaluation split; returns (result, originals, reconstructions)."""
    t0 = time.perf_counter()
    info = attack.fit(edge, data)
    fit_s = time.perf_counter() - t0
    z, x01 = transmitted(edge, data, attack.eval_split(data), attack.device, seed)
    t1 = time.perf_counter()
    x_hat = reconstruct(attack, z)
    if not torch.isfinite(x_hat).all():
        raise RuntimeError(f"attack '{attack.name}' produced non-finite reconstructions")
    result = image_metrics(x_hat.clamp(0, 1), x01)
    result.update(fit_seconds=fit_s, invert_seconds=time.perf_counter() - t1, **{f"fit.{k}": v for k, v in info.items()})
    return result, x01, x_hat


def mean_image_baseline(data: DataBundle) -> dict[str, float]:
    """The trivial attacker: predict the mean aux image for every test image."""
    aux01 = data.aux.images.float() / 255.0
    test01 = data.test.images.float() / 255.0
    guess = aux01.mean(0, keepdim=True).expand_as(test01)
    return image_metrics(guess, test01)
