"""Equal-utility privacy gain (DESIGN.md section 2): how much more reconstruction error a defense point buys
than a reference defense swept over its strength (noise alone by default) *at the same accuracy*.

For one group of runs (same dataset, model, cut and other fixed settings):
1. the reference's points (one per strength value, e.g. per noise sigma) are averaged over seeds first:
   accuracy a_j and MSE m_j (the mean over seeds of each run's privacy MSE, the worst case over the attack
   suite unless an attack is named);
2. the frontier log m_ref(a) is the monotone (non-increasing: more accuracy, less privacy) least-squares fit
   of log m_j against a_j (pool-adjacent-violators, weighted by seeds), linearly interpolated in a between
   the reference's smallest and largest accuracy;
3. a defense point (a, m) gets gain = log(m / m_ref(a)) = log m - log m_ref(a) when a lies in that range,
   and no gain, only a flag (``below`` / ``above`` the range), outside it: the frontier is never
   extrapolated. gain > 0: more private than the reference at equal accuracy.
4. the interval is a percentile bootstrap that resamples, in every replicate, the seeds of every reference
   level and of the point, and within each run its test images: with per-image MSEs recorded
   (``attacks[a]["mse_per_image"]``) the images are resampled; otherwise the run's image-mean MSE is drawn
   from its normal approximation (``mse_std / sqrt(n_images)``) and the accuracy from a binomial over the
   test images; without those, only seeds are resampled. ``ci_method`` names what was done. The frontier is
   refitted in every replicate; replicates whose point falls outside the refitted range are dropped and the
   kept fraction is reported (``ci_kept``); no interval when fewer than half are kept. A reference setting
   scored against its own frontier reuses the replicate's resample of itself (its interval shows how far
   the monotone fit moves it, not two independent draws of the same runs).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..results.records import EXCLUDING_FLAGS
from .results import worst_case

WORST = "worst"


# -- one run's privacy numbers -----------------------------------------------------------------------------

@dataclass
class RunSample:
    """What a bootstrap needs of one run: accuracy, test size and, per attack, the mean MSE and how to resample it."""
    accuracy: float
    n_test: int | None
    attacks: dict[str, dict[str, Any]]     # name -> {"mse", "mse_std", "n", "per_image": np.ndarray | None}
    metric: str = WORST                    # WORST or an attack name

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], metric: str = WORST) -> "RunSample":
        atk = {}
        for name, res in (metrics.get("attacks") or {}).items():
            res = res or {}
            if not isinstance(res.get("mse"), (int, float)) or not math.isfinite(res["mse"]):
                continue
            per = res.get("mse_per_image")
            per = np.asarray(per, dtype=np.float64) if isinstance(per, (list, tuple)) and len(per) else None
            atk[name] = {"mse": float(res["mse"]), "mse_std": res.get("mse_std"), "n": res.get("n_images"),
                         "per_image": per}
        if metric != WORST and metric not in atk:
            raise ValueError(f"attack '{metric}' not recorded in run {metrics.get('run_id', '?')}; "
                             f"recorded: {', '.join(atk) or '(none)'}")
        if metric == WORST and not atk:
            _, v = worst_case(metrics, "mse")   # a run that recorded only the worst case
            if v is not None:
                atk["worst_case"] = {"mse": v, "mse_std": None, "n": None, "per_image": None}
        n_test = (metrics.get("sizes") or {}).get("test")
        return cls(float(metrics["accuracy"]), int(n_test) if n_test else None, atk, metric)

    def _names(self) -> list[str]:
        return list(self.attacks) if self.metric == WORST else [self.metric]

    @property
    def mse(self) -> float:
        return min(self.attacks[a]["mse"] for a in self._names())

    @property
    def method(self) -> str:
        atk = [self.attacks[a] for a in self._names()]
        if all(a["per_image"] is not None for a in atk) and len({len(a["per_image"]) for a in atk}) == 1:
            return "images"
        if all(a["mse_std"] is not None and a["n"] for a in atk):
            return "normal"
        return "none"

    def draw(self, rng: np.random.Generator, images: bool) -> tuple[float, float]:
        """(accuracy, MSE) of this run with its test images resampled (``images``) or as recorded."""
        if not images:
            return self.accuracy, self.mse
        method = self.method
        names = self._names()
        if method == "images":
            n = len(self.attacks[names[0]]["per_image"])
            idx = rng.integers(0, n, n)               # the same images for every attack: one test set
            mse = min(float(self.attacks[a]["per_image"][idx].mean()) for a in names)
        elif method == "normal":
            mse = min(max(1e-12, rng.normal(self.attacks[a]["mse"], self.attacks[a]["mse_std"] / math.sqrt(self.attacks[a]["n"])))
                      for a in names)
        else:
            mse = self.mse
        acc = self.accuracy
        if method != "none" and self.n_test:
            acc = rng.binomial(self.n_test, min(max(self.accuracy, 0.0), 1.0)) / self.n_test
        return float(acc), float(mse)


# -- the frontier --------------------------------------------------------------------------------------------

def _pav_nonincreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-increasing fit of ``y`` (pool adjacent violators)."""
    blocks: list[list[float]] = []     # [mean, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.concatenate([[b[0]] * b[2] for b in blocks])


