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
4. the interval (``method="t"``, the default) is a t interval over seeds, built from the estimate's
   linearisation (delta method): the gain is a smooth function of the seed means (accuracy, MSE) of the point
   and of the reference levels its frontier segment uses, so each run's deviation from its level's mean moves the
   gain by the gradient times that deviation. When every level the gain depends on has one run per seed over the
   same seeds (seed s of every arm shares its train / test / attacker split), the deviations are summed per
   seed into n paired per-seed gains and the interval is mean +- t_{n-1} * sd / sqrt(n); otherwise the levels
   are independent samples and the variance is the sum of their parts, with Welch-Satterthwaite degrees of
   freedom. Nothing is resampled, so no replicate falls outside the frontier and none is dropped; a single
   seed gives no interval. Test images: every run of a seed is scored on that seed's test images, so the
   per-seed gains are paired over images too; image sampling is inside the seed-to-seed spread (per-image
   errors are not recorded by runs; ``attacks[a]["mse_per_image"]``, when present, is used only by the
   bootstrap). A 95% t interval with 3 seeds covers a known gain in >= 90% of simulated studies
   (tests/test_report_equal_utility.py); the percentile bootstrap below does not.
5. ``method="bootstrap"`` (the former default, kept for comparison): a percentile bootstrap that resamples, in
   every replicate, the seeds of every reference level and of the point, and within each run its test images:
   with per-image MSEs recorded (``attacks[a]["mse_per_image"]``) the images are resampled; otherwise the run's
   image-mean MSE is drawn from its normal approximation (``mse_std / sqrt(n_images)``) and the accuracy from a
   binomial over the test images; without those, only seeds are resampled. ``ci_method`` names what was done.
   The frontier is refitted in every replicate; replicates whose point falls outside the refitted range are
   dropped and the kept fraction is reported (``ci_kept``); no interval when fewer than half are kept. A
   reference setting scored against its own frontier reuses the replicate's resample of itself. With 3 seeds
   there are only 10 distinct seed resamples and the interval is too narrow (coverage ~80% in the test).
