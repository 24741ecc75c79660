"""Typed records of what a run measured, read and written through one place.

A run's ``metrics.json`` (and the ``metrics`` column of the results store) is ``RunRecord.to_dict()``; every
reader goes through ``RunRecord.from_dict``, which accepts metrics written before a key existed (old run
folders still report):

- ``attacks``: attack name -> :class:`AttackResult` (``mse``, ``psnr``, ``ssim`` with their ``_std``, ``n_images``,
  ``fit_seconds``, ``invert_seconds`` and the attack's own ``fit.*`` facts);
- ``baseline``: ``{"mean_image": ImageScores}``, the trivial attacker's scores on the same images;
- ``worst_case``: :class:`WorstCase`, the strongest attack per metric and the attacks that do not beat the
  baseline (computed from ``attacks`` and ``baseline`` for runs recorded before it existed);
- ``flags``: ``chance_accuracy`` (set by the run), ``weak_attack`` and ``unconverged`` (an attack's held-out curve
  still improved by more than 2% over the last fifth of its budget; see :meth:`RunRecord.run_flags`);
- ``cost``: :class:`EdgeCost`.

Keys a record does not know are kept in ``extra`` and written back unchanged.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

log = logging.getLogger("splitveil.results")

# metric -> True when a higher value is a better reconstruction (a stronger attack: the worst case is the max)
METRIC_DIRECTIONS: dict[str, bool] = {"mse": False, "psnr": True, "ssim": True, "ssim_cem": True}
# the metrics every attack reports and every table shows (mean over images; ``<metric>_std`` beside each)
IMAGE_METRICS: tuple[str, ...] = ("mse", "psnr", "ssim")
# what a GPZ row keeps of the attack at its cut
GPZ_ATTACK_KEYS: tuple[str, ...] = ("mse", "mse_std", "psnr", "psnr_std", "ssim", "ssim_std", "fit_seconds",
                                     "worst_attack", "attack_mse",    # these two: only with several attacks
                                     "baseline_mse")                  # the mean-image attacker on the same images
FLAG_TEXT = {"weak_attack": "weak attack", "chance_accuracy": "chance accuracy", "unconverged": "unconverged attack"}
# flags that keep a run out of fronts, frontiers and gains (its privacy number is not a measurement of the defense)
EXCLUDING_FLAGS = frozenset({"chance_accuracy", "unconverged", "diverged"})
# an attack is ``unconverged`` when the last fifth of its budget still lowered its held-out MSE by more than this
UNCONVERGED_TOLERANCE = 0.02
BASELINE = "mean_image"


def finite(v: Any) -> bool:
    """A real number (not a bool, not NaN or infinite)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def still_improving(curve: list[float] | None, tolerance: float = UNCONVERGED_TOLERANCE) -> bool | None:
    """Whether a held-out curve (one MSE per epoch, lower is better) was still improving at the end of its budget:
    the best value of its last fifth (at least one epoch) is more than ``tolerance`` (relative) below the best value
    reached before it. None when the curve has fewer than 2 finite points (convergence cannot be judged)."""
    vals = [float(v) for v in curve or [] if finite(v)]
    n = len(vals)
    if n < 2:
        return None
    k = max(1, -(-n // 5))                 # ceil(n / 5)
    before, last = min(vals[:n - k]), min(vals[n - k:])
    return before > 0 and (before - last) / before > tolerance


def _known(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in ("name", "extra", "fit")]


# -- image scores and attack results ---------------------------------------------------------------------------
@dataclass
class ImageScores:
    """Reconstruction quality over the evaluated images (mean and population std per image, DESIGN.md 2)."""
    mse: float | None = None
    mse_std: float | None = None
    psnr: float | None = None
    psnr_std: float | None = None
    ssim: float | None = None
    ssim_std: float | None = None
    n_images: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. ssim_cem, mse_per_image
    name: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, name: str = "") -> "ImageScores":
        d = dict(d or {})
        kw = {k: d.pop(k) for k in _known(cls) if k in d}
        fit = {k[len("fit."):]: d.pop(k) for k in list(d) if k.startswith("fit.")} if "fit" in _fields(cls) else None
        rec = cls(**kw, extra=d, name=name)
        if fit is not None:
            rec.fit = fit  # type: ignore[attr-defined]
        return rec

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in _known(ImageScores):
            if k == "n_images":
                out.update(self.extra)   # extra image metrics (ssim_cem, ...) before the count, as recorded
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        for k in _known(type(self))[len(_known(ImageScores)):]:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        out.update({f"fit.{k}": v for k, v in getattr(self, "fit", {}).items()})
        return out

    def metric(self, metric: str) -> float | None:
        """The value of ``metric`` (``mse``, ``psnr``, ``ssim``, ``ssim_cem``, ...) as a float; None when absent or
        not finite."""
        v = getattr(self, metric, None) if metric in _known(ImageScores) else self.extra.get(metric)
        return float(v) if finite(v) else None


def _fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass
class AttackResult(ImageScores):
    """One attack's scores on the run's evaluated test images, its timings and what its fit reported."""
    fit_seconds: float | None = None
    invert_seconds: float | None = None
    fit: dict[str, Any] = field(default_factory=dict)     # recorded as ``fit.<key>``

    @property
    def val_curve(self) -> list[float] | None:
        """The held-out MSE after every epoch of the fit (learned attacks), None when not recorded."""
        c = self.fit.get("val_curve")
        return [float(v) for v in c] if isinstance(c, list) else None

    def unconverged(self, tolerance: float = UNCONVERGED_TOLERANCE) -> bool | None:
        """True when the fit was still improving its held-out MSE by more than ``tolerance`` over the last fifth
        of its budget (:func:`still_improving`); None when there is no held-out curve to judge by."""
        return still_improving(self.val_curve, tolerance)


# -- the worst case over an attack suite -------------------------------------------------------------------------
@dataclass
class WorstMetric:
    attack: str | None
    value: float


@dataclass
class WorstCase:
    """The defender's worst case over the attack suite: per metric, the attack with the best reconstruction
    (lowest MSE, highest PSNR / SSIM) and its value; the attacks that do not beat the mean-image baseline on
    MSE (``weak_attacks``: a failed fit must never read as privacy)."""
    metrics: dict[str, WorstMetric] = field(default_factory=dict)
    weak_attacks: list[str] | None = None      # None: not recorded (a run written before it existed)
    beats_baseline: bool | None = None
    baseline_mse: float | None = None

    @classmethod
    def compute(cls, attacks: Mapping[str, AttackResult], baseline_mse: float | None) -> "WorstCase":
        """The worst case of ``attacks`` (ties: the first listed attack); ``weak_attacks`` are those whose MSE is
        not below ``baseline_mse`` (none when there is no baseline; an attack without a finite MSE is left out:
        a run refuses non-finite reconstructions, so only hand-edited records have one)."""
        out = cls()
        for metric, higher in METRIC_DIRECTIONS.items():
            vals = {n: v for n, a in attacks.items() if (v := a.metric(metric)) is not None}
            if vals:
                best = (max if higher else min)(vals, key=lambda n: vals[n])
                out.metrics[metric] = WorstMetric(best, vals[best])
        if finite(baseline_mse):
            base = float(baseline_mse)
            out.weak_attacks = [n for n, a in attacks.items() if finite(a.mse) and a.mse >= base]
            out.beats_baseline = "mse" in out.metrics and out.metrics["mse"].value < base
            out.baseline_mse = base
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "WorstCase":
        d = d or {}
        out = cls(weak_attacks=[str(a) for a in d["weak_attacks"]] if isinstance(d.get("weak_attacks"), list) else None,
                  beats_baseline=d.get("beats_baseline"), baseline_mse=d.get("baseline_mse"))
        for k, v in d.items():
            if isinstance(v, dict) and finite(v.get("value")):
                out.metrics[k] = WorstMetric(v.get("attack"), float(v["value"]))
        return out

    def to_dict(self) -> dict[str, Any]:
        """``{"mse": {"attack": name, "value": v}, "psnr": ..., "ssim": ..., "weak_attacks": [...], "beats_baseline":
        bool, "baseline_mse": v}`` (as metrics.json records it); an empty suite gives ``{}``."""
        out: dict[str, Any] = {k: {"attack": m.attack, "value": m.value} for k, m in self.metrics.items()}
        if self.weak_attacks is not None:
            out["weak_attacks"] = list(self.weak_attacks)
        if self.beats_baseline is not None:
            out["beats_baseline"] = self.beats_baseline
        if self.baseline_mse is not None:
            out["baseline_mse"] = self.baseline_mse
        return out

    def best(self, metric: str) -> tuple[str | None, float | None]:
        m = self.metrics.get(metric)
        return (m.attack, m.value) if m else (None, None)


def worst_case(attacks: Mapping[str, Mapping[str, Any]], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """The worst case of an attack suite as metrics.json records it (see :class:`WorstCase`): ``attacks`` maps
    names to result dicts, ``baseline`` is the mean-image scores. An empty suite gives ``{}``."""
    if not attacks:
        return {}
    recs = {n: AttackResult.from_dict(r, n) for n, r in attacks.items()}
    return WorstCase.compute(recs, float(baseline["mse"])).to_dict()


def weak_attack_warnings(wc: Mapping[str, Any], attacks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A warning line (also logged) for every attack that does not beat the mean-image baseline."""
    lines = [f"weak attack: '{n}' (mse {float(attacks[n]['mse']):.5f}) does not beat the mean-image baseline "
             f"(mse {wc['baseline_mse']:.5f}); its number measures a failed fit, not privacy" for n in wc.get("weak_attacks", [])]
    for line in lines:
        log.warning(line)
    return lines


# -- edge cost ---------------------------------------------------------------------------------------------------
@dataclass
class EdgeCost:
    """What the edge pays per image (DESIGN.md 1, step 6)."""
    encoder_params: int | None = None
    encoder_flops: int | None = None
    latency_ms: float | None = None
    payload_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    KEYS = ("encoder_params", "encoder_flops", "latency_ms", "payload_bytes")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EdgeCost":
        d = dict(d or {})
        return cls(**{k: d.pop(k) for k in cls.KEYS if k in d}, extra=d)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.KEYS if getattr(self, k) is not None}
        out.update(self.extra)
        return out


# -- one run -----------------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """One run's ``metrics.json``: fields in the order the file lists them."""
    run_id: str | None = None
    status: str = "finished"
    dataset: str | None = None
    model: str | None = None
    cut: str | None = None
    cut_index: int | None = None
    feature_shape: list[int] | None = None
    defense: str | None = None
    defense_info: dict[str, dict[str, Any]] | None = None
    defense_diagnostics: dict[str, Any] | None = None
    seed: int | None = None
    accuracy: float | None = None
    flags: list[str] | None = None
    attacks: dict[str, AttackResult] = field(default_factory=dict)
    baseline: dict[str, ImageScores] = field(default_factory=dict)
    worst_case: WorstCase | None = None
    weak_attack: bool | None = None
    warnings: list[str] | None = None
    lpips: dict[str, Any] | None = None
    cost: EdgeCost | None = None
    history: list[dict[str, Any]] | None = None
    sizes: dict[str, int] | None = None
    timings: dict[str, float] | None = None
    versions: dict[str, str] | None = None
    device: str | None = None
    threads: int | None = None
    precision: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # keys this record does not know (newer writers)
    # the keys of the dict a record was read from (None: built by a run): to_dict writes no key the source lacked
    source_keys: frozenset[str] | None = field(default=None, repr=False, compare=False)

    # metrics.json key order: status and run_id first, as the run has always written them
    ORDER = ("status", "run_id")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "RunRecord":
        d = dict(d or {})
        names = [f.name for f in fields(cls) if f.name not in ("extra", "source_keys")]
        kw = {k: d.pop(k) for k in names if k in d}
        present = frozenset(kw)
        kw["attacks"] = {n: AttackResult.from_dict(r, n) for n, r in (kw.get("attacks") or {}).items()}
        kw["baseline"] = {n: ImageScores.from_dict(r, n) for n, r in (kw.get("baseline") or {}).items()}
        if "worst_case" in kw:
            kw["worst_case"] = WorstCase.from_dict(kw["worst_case"])
        if "cost" in kw:
            kw["cost"] = EdgeCost.from_dict(kw["cost"])
        if kw.get("cut") is not None:
            kw["cut"] = str(kw["cut"])
        return cls(**kw, extra=d, source_keys=present)

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json dict (fields left None are not written, nor fields the dict it was read from lacked)."""
        names = list(self.ORDER) + [f.name for f in fields(self)
                                    if f.name not in self.ORDER and f.name not in ("extra", "source_keys")]
        out: dict[str, Any] = {}
        for k in names:
            if self.source_keys is not None and k not in self.source_keys:
                continue
            v = getattr(self, k)
            if k in ("attacks", "baseline"):
                v = {n: r.to_dict() for n, r in v.items()}
            elif k in ("worst_case", "cost") and v is not None:
                v = v.to_dict()
            if v is not None:
                out[k] = v
        out.update(self.extra)
        return out

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def baseline_mse(self) -> float | None:
        b = self.baseline.get(BASELINE)
        return b.metric("mse") if b else None

    def worst(self) -> WorstCase:
        """The recorded worst case, each part it lacks computed from ``attacks`` and ``baseline``."""
        computed = WorstCase.compute(self.attacks, self.baseline_mse)
        rec = self.worst_case
        if rec is None:
            return computed
        return WorstCase(metrics={**computed.metrics, **rec.metrics},
                         weak_attacks=rec.weak_attacks if rec.weak_attacks is not None else computed.weak_attacks,
                         beats_baseline=rec.beats_baseline if rec.beats_baseline is not None else computed.beats_baseline,
                         baseline_mse=rec.baseline_mse if rec.baseline_mse is not None else computed.baseline_mse)

    def worst_metric(self, metric: str = "mse") -> tuple[str | None, float | None]:
        """(attack, value) of the strongest attack for ``metric`` (lowest MSE, highest PSNR / SSIM): the recorded
        one when there is one, else computed over ``attacks``."""
        if metric not in METRIC_DIRECTIONS:
            raise ValueError(f"worst case of '{metric}': expected one of {', '.join(IMAGE_METRICS)}")
        return self.worst().best(metric)

    def weak_attacks(self) -> list[str]:
        """Attacks that do not beat the mean-image baseline on MSE (recorded, else computed)."""
        return list(self.worst().weak_attacks or [])

    def unconverged_attacks(self) -> list[str]:
        """Attacks whose held-out curve was still improving by more than 2% over the last fifth of the budget."""
        return [n for n, a in self.attacks.items() if a.unconverged()]

    def run_flags(self) -> list[str]:
        """``flags`` plus ``weak_attack`` when any attack does not beat the mean-image baseline (recorded in
        ``weak_attack`` / ``worst_case.weak_attacks``, or computed for runs recorded before either)."""
        flags = [str(f) for f in self.flags or [] if isinstance(f, str)]
        if "weak_attack" not in flags and (self.weak_attack is True or self.weak_attacks()):
            flags.append("weak_attack")
        if "unconverged" not in flags and self.unconverged_attacks():
            flags.append("unconverged")
        return flags

    def excluded(self) -> list[str]:
        """The flags that keep this run out of fronts, frontiers and gains (:data:`EXCLUDING_FLAGS`)."""
        return [f for f in self.run_flags() if f in EXCLUDING_FLAGS]

    def attack_value(self, attack: str, metric: str) -> float | None:
        a = self.attacks.get(attack)
        return a.metric(metric) if a else None


def flag_text(flags: list[str]) -> str:
    return ", ".join(FLAG_TEXT.get(f, f.replace("_", " ")) for f in flags)


# -- one row of a GPZ (partition) sweep ----------------------------------------------------------------------
@dataclass
class GPZRow:
    """One swept cut of a GPZ sweep (``rows.json``): the probe of the transmitted representation, the edge's
    share of the cost and, when attacked, the worst case over the attack suite (``GPZ_ATTACK_KEYS``)."""
    cut: int
    block: str
    shape: list[int]
    probe_images: int | None = None
    probe_version: int | None = None
    bootstrap: int | None = None
    rc2_boot: list[float] | None = None
    rc2_ci95: list[float] | None = None
    probe: dict[str, Any] = field(default_factory=dict)    # d, rc2_mean, rc2_std, sigma2, within_fraction, ...
    rc2_per_class: dict[str, float] = field(default_factory=dict)
    edge_params: int | None = None
    edge_params_share: float | None = None
    edge_flops: int | None = None
    edge_flops_share: float | None = None
    payload_bytes: int | None = None
    attack: dict[str, Any] = field(default_factory=dict)   # GPZ_ATTACK_KEYS present

    _HEAD = ("cut", "block", "shape", "probe_images", "probe_version", "bootstrap", "rc2_boot", "rc2_ci95")
    _TAIL = ("rc2_per_class", "edge_params", "edge_params_share", "edge_flops", "edge_flops_share", "payload_bytes")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPZRow":
        d = dict(d)
        head = {k: d.pop(k) for k in cls._HEAD if k in d}
        tail = {k: d.pop(k) for k in cls._TAIL if k in d}
        attack = {k: d.pop(k) for k in GPZ_ATTACK_KEYS if k in d}
        head["cut"] = int(head["cut"])
        return cls(**head, probe=d, **tail, attack=attack)

    def to_dict(self, with_attack: bool = True) -> dict[str, Any]:
        """The rows.json dict (``with_attack=False`` leaves the attack's keys out)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self._HEAD}
        out.update(self.probe)
        out.update({k: getattr(self, k) for k in self._TAIL})
        if with_attack:
            out.update(self.attack)
        return out

    @property
    def attacked(self) -> bool:
        return self.attack.get("mse") is not None
