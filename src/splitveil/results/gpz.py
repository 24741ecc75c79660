"""Golden Partition Zone analysis (GPZ paper, ``seeds/paper-golden-partition-zone.md``) on the rows of a sweep:
the paper's zone rule on the class-mean R_c^2 profile and, beside it, on the scale-free within-class fraction
R_c^2 / tr(Sigma), their bootstrap intervals, the zone by MSE (the fraction of the way from a perfect
reconstruction to the mean-image baseline), the label-smoothing reading, and the paper's high-fidelity
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
    "bootstrap resamples of the probe images. Beside it, the same rule on the scale-free within-class fraction "
    "mean_c R_c^2 / tr(Sigma) (R_c^2 moves with any rescaling of the features, which an inverse network undoes; "
    "the fraction does not), with its own bootstrap; and the zone by MSE: the cut after the largest jump of "
    "MSE / mean-image-baseline MSE between consecutive attacked cuts."
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


# -- the zone on any probe profile, and the zone by MSE ------------------------------------------------------------
# the profiles the zone rule runs on: key in a row, key of its bootstrap resamples, name in tables and text
PROFILES: dict[str, tuple[str, str, str]] = {
    "raw": ("rc2_mean", "rc2_boot", "R_c^2"),
    "scale_free": ("within_fraction", "frac_boot", "within-class fraction R_c^2/tr(Sigma)"),
}
MSE_CEILING = 0.7   # "below the ceiling": attack MSE under this share of the mean-image baseline's MSE


def rule_zone(rows: list[dict[str, Any]], key: str, boot_key: str | None = None,
              gap: float = SECOND_ZONE_GAP) -> dict[str, Any]:
    """The paper's rule (``paper_zone``) on the profile ``row[key]`` over ``rows`` (sorted by cut), with the block
    names of the zone cuts and, when every row holds resamples under ``boot_key``, the bootstrap: how often
    each cut is the (first) zone cut, the share agreeing with the point estimate and a 95% interval."""
    rows = sorted(rows, key=lambda r: r["cut"])
    cuts = [r["cut"] for r in rows]
    pz = paper_zone(cuts, [float(r[key]) for r in rows], gap)
    out: dict[str, Any] = {"profile": key, "found": pz["found"], "drops": pz["drops"], "zone_cuts": pz["zone_cuts"]}
    if "max_drop" in pz:
        out["max_drop"] = pz["max_drop"]
    names = {r["cut"]: r["block"] for r in rows}
    if pz["found"]:
        out.update(start_cut=min(pz["zone_cuts"]), end_cut=max(pz["zone_cuts"]), first_drop_cut=pz["first_drop_cut"],
                   zone_blocks=[names[k] for k in pz["zone_cuts"]])
        out.update(start_block=names[out["start_cut"]], end_block=names[out["end_cut"]])
    nb = min(len(r[boot_key]) for r in rows) if boot_key and rows and all(r.get(boot_key) for r in rows) else 0
    if nb:
        firsts = []
        for b in range(nb):
            z = paper_zone(cuts, [float(r[boot_key][b]) for r in rows], gap)
            firsts.append(z["first_drop_cut"] if z["found"] else None)
        found = sorted(k for k in firsts if k is not None)
        boot: dict[str, Any] = {"resamples": nb, "found_share": len(found) / nb,
                                "first_cut_counts": {str(k): firsts.count(k) for k in sorted(set(found))}}
        if found:
            boot["first_cut_ci95"] = [percentile(found, 2.5), percentile(found, 97.5)]
        if pz["found"]:
            boot["agreement"] = firsts.count(pz["first_drop_cut"]) / nb
        out["bootstrap"] = boot
    return out


def mse_fraction(row: dict[str, Any]) -> float | None:
    """The fraction of the way from a perfect reconstruction (MSE 0) to the mean-image baseline (the attacker
    that outputs the mean image of its data): MSE / baseline MSE. None without both numbers."""
    m, b = row.get("mse"), row.get("baseline_mse")
    if m is None or not b:
        return None
    return float(m) / float(b)


def mse_zone(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The zone by MSE: over the attacked cuts that hold a baseline (sorted), the fraction MSE / baseline MSE and
    its jump between consecutive attacked cuts; the zone is the cut after the largest jump (``found`` False with
    fewer than 2 such cuts or no rising jump). ``localised`` says whether the two cuts of that jump are adjacent
    (with gaps in the attacked cuts, the jump can have happened at any cut in between)."""
    att = sorted((r for r in rows if mse_fraction(r) is not None), key=lambda r: r["cut"])
    cuts = [r["cut"] for r in att]
    fr = [mse_fraction(r) for r in att]
    jumps = [fr[i] - fr[i - 1] for i in range(1, len(fr))]
    out: dict[str, Any] = {"cuts": cuts, "fractions": fr, "jumps": jumps, "found": False, "ceiling": MSE_CEILING,
                           "below_ceiling": [k for k, f in zip(cuts, fr) if f < MSE_CEILING]}
    if not jumps:
        return out
    i = max(range(len(jumps)), key=lambda j: jumps[j])       # ties go to the shallower
    if jumps[i] <= 0:
        return out
    out.update(found=True, zone_cut=cuts[i + 1], from_cut=cuts[i], max_jump=jumps[i],
               localised=cuts[i + 1] - cuts[i] == 1, zone_block=att[i + 1]["block"])
    return out


