"""The attack interface (docs/attacks.md) and the shared evaluation on transmitted test features.

Every attack is a class with the same two calls: ``fit(edge, data)`` (learn from the attacker's data,
seeing features exactly as the defended edge sends them) and ``invert(z)`` (reconstruct images in [0, 1]
from transmitted features). ``fit_split``/``eval_split`` choose which images each uses.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..data import DataBundle, ImageSplit
from ..defenses import Edge
from ..metrics import image_metrics
from ..params import NoParams, params_from
from ..registry import Registry
# the worst case over a suite and the weak-attack warnings live in the results layer (re-exported here)
from ..results.records import METRIC_DIRECTIONS, still_improving, weak_attack_warnings, worst_case  # noqa: F401

ATTACKS: Registry[type["Attack"]] = Registry("attack")
log = logging.getLogger("splitveil.attacks")


def inference_split(n: int, fit_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference-time mode: a seeded split of ``n`` test positions into (fit, eval) positions, both sorted.
    The same (n, fit_fraction, seed) always gives the same split."""
    k = min(n - 1, max(1, round(fit_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values, perm[k:].sort().values


class Attack:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams

    def __init__(self, params: Any = None, device: torch.device | str = "cpu", seed: int = 0,
                 show_progress: bool = True, workdir: str | Path | None = None, **param_values: Any):
        """``params``: a ``Params`` object, a mapping, or None (defaults); or the parameters as keywords
        (``InverseNetworkAttack(epochs=2)``, ``ATTACKS.get("inverse_network")(epochs=2)``): validated either
        way, a bad one named. ``create_attack(name, **params)`` is the factory by registry name."""
        self.params = params_from(type(self), params, param_values, f"attacks.{self.name}", "create_attack")
        self.device = torch.device(device)
        self.seed = seed
        self.show_progress = show_progress
        self.workdir = Path(workdir) if workdir else None
        # the run's shared inference-time split of the test positions, (fit, eval); set by ``share_split``
        self.test_split: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def inference_time(self) -> bool:
        return getattr(self.params, "mode", "training-time") == "inference-time"

    def fit_split(self, data: DataBundle) -> ImageSplit:
        """Images the attacker learns from (default: the aux split, disjoint from train and test)."""
        return data.aux

    def eval_split(self, data: DataBundle) -> ImageSplit:
        """Images whose transmitted features are attacked and scored: the evaluated part of the run's shared
        split when there is one (every attack of a run is scored on the same images), else the test split."""
        if self.test_split is not None:
            return data.test.subset(self.test_split[1])
        return data.test

    def fit(self, edge: Edge, data: DataBundle) -> dict[str, Any]:
        """Learn the inversion; returns facts about the fit (losses, steps)."""
        return {}

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct [0, 1] images from transmitted features ``z``."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """Facts known only after inverting (e.g. a weight chosen on the attacked features), recorded as fit.*"""
        return {}

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
    """The Python API's attack: fit ``attack``, reconstruct its evaluation split and score it; returns
    (result, originals, reconstructions). ``result`` has what a run records for the attack (mse / psnr / ssim
    with their std, ``n_images``, ``fit_seconds``, ``invert_seconds``, ``fit.*``) and, as ``splitveil run``
    reports them, what keeps a number from being misread:

    - ``baseline_mse``: the trivial attacker (the mean of the attacker's images) on the same evaluated images;
    - ``weak_attack``: True when the attack does not beat it (its MSE is a failed fit, not privacy);
    - ``unconverged``: True when the fit still lowered its held-out MSE by more than 2% over the last fifth of
      its budget (give it more epochs), None when the attack records no held-out curve (rmle).

    A weak or unconverged attack is also logged as a warning."""
    result, x01, x_hat = fit_and_score(attack, edge, data, seed)
    base = mean_image_baseline(data, attack.eval_split(data), attack.fit_split(data))["mse"]
    curve = result.get("fit.val_curve")
    result["baseline_mse"] = float(base)
    result["weak_attack"] = bool(result["mse"] >= base)
    result["unconverged"] = still_improving([float(v) for v in curve] if isinstance(curve, list) else None)
    if result["weak_attack"]:
        log.warning("attack %s does not beat the mean-image baseline (mse %.5f >= %.5f): its number measures a "
                    "failed fit, not privacy", attack.name, result["mse"], base)
    if result["unconverged"]:
        log.warning("attack %s is unconverged: its held-out MSE still fell by more than 2%% over the last fifth of "
                    "its budget; give it more epochs", attack.name)
    return result, x01, x_hat


def fit_and_score(attack: Attack, edge: Edge, data: DataBundle, seed: int) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Fit ``attack``, reconstruct its evaluation split; returns (result, originals, reconstructions): the scores,
    timings and ``fit.*`` facts a run records per attack (the run adds the baseline and flags over the suite)."""
    t0 = time.perf_counter()
    info = attack.fit(edge, data)
    fit_s = time.perf_counter() - t0
    z, x01 = transmitted(edge, data, attack.eval_split(data), attack.device, seed)
    t1 = time.perf_counter()
    x_hat = reconstruct(attack, z)
    if not torch.isfinite(x_hat).all():
        raise RuntimeError(f"attack '{attack.name}' produced non-finite reconstructions")
    result = image_metrics(x_hat.clamp(0, 1), x01)
    info.update(attack.report())
    result.update(fit_seconds=fit_s, invert_seconds=time.perf_counter() - t1, **{f"fit.{k}": v for k, v in info.items()})
    return result, x01, x_hat


def share_split(attacks: list[Attack], data: DataBundle, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One split of the test images per run, seeded by the run ``seed`` and shared by every attack.

    When any attack runs in inference-time mode, the test positions are split once into (fit, eval) with its
    ``fit_fraction`` (inference-time attacks of one run must agree on it); every attack of the run, training-time
    ones included, is then scored on the same eval positions. Returns the split, or None when every attack is
    training-time (then all are scored on the whole test split)."""
    inf = [a for a in attacks if a.inference_time]
    if not inf:
        return None
    fractions = {float(a.params.fit_fraction) for a in inf}
    if len(fractions) > 1:
        from ..params import ConfigError
        names = ", ".join(f"{a.name}={a.params.fit_fraction}" for a in inf)
        raise ConfigError(f"attacks.<name>.fit_fraction: inference-time attacks of one run share one split of the test "
                          f"images and must use the same fit_fraction (got {names})")
    split = inference_split(len(data.test), fractions.pop(), seed)
    for a in attacks:
        a.test_split = split
    return split


def mean_image_baseline(data: DataBundle, eval_split: ImageSplit | None = None,
                        guess_split: ImageSplit | None = None) -> dict[str, float]:
    """The trivial attacker: predict the mean image of the attacker's data (``guess_split``, default the aux
    split) for every evaluated image (``eval_split``, default the test split): use the attacks' own splits so
    that the baseline is scored on the same images as they are."""
    guess01 = (guess_split or data.aux).images.float() / 255.0
    eval01 = (eval_split or data.test).images.float() / 255.0
    guess = guess01.mean(0, keepdim=True).expand_as(eval01)
    return image_metrics(guess, eval01)