@dataclass
class Frontier:
    """log m_ref as a non-increasing piecewise-linear function of accuracy on [acc[0], acc[-1]]."""
    acc: np.ndarray
    log_mse: np.ndarray

    @classmethod
    def fit(cls, acc: Sequence[float], mse: Sequence[float], weight: Sequence[float] | None = None) -> "Frontier":
        a = np.asarray(acc, dtype=np.float64)
        y = np.log(np.asarray(mse, dtype=np.float64))
        w = np.ones_like(a) if weight is None else np.asarray(weight, dtype=np.float64)
        order = np.argsort(a, kind="stable")
        a, y, w = a[order], y[order], w[order]
        # equal accuracies are one level (their weighted mean)
        ua, inv = np.unique(a, return_inverse=True)
        wy = np.bincount(inv, weights=w * y)
        ww = np.bincount(inv, weights=w)
        return cls(ua, _pav_nonincreasing(wy / ww, ww))

    @property
    def usable(self) -> bool:
        return len(self.acc) >= 2

    @property
    def range(self) -> tuple[float, float]:
        return float(self.acc[0]), float(self.acc[-1])

    def where(self, a: float) -> str:
        """``inside``, ``below`` or ``above`` the reference's accuracy range (``none`` if it has < 2 levels)."""
        if not self.usable:
            return "none"
        lo, hi = self.range
        return "below" if a < lo else "above" if a > hi else "inside"

    def __call__(self, a: float) -> float | None:
        """log m_ref(a); None outside the accuracy range (never extrapolated)."""
        if self.where(a) != "inside":
            return None
        return float(np.interp(a, self.acc, self.log_mse))


# -- groups of runs -------------------------------------------------------------------------------------------

@dataclass
class Level:
    """One setting (a group of seeds) of a defense."""
    label: str
    runs: list[RunSample]
    key: Any = None

    def mean(self, draws: list[tuple[float, float]] | None = None) -> tuple[float, float]:
        d = draws if draws is not None else [(r.accuracy, r.mse) for r in self.runs]
        return float(np.mean([x[0] for x in d])), float(np.mean([x[1] for x in d]))


def _resample(level: Level, rng: np.random.Generator, images: bool) -> tuple[float, float]:
    idx = rng.integers(0, len(level.runs), len(level.runs))
    return level.mean([level.runs[i].draw(rng, images) for i in idx])


@dataclass
class Gain:
    label: str
    accuracy: float
    mse: float
    where: str                    # inside / below / above / none
    gain: float | None            # log(m / m_ref(a)); None outside the reference range
    ci: tuple[float, float] | None
    ci_kept: float | None         # fraction of bootstrap replicates inside the refitted range
    ci_method: str                # "seeds + images (resampled)", "seeds + images (normal approx.)", "seeds only"
    n: int
    key: Any = None

    @property
    def mse_ratio(self) -> float | None:
        return None if self.gain is None else math.exp(self.gain)


@dataclass
class GainAnalysis:
    reference: str
    frontier: Frontier
    gains: list[Gain]
    band_acc: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_lo: np.ndarray = field(default_factory=lambda: np.zeros(0))      # log MSE, 2.5 percentile
    band_hi: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_boot: int = 0
    reference_levels: list[Level] = field(default_factory=list)

    def for_key(self, key: Any) -> Gain | None:
        return next((g for g in self.gains if g.key == key), None)


def _ci_method(levels: list[Level]) -> str:
    methods = {r.method for lv in levels for r in lv.runs}
    if methods == {"images"}:
        return "seeds + images (resampled)"
    if methods <= {"images", "normal"}:
        return "seeds + images (normal approx.)"
    return "seeds only"