def rule_check(rule: dict[str, Any], mz: dict[str, Any]) -> dict[str, Any]:
    """Does the MSE localise a rule's zone? For the rule's (first) zone cut z: the MSE fraction just before and at
    z when both z - 1 and z were attacked, the jump into z, its rank among the jumps between consecutive attacked
    cuts, and ``matches_mse`` (z is the zone by MSE). None entries where the cuts were not attacked."""
    out: dict[str, Any] = {"zone_cut": rule.get("first_drop_cut"), "matches_mse": None}
    z = out["zone_cut"]
    if z is None or not mz.get("cuts"):
        return out
    frac = dict(zip(mz["cuts"], mz["fractions"]))
    out["fraction_at"] = frac.get(z)
    out["fraction_before"] = frac.get(z - 1)
    if z in frac and z - 1 in frac:
        jump = frac[z] - frac[z - 1]
        out["jump"] = jump
        out["jump_rank"] = 1 + sum(1 for j in mz["jumps"] if j > jump)
    if mz.get("found"):
        out["matches_mse"] = z == mz["zone_cut"]
    return out


def disagreement(rows: list[dict[str, Any]], raw: dict[str, Any], free: dict[str, Any]) -> str | None:
    """One line on what it means when the raw and the scale-free rule put the zone at different cuts (None when
    they agree)."""
    a, b = raw.get("first_drop_cut"), free.get("first_drop_cut")
    if a == b:
        return None
    by = {r["cut"]: r for r in rows}
    cuts = sorted(by)
    if a is None:
        return (f"R_c^2 never drops, but the within-class fraction drops most into cut {b}: classes contract "
                "relative to the total spread while the features grow")
    prev = cuts[cuts.index(a) - 1]
    tot = lambda r: r.get("total_variance", r["sigma2"] * r["d"])   # noqa: E731
    t_drop = 1 - tot(by[a]) / tot(by[prev]) if tot(by[prev]) else float("nan")
    f_drop = 1 - by[a]["within_fraction"] / by[prev]["within_fraction"] if by[prev]["within_fraction"] else float("nan")
    where = f"cut {b}" if b is not None else "no cut (it never drops)"
    return (f"R_c^2 drops most into cut {a} ({raw['max_drop']:.0%}) where tr(Sigma) falls {t_drop:.0%} and the "
            f"within-class fraction only {f_drop:.0%}: the raw rule there follows the features shrinking, which an "
            f"inverse network undoes; the scale-free rule puts the class contraction at {where}")


