"""Reading one run's ``metrics.json`` for reports: the worst case over the attack suite, the run's flags, the
CEM control diagnostics and a short defense description; ``load_results(out)`` as a pandas DataFrame.

Every accessor accepts metrics written before a key existed (old run folders still report):
- ``metrics["worst_case"]`` = ``{"mse": {"attack": name, "value": v}, "psnr": {...}, "ssim": {...}}`` (lowest MSE,
  highest PSNR / SSIM over the attacks); computed from ``metrics["attacks"]`` when absent.
- ``metrics["flags"]``: strings such as ``chance_accuracy`` and ``weak_attack``; ``weak_attack`` is also raised
  by ``metrics["weak_attack"]`` (true) or a non-empty ``metrics["worst_case"]["weak_attacks"]`` (attacks that do
  not beat the mean aux image) and, for runs recorded before any of these, derived from the worst-case MSE
  against ``metrics["baseline"]["mean_image"]["mse"]``.
- ``metrics["cem_diagnostics"]``: ``feature_std``, ``snr`` (std(z) / sigma), ``within_var_over_tau``,
  ``between_within_ratio``; or ``metrics["defense_diagnostics"][<cem defense>]`` with ``std_z``, ``snr``,
  ``within_cluster_var_over_tau``, ``between_within_ratio``; blank when absent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..results.records import IMAGE_METRICS as IMAGE_METRICS_LIST
from ..results.records import METRIC_DIRECTIONS, EdgeCost, RunRecord, finite, flag_text  # noqa: F401  (flag_text re-exported)
from ..results.store import open_store

# the metrics every attack reports (one list, in the results layer)
IMAGE_METRICS = {m: METRIC_DIRECTIONS[m] for m in IMAGE_METRICS_LIST}
DIAGNOSTIC_KEYS = ("feature_std", "snr", "within_var_over_tau", "between_within_ratio")
# the strength parameter(s) that tell two settings of a defense apart, always shown beside its name
KEY_PARAMS = {"gaussian_noise": ("sigma",), "dropout": ("rate",), "nopeek": ("alpha",), "label_smoothing": ("alpha",),
              "patrol": ("amount",), "noise_arl": ("weight",), "topk_prune": ("fraction",), "cem_gmm": ("lambda",),
              "cem_slot_cross": ("lambda",), "cem_gated_pool": ("lambda",)}


_finite = finite


def as_record(metrics: dict[str, Any] | RunRecord) -> RunRecord:
    return metrics if isinstance(metrics, RunRecord) else RunRecord.from_dict(metrics)


def worst_case(metrics: dict[str, Any] | RunRecord, metric: str = "mse") -> tuple[str | None, float | None]:
    """(attack, value) of the strongest attack of a run for ``metric`` (lowest MSE, highest PSNR / SSIM).

    Read from ``metrics["worst_case"][metric]`` when recorded, else computed over ``metrics["attacks"]``."""
    if metric not in IMAGE_METRICS:
        raise ValueError(f"worst case of '{metric}': expected one of {', '.join(IMAGE_METRICS)}")
    return as_record(metrics).worst_metric(metric)


def weak_attacks(metrics: dict[str, Any] | RunRecord) -> list[str]:
    """Attacks of the run that do not beat the mean-aux-image baseline on MSE (recorded in
    ``worst_case.weak_attacks``, else computed from ``attacks`` and ``baseline``)."""
    return as_record(metrics).weak_attacks()


def run_flags(metrics: dict[str, Any] | RunRecord) -> list[str]:
    """The run's flags: ``metrics["flags"]`` plus ``weak_attack`` when any attack of the suite does not beat the
    mean-image baseline (``metrics["weak_attack"]``, ``worst_case.weak_attacks``, or computed for old runs)."""
    return as_record(metrics).run_flags()


# metrics["defense_diagnostics"][<defense>] key -> the report's name
_DIAG_ALIASES = {"std_z": "feature_std", "within_cluster_var_over_tau": "within_var_over_tau"}


def cem_diagnostics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The CEM controls (``feature_std``, ``snr`` = std(z)/sigma, ``within_var_over_tau``, ``between_within_ratio``);
    None for each key a run did not record. Read from ``metrics["cem_diagnostics"]``, else from the first CEM
    defense's entry of ``metrics["defense_diagnostics"]`` (``std_z``, ``within_cluster_var_over_tau`` renamed)."""
    d = metrics.get("cem_diagnostics")
    if not isinstance(d, dict):
        per = metrics.get("defense_diagnostics") or {}
        d = next((v for k, v in per.items() if isinstance(v, dict) and k.startswith("cem")), None) or \
            next((v for v in per.values() if isinstance(v, dict) and "snr" in v), {})
        d = {_DIAG_ALIASES.get(k, k): v for k, v in d.items()}
    return {k: (float(d[k]) if _finite(d.get(k)) else None) for k in DIAGNOSTIC_KEYS}