6. every gain inside the range names the accuracy gap it bridges: the width of the frontier segment
   (between two reference levels' mean accuracies) it is interpolated on (``bridge``); a gap wider than
   ``WIDE_SEGMENT`` (5 accuracy points) is flagged (``wide``): the comparison rests on a straight line over a
   long stretch of the frontier.
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
METHODS = ("t", "bootstrap")
WIDE_SEGMENT = 0.05      # a comparison interpolated over a wider frontier segment (in accuracy) is flagged


# -- one run's privacy numbers -----------------------------------------------------------------------------

@dataclass
class RunSample:
    """What a bootstrap needs of one run: accuracy, test size and, per attack, the mean MSE and how to resample it."""
    accuracy: float
    n_test: int | None
    attacks: dict[str, dict[str, Any]]     # name -> {"mse", "mse_std", "n", "per_image": np.ndarray | None}
    metric: str = WORST                    # WORST or an attack name
    seed: int | None = None                # the run's seed (pairs runs of different arms in the t interval)

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
        seed = metrics.get("seed")
        return cls(float(metrics["accuracy"]), int(n_test) if n_test else None, atk, metric,
                   int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None)

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

    def segment(self, a: float) -> tuple[float, float] | None:
        """The accuracies (lo, hi) of the two reference levels between which ``a`` is interpolated (the segment
        of the frontier a comparison at ``a`` bridges); (a, a) on a level; None outside the range."""
        if self.where(a) != "inside":
            return None
        hit = np.flatnonzero(self.acc == a)
        if hit.size:
            return float(a), float(a)
        i = int(np.searchsorted(self.acc, a)) - 1
        return float(self.acc[i]), float(self.acc[i + 1])

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
    ci_kept: float | None         # bootstrap: fraction of replicates inside the refitted range; t: None (none dropped)
    ci_method: str                # t: "t, paired by seed (df 2)" / "t, Welch (df 4.3)"; bootstrap: "seeds + images (...)"
    n: int
    key: Any = None
    se: float | None = None       # t: the standard error of the gain
    df: float | None = None       # t: its degrees of freedom
    bridge: float | None = None   # width (accuracy) of the frontier segment the gain is interpolated on

    @property
    def mse_ratio(self) -> float | None:
        return None if self.gain is None else math.exp(self.gain)

    @property
    def wide(self) -> bool:
        """The comparison bridges a frontier segment wider than WIDE_SEGMENT accuracy points."""
        return self.bridge is not None and self.bridge > WIDE_SEGMENT + 1e-12


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
    method: str = "t"
    level: float = 0.95

    @property
    def interval_note(self) -> str:
        """How the intervals of this analysis were made, for a report's text."""
        pct = f"{self.level:.0%}"
        if self.method == "bootstrap":
            methods = sorted({g.ci_method for g in self.gains})
            return (f"{pct} percentile bootstrap ({self.n_boot} replicates) over {', '.join(methods)}; "
                    f"replicates outside the refitted range are dropped (ci_kept)")
        return (f"{pct} t interval over seeds (delta method; paired by seed where every level involved has the "
                f"same seeds, else Welch), nothing dropped; a comparison bridging a frontier segment wider than "
                f"{WIDE_SEGMENT * 100:.0f} accuracy points is flagged 'wide segment'")

    def for_key(self, key: Any) -> Gain | None:
        return next((g for g in self.gains if g.key == key), None)


def _ci_method(levels: list[Level]) -> str:
    methods = {r.method for lv in levels for r in lv.runs}
    if methods == {"images"}:
        return "seeds + images (resampled)"
    if methods <= {"images", "normal"}:
        return "seeds + images (normal approx.)"
    return "seeds only"


# -- t intervals (delta method over seeds) ----------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, not necessarily integer) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _gradient(fn, acc: np.ndarray, mse: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Numerical gradient of ``fn(acc, mse)`` (central differences, one-sided where a step leaves the frontier's
    range); None when ``fn`` is undefined at the point itself."""
    f0 = fn(acc, mse)
    if f0 is None:
        return None
    grads = []
    for vec, rel in ((acc, False), (mse, True)):
        g = np.zeros_like(vec)
        for i in range(len(vec)):
            h = 1e-6 * abs(vec[i]) if rel else 1e-7
            h = h or 1e-9
            vals = []
            for sgn in (1.0, -1.0):
                v = vec.copy()
                v[i] += sgn * h
                a2, m2 = (acc, v) if rel else (v, mse)
                vals.append(fn(a2, m2))
            if vals[0] is not None and vals[1] is not None:
                g[i] = (vals[0] - vals[1]) / (2 * h)
            elif vals[0] is not None:
                g[i] = (vals[0] - f0) / h
            elif vals[1] is not None:
                g[i] = (f0 - vals[1]) / h
        grads.append(g)
    return grads[0], grads[1]


@dataclass
class TInterval:
    ci: tuple[float, float] | None
    se: float | None
    df: float | None
    how: str


def linearised_interval(levels: list[Level], fn, estimate: float, level: float = 0.95) -> TInterval:
    """A t interval for ``estimate`` = fn(seed-mean accuracies, seed-mean MSEs of ``levels``).

    fn's gradient at the means turns every run's deviation from its level's mean into a deviation of the
    estimate (delta method). Paired by seed when every level that the estimate depends on has one run per seed
    over the same >= 2 seeds: n per-seed contributions, t with n - 1 df. Otherwise independent levels: the
    variance is summed over levels and the df are Welch-Satterthwaite's. No interval when a level the estimate
    depends on has a single run (its spread is unknown)."""
    acc = np.array([lv.mean()[0] for lv in levels], dtype=np.float64)
    mse = np.array([lv.mean()[1] for lv in levels], dtype=np.float64)
    grad = _gradient(fn, acc, mse)
    if grad is None:
        return TInterval(None, None, None, "none")
    ga, gm = grad
    dev: list[np.ndarray] = []      # per involved level: the estimate's deviation contributed by each run
    involved: list[Level] = []
    for k, lv in enumerate(levels):
        if ga[k] == 0.0 and gm[k] == 0.0:
            continue
        a = np.array([r.accuracy for r in lv.runs], dtype=np.float64)
        m = np.array([r.mse for r in lv.runs], dtype=np.float64)
        dev.append(ga[k] * (a - acc[k]) + gm[k] * (m - mse[k]))
        involved.append(lv)
    if not involved:
        return TInterval((estimate, estimate), 0.0, None, "t (no spread)")
    if any(len(lv.runs) < 2 for lv in involved):
        return TInterval(None, None, None, "t: a level with one seed (no spread, no interval)")
    seed_sets = [[r.seed for r in lv.runs] for lv in involved]
    paired = (all(None not in ss and len(set(ss)) == len(ss) for ss in seed_sets)
              and len({frozenset(ss) for ss in seed_sets}) == 1)
    alpha = (1.0 - level) / 2.0
    if paired:
        seeds = sorted(seed_sets[0])
        n = len(seeds)
        psi = np.zeros(n)
        for lv, d in zip(involved, dev):
            pos = {r.seed: i for i, r in enumerate(lv.runs)}
            psi += np.array([d[pos[s]] for s in seeds])
        var = float(np.sum(psi ** 2)) / (n - 1) / n
        df = float(n - 1)
        how = f"t, paired by seed (df {n - 1})"
    else:
        parts = [float(np.var(d, ddof=1)) / len(d) for d in dev]
        var = float(sum(parts))
        denom = sum(v * v / (len(d) - 1) for v, d in zip(parts, dev))
        df = var * var / denom if denom > 0 else float(min(len(d) for d in dev) - 1)
        how = f"t, Welch (df {df:.1f})"
    se = math.sqrt(max(var, 0.0))
    q = t_quantile(1.0 - alpha, df)
    return TInterval((estimate - q * se, estimate + q * se), se, df, how)


def _fit_means(reference: list[Level], acc: np.ndarray, mse: np.ndarray) -> Frontier:
    return Frontier.fit(acc[:len(reference)], mse[:len(reference)], [len(lv.runs) for lv in reference])


def _t_gains(reference: list[Level], points: list[Level], front: Frontier, level: float,
             band_points: int) -> tuple[list[tuple[TInterval, float | None]], np.ndarray, np.ndarray, np.ndarray]:
    ref_index = {id(lv): j for j, lv in enumerate(reference)}
    L = len(reference)
    out = []
    for p in points:
        a, m = p.mean()
        j = ref_index.get(id(p))
        levels = list(reference) if j is not None else list(reference) + [p]
        k = j if j is not None else L

        def fn(acc, mse, k=k):
            r = _fit_means(reference, acc, mse)(float(acc[k]))
            return None if r is None else math.log(mse[k]) - r

        g = fn(np.array([lv.mean()[0] for lv in levels]), np.array([lv.mean()[1] for lv in levels]))
        seg = front.segment(a)
        out.append((linearised_interval(levels, fn, g, level) if g is not None else TInterval(None, None, None, "none"),
                    None if seg is None else seg[1] - seg[0]))
    band_acc = np.zeros(0)
    lo = hi = np.zeros(0)
    if front.usable:
        band_acc = np.linspace(*front.range, band_points)
        cols = []
        for x in band_acc:
            def fref(acc, mse, x=float(x)):
                return _fit_means(reference, acc, mse)(min(max(x, float(acc.min())), float(acc.max())))
            y = front(float(x))
            iv = linearised_interval(list(reference), fref, y, level) if y is not None else None
            cols.append(iv.ci if iv is not None and iv.ci is not None else (np.nan, np.nan))
        lo, hi = np.array([c[0] for c in cols]), np.array([c[1] for c in cols])
    return out, band_acc, lo, hi


def equal_utility_gains(reference: list[Level], points: list[Level], n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95, band_points: int = 50, images: bool = True,
                        method: str = "t") -> GainAnalysis:
    """The gain of every point over the reference frontier, with intervals: ``method="t"`` (default) t intervals
    over seeds (module doc, 4), ``"bootstrap"`` the percentile bootstrap (5; ``n_boot``, ``seed``, ``images``).

    ``reference``: the reference defense's levels (one per strength value, each with its seeds). ``points``:
    the levels to score (the reference's own levels may be included: their gain is 0 up to the monotone
    fit). Deterministic."""
    if not reference:
        raise ValueError("equal-utility gain: the reference has no finished runs in this group")
    if method not in METHODS:
        raise ValueError(f"equal-utility gain: unknown interval method {method!r}; choose one of {', '.join(METHODS)}")
    means = [lv.mean() for lv in reference]
    front = Frontier.fit([m[0] for m in means], [m[1] for m in means], [len(lv.runs) for lv in reference])
    if method == "t":
        tiv, band_acc, lo, hi = _t_gains(reference, points, front, level, band_points)
        gains = []
        for p, (iv, bridge) in zip(points, tiv):
            a, m = p.mean()
            ref = front(a)
            g = None if ref is None else math.log(m) - ref
            gains.append(Gain(p.label, a, m, front.where(a), g, iv.ci if g is not None else None, None,
                              iv.how if g is not None else "none", len(p.runs), p.key, iv.se, iv.df, bridge))
        return GainAnalysis("", front, gains, band_acc, lo, hi, 0, list(reference), "t", level)
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
        seg = front.segment(a)
        gains.append(Gain(p.label, a, m, where, g, ci, kept, _ci_method(reference + [p]) if images else "seeds only",
                          len(p.runs), p.key, bridge=None if seg is None else seg[1] - seg[0]))
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
    return GainAnalysis("", front, gains, band_acc, lo, hi, len(boot_fronts), list(reference), "bootstrap", level)


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
                   seed: int = 0, method: str = "t") -> dict[str, GainAnalysis]:
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
        res = equal_utility_gains(ref, pts, n_boot=n_boot, seed=seed, method=method)
        res.reference = ref_label
        out[key] = res
    return out