def equal_utility_gains(reference: list[Level], points: list[Level], n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95, band_points: int = 50, images: bool = True) -> GainAnalysis:
    """The gain of every point over the reference frontier, with percentile bootstrap intervals.

    ``reference``: the reference defense's levels (one per strength value, each with its seeds). ``points``:
    the levels to score (the reference's own levels may be included: their gain is 0 up to the monotone
    fit). Deterministic for a given ``seed``."""
    if not reference:
        raise ValueError("equal-utility gain: the reference has no finished runs in this group")
    means = [lv.mean() for lv in reference]
    front = Frontier.fit([m[0] for m in means], [m[1] for m in means], [len(lv.runs) for lv in reference])
    rng = np.random.default_rng(seed)
    boot_fronts: list[Frontier] = []
    boot_pts: list[list[tuple[float, float]]] = [[] for _ in points]
    ref_index = {id(lv): j for j, lv in enumerate(reference)}
    if n_boot > 0 and front.usable:
        for _ in range(n_boot):
            rm = [_resample(lv, rng, images) for lv in reference]
            boot_fronts.append(Frontier.fit([m[0] for m in rm], [m[1] for m in rm], [len(lv.runs) for lv in reference]))
            for k, p in enumerate(points):
                # a reference level scored against its own frontier uses the same resample it was fitted with
                j = ref_index.get(id(p))
                boot_pts[k].append(rm[j] if j is not None else _resample(p, rng, images))
    alpha = (1 - level) / 2
    gains = []
    for k, p in enumerate(points):
        a, m = p.mean()
        ref = front(a)
        where = front.where(a)
        g = None if ref is None else math.log(m) - ref
        ci, kept = None, None
        if g is not None and boot_fronts:
            vals = []
            for f, (ba, bm) in zip(boot_fronts, boot_pts[k]):
                r = f(ba)
                if r is not None:
                    vals.append(math.log(bm) - r)
            kept = len(vals) / len(boot_fronts)
            if kept >= 0.5:
                ci = (float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha)))
        gains.append(Gain(p.label, a, m, where, g, ci, kept, _ci_method(reference + [p]) if images else "seeds only",
                          len(p.runs), p.key))
    band_acc = np.zeros(0)
    lo = hi = np.zeros(0)
    if boot_fronts:
        band_acc = np.linspace(*front.range, band_points)
        cols = []
        for a in band_acc:
            v = [f(a) for f in boot_fronts]
            v = [x for x in v if x is not None]
            cols.append((np.quantile(v, alpha), np.quantile(v, 1 - alpha)) if len(v) >= 0.5 * len(boot_fronts) else (np.nan, np.nan))
        lo, hi = np.array([c[0] for c in cols]), np.array([c[1] for c in cols])
    return GainAnalysis("", front, gains, band_acc, lo, hi, len(boot_fronts), list(reference))


# -- from report groups ------------------------------------------------------------------------------------------

def match_reference(labels: Sequence[str], reference: str) -> str | None:
    """The defense label that ``reference`` names: an exact label (``gaussian_noise``,
    ``gaussian_noise+cem_gmm``), else the one label containing that component (``cem_gmm``)."""
    if reference in labels:
        return reference
    hits = sorted({lab for lab in labels if reference in lab.split("+")})
    return hits[0] if len(hits) == 1 else None


def context_key(group) -> str:
    """Groups that may be compared: same dataset, model, cut and every swept field that is not a defense
    parameter (a defense's strength is what the frontier runs over)."""
    fixed = {k: v for k, v in group.params.items() if not k.startswith("defense.")}
    return json.dumps([group.dataset, group.model, group.cut, fixed], sort_keys=True, default=str)


def level_of(group, metric: str = WORST) -> Level | None:
    """The group's runs that recorded ``metric`` (the worst case: any attack); None when none did. A run flagged
    with one of ``EXCLUDING_FLAGS`` (chance accuracy, an unconverged attack, ...) is left out: its MSE measures no
    defense, so it enters neither a frontier nor a gain."""
    runs = []
    for r in group.runs:
        if any(f in EXCLUDING_FLAGS for f in getattr(r, "flags", None) or []):
            continue
        try:
            s = RunSample.from_metrics(r.metrics, metric)
        except (ValueError, KeyError, TypeError):
            continue
        if s.attacks:
            runs.append(s)
    return Level(group.label, runs, key=id(group)) if runs else None


def analyse_groups(groups: list, reference: str, metric: str = WORST, n_boot: int = 2000,
                   seed: int = 0) -> dict[str, GainAnalysis]:
    """context_key -> the gain analysis of that context's groups against ``reference`` (contexts without a
    reference run are left out). Gains are keyed by ``id(group)``; use ``GainAnalysis.for_key(id(g))``."""
    out: dict[str, GainAnalysis] = {}
    contexts: dict[str, list] = {}
    for g in groups:
        contexts.setdefault(context_key(g), []).append(g)
    for key, gs in contexts.items():
        ref_label = match_reference([g.defense for g in gs], reference)
        if ref_label is None:
            continue
        levels = [(g, level_of(g, metric)) for g in gs]
        pts = [lv for _, lv in levels if lv is not None]
        ref = [lv for g, lv in levels if lv is not None and g.defense == ref_label]
        if not ref:
            continue
        res = equal_utility_gains(ref, pts, n_boot=n_boot, seed=seed)
        res.reference = ref_label
        out[key] = res
    return out