def defense_params(metrics: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Resolved parameters per defense: ``metrics["defense_info"]`` (written by every run), else the config's
    ``defense`` block."""
    info = metrics.get("defense_info")
    if isinstance(info, dict):
        return {k: dict(v) if isinstance(v, dict) else {} for k, v in info.items()}
    block = dict((config or {}).get("defense") or {})
    names = block.pop("name", None) or []
    names = [names] if isinstance(names, str) else list(names)
    out = {n: {} for n in names if n != "none"}
    for n in out:
        out[n].update({k: v for k, v in block.items() if not isinstance(v, dict)})
        out[n].update(block.get(n) or {})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def defense_description(metrics: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """``gaussian_noise(sigma=0.1)+cem_gmm(lambda=4)``: each defense with its strength parameter, so two noise
    levels never read the same. ``none`` for an undefended run."""
    params = defense_params(metrics, config)
    if not params:
        return str(metrics.get("defense") or "none")
    parts = []
    for name, p in params.items():
        keys = [k for k in KEY_PARAMS.get(name, ()) if k in p or (k == "lambda" and "lambda_" in p)]
        vals = [f"{k}={_fmt(p.get(k, p.get('lambda_')))}" for k in keys]
        parts.append(f"{name}({', '.join(vals)})" if vals else name)
    return "+".join(parts)


def run_summary(row: dict[str, Any]) -> dict[str, Any]:
    """One finished store row -> one flat record: defense, its parameters, seed, accuracy, every attack's
    MSE / PSNR / SSIM, the worst case (value and attack), flags, baseline, CEM diagnostics and edge cost."""
    m = row.get("metrics") or {}
    run = RunRecord.from_dict(m)
    cfg = row.get("config") or {}
    rec: dict[str, Any] = {"run_id": row.get("run_id"), "name": row.get("name"), "status": row.get("status"),
                           "dataset": run.dataset or row.get("dataset"), "model": run.model or row.get("model"),
                           "cut": str(run.cut if run.cut is not None else row.get("cut")),
                           "defense": run.defense or row.get("defense"),
                           "defense_params": json.dumps(defense_params(m, cfg), sort_keys=True),
                           "defense_desc": defense_description(m, cfg), "seed": row.get("seed"),
                           "accuracy": run.accuracy if "accuracy" in m else row.get("accuracy")}
    for name, res in run.attacks.items():
        for k in (*IMAGE_METRICS, "n_images"):
            rec[f"{name}.{k}"] = getattr(res, k)
    worst = run.worst()
    for k in IMAGE_METRICS:
        rec[f"worst.{k}"], rec[f"worst.{k}.attack"] = worst.best(k)[::-1]
    rec["flags"] = flag_text(run.run_flags())
    rec["weak_attacks"] = " ".join(worst.weak_attacks or [])
    base = run.baseline.get("mean_image")
    rec["mean_image.mse"] = base.mse if base else None
    for k, v in cem_diagnostics(m).items():
        rec[f"cem.{k}"] = v
    cost = run.cost or EdgeCost()
    for k in EdgeCost.KEYS:
        rec[k] = getattr(cost, k)
    rec["train_s"] = (run.timings or {}).get("train_s")
    return rec


def load_records(out: str | Path, status: str | None = "finished") -> list[dict[str, Any]]:
    """``run_summary`` of every run of a store (``out``: a runs folder or its ``results.sqlite``)."""
    return [run_summary(r) for r in open_store(out).runs(status)]


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    elif prefix:
        out[prefix] = "+".join(map(str, tree)) if isinstance(tree, list) and all(not isinstance(x, (dict, list)) for x in tree) else tree
    return out


def analysis_record(row: dict[str, Any]) -> dict[str, Any]:
    """``run_summary`` plus what an analysis in pandas needs, as values rather than text: the config flattened into
    columns (``data.train_size``, ``train.epochs``, ``attacks.inverse_network.epochs``, ...), each defense's
    resolved parameters (``defense.gaussian_noise.sigma``, ``defense.cem_gmm.lambda``), ``flags``,
    ``weak_attacks`` and ``unconverged_attacks`` as lists, each attack's std over images (``<attack>.mse_std``)
    and held-out curve (``<attack>.val_curve``), the per-epoch training history (``history``: one dict per epoch,
    and ``history.<key>`` lists such as ``history.test_accuracy``) and the wall time per stage (``time.<stage>_s``,
    cumulative over resumes)."""
    m = row.get("metrics") or {}
    run = RunRecord.from_dict(m)
    rec = run_summary(row)
    cfg = dict(row.get("config") or {})
    defense_block = cfg.pop("defense", None) or {}
    for k, v in _flat(cfg, "").items():
        if k not in ("name", "seed"):
            rec.setdefault(k, v)
    names = defense_block.get("name") if isinstance(defense_block, dict) else None
    rec["defense.name"] = "+".join(names) if isinstance(names, list) else (names or run.defense or "none")
    for name, params in defense_params(m, row.get("config")).items():
        for k, v in params.items():
            if v is None or isinstance(v, (int, float, str, bool)):
                rec[f"defense.{name}.{'lambda' if k == 'lambda_' else k}"] = v
    rec["flags"] = run.run_flags()
    rec["weak_attacks"] = run.weak_attacks()
    rec["unconverged_attacks"] = run.unconverged_attacks()
    for name, res in run.attacks.items():
        for k in IMAGE_METRICS:
            rec[f"{name}.{k}_std"] = getattr(res, f"{k}_std", None)
        rec[f"{name}.val_curve"] = res.val_curve
    history = [dict(e) for e in (run.history or []) if isinstance(e, dict)]
    rec["history"] = history
    for key in dict.fromkeys(k for e in history for k in e if k != "epoch"):
        rec[f"history.{key}"] = [e.get(key) for e in history]
    for k, v in (run.timings or {}).items():
        rec[f"time.{k}"] = v
    return rec


def load_results(out: str | Path, status: str | None = "finished"):
    """Every finished run of a store as a pandas DataFrame, one row per run, ready for analysis: the columns of
    ``run_summary`` (``defense``, ``defense_desc``, ``seed``, ``accuracy``, ``<attack>.mse``, ``worst.mse``,
    ``worst.mse.attack``, ``mean_image.mse``, ``cem.snr``, ``encoder_flops``, ...) plus, from
    ``analysis_record``, the config as columns (``defense.gaussian_noise.sigma``, ``defense.cem_gmm.lambda``,
    ``train.epochs``, ...), ``flags`` / ``weak_attacks`` / ``unconverged_attacks`` as lists, ``<attack>.mse_std``,
    ``<attack>.val_curve``, ``history`` and ``history.<key>`` per epoch, ``time.<stage>_s``.
    ``status=None`` includes unfinished runs."""
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_results needs pandas: pip install pandas "
                          "(or use splitveil.report.results.load_records for a list of dicts)") from e
    return pd.DataFrame([analysis_record(r) for r in open_store(out).runs(status)])
