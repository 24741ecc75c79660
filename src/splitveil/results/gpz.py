"""Golden Partition Zone analysis (GPZ paper, ``seeds/paper-golden-partition-zone.md``) on the rows of a sweep:
the paper's zone rule on the class-mean R_c^2 profile, its bootstrap interval and the paper's high-fidelity
threshold in splitveil's units. Pure functions of the rows (``GPZRow.to_dict()`` dicts): the sweep that produces
them is ``experiments/gpz.py``, the tables and figures that show them are ``report/gpz.py``."""
from __future__ import annotations

import math
from typing import Any

PAPER_MSE_SUMMED_THRESHOLD = 0.02   # the GPZ paper's "MSE < 0.02 is high fidelity"; its MSE sums over channels
SECOND_ZONE_GAP = 0.2               # the paper code's second-zone rule: an intermediate drop of at least this size
BOOTSTRAP_RESAMPLES = 200           # stratified bootstrap resamples of the probe images (R_c^2 and zone intervals)


def paper_fidelity_threshold(channels: int) -> float:
    """The paper's high-fidelity threshold in splitveil's units (per-element MSE on [0, 1] images): its MSE sums
    over channels (0.021 sits next to 21.5 dB PSNR), so its 0.02 is 0.02 / C per element (0.0067 for RGB)."""
    if channels < 1:
        raise ValueError("channels must be >= 1")
    return PAPER_MSE_SUMMED_THRESHOLD / channels


ZONE_METHOD = (
    "paper (GPZ code's rule): the class-mean R_c^2 at every swept cut; relative drop between consecutive swept "
    "cuts p = (R_prev - R_next) / R_prev; the zone is the first cut after the largest drop. Second zone: the "
    "cut after the second-largest drop is added when some drop strictly between the two is at least "
    "{gap} in magnitude. No zone when no drop is positive. R_c^2 over classes with >= 2 probe images, true "
    "labels (the paper's code uses predicted labels of one batch). Interval: the zone of each of {b} stratified "
    "bootstrap resamples of the probe images."
)


def paper_zone(cuts: list[int], rc2: list[float], gap: float = SECOND_ZONE_GAP) -> dict[str, Any]:
    """The GPZ paper code's zone rule on a profile: ``rc2[i]`` is the class-mean R_c^2 at swept cut ``cuts[i]``.

    Returns ``drops`` (relative drop into each cut after the first), ``zone_cuts`` (one cut, or two with the
    second-zone rule), ``first_drop_cut`` and ``found`` (False when fewer than 2 cuts or no drop is positive)."""
    if len(cuts) != len(rc2):
        raise ValueError("cuts and rc2 differ in length")
    drops = [(rc2[i - 1] - rc2[i]) / rc2[i - 1] if rc2[i - 1] != 0 else 0.0 for i in range(1, len(rc2))]
    out: dict[str, Any] = {"found": False, "drops": drops, "zone_cuts": []}
    if not drops:
        return out
    order = sorted(range(len(drops)), key=lambda i: drops[i], reverse=True)   # stable: ties go to the shallower
    i = order[0]
    out["max_drop"] = drops[i]
    if drops[i] <= 0:
        return out
    zone = [cuts[i + 1]]
    if len(order) > 1:
        j = order[1]
        lo, hi = min(i, j) + 1, max(i, j)
        if any(abs(drops[m]) >= gap for m in range(lo, hi)):
            zone.append(cuts[j + 1])
            out["second_drop"] = drops[j]
    out.update(found=True, zone_cuts=zone, first_drop_cut=cuts[i + 1])
    return out


def percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending list."""
    k = min(len(sorted_vals) - 1, max(0, math.ceil(q / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def detect_zone(rows: list[dict[str, Any]], gap: float = SECOND_ZONE_GAP, channels: int | None = None) -> dict[str, Any]:
    """Locate the transition zone in sweep ``rows`` (each with ``cut``, ``block``, ``rc2_mean`` and optionally
    ``rc2_boot`` (bootstrap resamples of it) and ``mse``) by the paper's rule (see ``paper_zone``).

    With ``rc2_boot`` in every row, ``bootstrap`` gives how often each cut is the (first) zone cut over the
    resamples, the share that agrees with the point estimate and a 95% percentile interval of the zone cut.
    With ``mse`` in every row and ``channels``, ``fidelity`` lists the cuts whose attack MSE is below the paper's
    high-fidelity threshold (``paper_fidelity_threshold``)."""
    rows = sorted(rows, key=lambda r: r["cut"])
    cuts = [r["cut"] for r in rows]
    pz = paper_zone(cuts, [float(r["rc2_mean"]) for r in rows], gap)
    nb = min((len(r["rc2_boot"]) for r in rows), default=0) if rows and all(r.get("rc2_boot") for r in rows) else 0
    out: dict[str, Any] = {"rule": "paper", "second_zone_gap": gap, "found": pz["found"], "drops": pz["drops"],
                           "zone_cuts": pz["zone_cuts"], "method": ZONE_METHOD.format(gap=gap, b=nb or "no")}
    if "max_drop" in pz:
        out["max_drop"] = pz["max_drop"]
    names = {r["cut"]: r["block"] for r in rows}
    if pz["found"]:
        out.update(start_cut=min(pz["zone_cuts"]), end_cut=max(pz["zone_cuts"]), first_drop_cut=pz["first_drop_cut"],
                   zone_blocks=[names[k] for k in pz["zone_cuts"]])
        out.update(start_block=names[out["start_cut"]], end_block=names[out["end_cut"]])
    if nb:
        firsts = []
        for b in range(nb):
            z = paper_zone(cuts, [float(r["rc2_boot"][b]) for r in rows], gap)
            firsts.append(z["first_drop_cut"] if z["found"] else None)
        found = sorted(k for k in firsts if k is not None)
        counts = {str(k): firsts.count(k) for k in sorted(set(found))}
        boot: dict[str, Any] = {"resamples": nb, "found_share": len(found) / nb, "first_cut_counts": counts}
        if found:
            boot["first_cut_ci95"] = [percentile(found, 2.5), percentile(found, 97.5)]
        if pz["found"]:
            boot["agreement"] = firsts.count(pz["first_drop_cut"]) / nb
        out["bootstrap"] = boot
    if channels and rows and all(r.get("mse") is not None for r in rows):
        thr = paper_fidelity_threshold(channels)
        high = [r["cut"] for r in rows if r["mse"] < thr]
        out["fidelity"] = {"threshold_per_element": thr, "paper_threshold_summed": PAPER_MSE_SUMMED_THRESHOLD,
                           "channels": channels, "high_fidelity_cuts": high,
                           "deepest_high_fidelity_cut": max(high) if high else None}
    return out