def detect_zone(rows: list[dict[str, Any]], gap: float = SECOND_ZONE_GAP, channels: int | None = None) -> dict[str, Any]:
    """Locate the transition zone in sweep ``rows`` (each with ``cut``, ``block``, ``rc2_mean``, optionally
    ``rc2_boot`` (bootstrap resamples of it), ``within_fraction`` / ``frac_boot``, ``mse`` and ``baseline_mse``).

    The top-level keys are the paper's rule on R_c^2 (``rule`` "paper", ``zone_cuts``, ``bootstrap``, ...: see
    ``paper_zone``). Beside it: ``scale_free``, the same rule on the within-class fraction (``rule_zone``);
    ``mse``, the zone by MSE over the attacked cuts that hold a baseline (``mse_zone``); ``checks``, whether the
    MSE localises each rule's zone (``rule_check``); ``disagreement``, one line when the two rules differ.
    With ``mse`` in every row and ``channels``, ``fidelity`` lists the cuts whose attack MSE is below the paper's
    high-fidelity threshold (``paper_fidelity_threshold``)."""
    rows = sorted(rows, key=lambda r: r["cut"])
    raw = rule_zone(rows, "rc2_mean", "rc2_boot", gap)
    nb = raw.get("bootstrap", {}).get("resamples", 0)
    out: dict[str, Any] = {"rule": "paper", "second_zone_gap": gap, "method": ZONE_METHOD.format(gap=gap, b=nb or "no"),
                           **{k: v for k, v in raw.items() if k != "profile"}}
    if rows and all(r.get("within_fraction") is not None for r in rows):
        free = rule_zone(rows, "within_fraction", "frac_boot", gap)
        out["scale_free"] = free
        out["disagreement"] = disagreement(rows, raw, free)
    mz = mse_zone(rows)
    out["mse"] = mz
    out["checks"] = {"raw": rule_check(raw, mz)}
    if "scale_free" in out:
        out["checks"]["scale_free"] = rule_check(out["scale_free"], mz)
    if channels and rows and all(r.get("mse") is not None for r in rows):
        thr = paper_fidelity_threshold(channels)
        high = [r["cut"] for r in rows if r["mse"] < thr]
        out["fidelity"] = {"threshold_per_element": thr, "paper_threshold_summed": PAPER_MSE_SUMMED_THRESHOLD,
                           "channels": channels, "high_fidelity_cuts": high,
                           "deepest_high_fidelity_cut": max(high) if high else None}
    return out


# -- statistics over seeds, and the label-smoothing reading ------------------------------------------------------
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(dof: float) -> float:
    """The 97.5% quantile of Student's t at ``dof`` degrees of freedom (table, rounded down to a listed dof: a
    conservative interval; 1.96 beyond 30)."""
    if dof >= 31:
        return 1.96
    k = max([d for d in T975 if d <= max(1, int(dof))])
    return T975[k]


def mean_ci(xs: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and the half-width of the 95% t interval of the mean (nan for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, sd, t975(n - 1) * sd / math.sqrt(n)


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Difference of means b - a and its Welch 95% interval (t quantile at the Welch degrees of freedom).
    Needs 2 or more values on each side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("welch: need at least 2 values on each side")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return mb - ma, mb - ma, mb - ma
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = t975(dof)
    return mb - ma, mb - ma - t * se, mb - ma + t * se


def _verdict(lo: float, hi: float) -> str:
    return "higher" if lo > 0 else "lower" if hi < 0 else "within seed spread"


def label_smoothing_reading(seeds_rows: dict[str, list[list[dict[str, Any]]]], base: str = "onehot",
                            ceiling: float = MSE_CEILING) -> dict[str, Any]:
    """Re-read a label-form comparison on the scale-free probe. ``seeds_rows``: label form -> one row list per
    seed (rows with ``cut``, ``rc2_mean``, ``within_fraction``, ``sigma2`` / ``d`` or ``total_variance``,
    optionally ``mse`` / ``baseline_mse``). For every other form against ``base``, per cut: the ratio of the
    seed means of R_c^2 and of tr(Sigma), and the difference of the within-class fraction with a Welch 95%
    interval over seeds; per attacked cut below the MSE ceiling (MSE under ``ceiling`` x the baseline in the
    seed mean of both forms) the MSE difference with its interval. The verdict, at the deepest cut: the form
    **contracts the classes** when both R_c^2 and the within-class fraction are lower beyond the seed spread,
    **only rescales** when R_c^2 is lower and the fraction is not; **does not shrink R_c^2** otherwise."""
    if base not in seeds_rows:
        raise ValueError(f"label_smoothing_reading: no '{base}' form to compare against")
    tot = lambda r: r.get("total_variance", r["sigma2"] * r["d"])   # noqa: E731

    def by_cut(form):
        out: dict[int, dict[str, list[float]]] = {}
        for rows in seeds_rows[form]:
            for r in rows:
                c = out.setdefault(r["cut"], {"rc2": [], "tr": [], "frac": [], "mse": [], "mfrac": []})
                c["rc2"].append(float(r["rc2_mean"]))
                c["tr"].append(float(tot(r)))
                c["frac"].append(float(r["within_fraction"]))
                if mse_fraction(r) is not None:
                    c["mse"].append(float(r["mse"]))
                    c["mfrac"].append(mse_fraction(r))
        return out

    b = by_cut(base)
    res: dict[str, Any] = {"base": base, "ceiling": ceiling, "forms": {}}
    for form in seeds_rows:
        if form == base:
            continue
        f = by_cut(form)
        per_cut = []
        for cut in sorted(set(b) & set(f)):
            x, y = b[cut], f[cut]
            mean = lambda v: sum(v) / len(v)   # noqa: E731
            row: dict[str, Any] = {"cut": cut, "rc2_ratio": mean(y["rc2"]) / mean(x["rc2"]),
                                   "tr_ratio": mean(y["tr"]) / mean(x["tr"]),
                                   "frac_base": mean(x["frac"]), "frac_form": mean(y["frac"])}
            if len(x["rc2"]) > 1 and len(y["rc2"]) > 1:
                row["rc2_diff"] = welch(x["rc2"], y["rc2"])
                row["frac_diff"] = welch(x["frac"], y["frac"])
            if len(x["mse"]) == len(x["rc2"]) and len(y["mse"]) == len(y["rc2"]) and x["mse"]:
                row["mfrac_base"], row["mfrac_form"] = mean(x["mfrac"]), mean(y["mfrac"])
                row["below_ceiling"] = row["mfrac_base"] < ceiling and row["mfrac_form"] < ceiling
                if len(x["mse"]) > 1 and len(y["mse"]) > 1:
                    row["mse_diff"] = welch(x["mse"], y["mse"])
            per_cut.append(row)
        deep = per_cut[-1] if per_cut else None
        verdict = None
        if deep and "rc2_diff" in deep:
            rc_lower = deep["rc2_diff"][2] < 0
            fr_lower = deep["frac_diff"][2] < 0
            verdict = ("contracts the classes" if rc_lower and fr_lower else
                       "only rescales" if rc_lower else "does not shrink R_c^2")
        sub = [r for r in per_cut if r.get("below_ceiling") and "mse_diff" in r]
        res["forms"][form] = {"per_cut": per_cut, "deepest_cut": deep["cut"] if deep else None, "verdict": verdict,
                              "below_ceiling_mse": [{"cut": r["cut"], "diff": r["mse_diff"],
                                                     "verdict": _verdict(r["mse_diff"][1], r["mse_diff"][2])}
                                                    for r in sub]}
    return res
