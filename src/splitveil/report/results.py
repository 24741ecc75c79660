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
import math
from pathlib import Path
from typing import Any

# metric -> True when a higher value means a better reconstruction (a stronger attack)
IMAGE_METRICS = {"mse": False, "psnr": True, "ssim": True}
DIAGNOSTIC_KEYS = ("feature_std", "snr", "within_var_over_tau", "between_within_ratio")
FLAG_TEXT = {"weak_attack": "weak attack", "chance_accuracy": "chance accuracy"}
# the strength parameter(s) that tell two settings of a defense apart, always shown beside its name
KEY_PARAMS = {"gaussian_noise": ("sigma",), "dropout": ("rate",), "nopeek": ("alpha",), "label_smoothing": ("alpha",),
              "patrol": ("amount",), "noise_arl": ("weight",), "topk_prune": ("fraction",), "cem_gmm": ("lambda",),
              "cem_slot_cross": ("lambda",), "cem_gated_pool": ("lambda",)}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def worst_case(metrics: dict[str, Any], metric: str = "mse") -> tuple[str | None, float | None]:
    """(attack, value) of the strongest attack of a run for ``metric`` (lowest MSE, highest PSNR / SSIM).

    Read from ``metrics["worst_case"][metric]`` when recorded, else computed over ``metrics["attacks"]``."""
    if metric not in IMAGE_METRICS:
        raise ValueError(f"worst case of '{metric}': expected one of {', '.join(IMAGE_METRICS)}")
    rec = (metrics.get("worst_case") or {}).get(metric)
    if isinstance(rec, dict) and _finite(rec.get("value")):
        return rec.get("attack"), float(rec["value"])
    best: tuple[str | None, float | None] = (None, None)
    higher = IMAGE_METRICS[metric]
    for name, res in (metrics.get("attacks") or {}).items():
        v = (res or {}).get(metric)
        if not _finite(v):
            continue
        if best[1] is None or (v > best[1] if higher else v < best[1]):
            best = (name, float(v))
    return best


def weak_attacks(metrics: dict[str, Any]) -> list[str]:
    """Attacks of the run that do not beat the mean-aux-image baseline on MSE (recorded in
    ``worst_case.weak_attacks``, else computed from ``attacks`` and ``baseline``)."""
    wc = metrics.get("worst_case") or {}
    if isinstance(wc.get("weak_attacks"), list):
        return [str(a) for a in wc["weak_attacks"]]
    base = ((metrics.get("baseline") or {}).get("mean_image") or {}).get("mse")
    if not _finite(base):
        return []
    return [n for n, r in (metrics.get("attacks") or {}).items() if _finite((r or {}).get("mse")) and r["mse"] >= base]


def run_flags(metrics: dict[str, Any]) -> list[str]:
    """The run's flags: ``metrics["flags"]`` plus ``weak_attack`` when any attack of the suite does not beat the
    mean-image baseline (``metrics["weak_attack"]``, ``worst_case.weak_attacks``, or computed for old runs)."""
    flags = [str(f) for f in metrics.get("flags") or [] if isinstance(f, str)]
    if "weak_attack" not in flags and (metrics.get("weak_attack") is True or weak_attacks(metrics)):
        flags.append("weak_attack")
    return flags


def flag_text(flags: list[str]) -> str:
    return ", ".join(FLAG_TEXT.get(f, f.replace("_", " ")) for f in flags)


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
    cfg = row.get("config") or {}
    rec: dict[str, Any] = {"run_id": row.get("run_id"), "name": row.get("name"), "status": row.get("status"),
                           "dataset": m.get("dataset", row.get("dataset")), "model": m.get("model", row.get("model")),
                           "cut": str(m.get("cut", row.get("cut"))), "defense": m.get("defense", row.get("defense")),
                           "defense_params": json.dumps(defense_params(m, cfg), sort_keys=True),
                           "defense_desc": defense_description(m, cfg), "seed": row.get("seed"),
                           "accuracy": m.get("accuracy", row.get("accuracy"))}
    for name, res in (m.get("attacks") or {}).items():
        for k in ("mse", "psnr", "ssim", "n_images"):
            rec[f"{name}.{k}"] = (res or {}).get(k)
    for k in IMAGE_METRICS:
        a, v = worst_case(m, k)
        rec[f"worst.{k}"], rec[f"worst.{k}.attack"] = v, a
    rec["flags"] = flag_text(run_flags(m))
    rec["weak_attacks"] = " ".join(weak_attacks(m))
    rec["mean_image.mse"] = ((m.get("baseline") or {}).get("mean_image") or {}).get("mse")
    for k, v in cem_diagnostics(m).items():
        rec[f"cem.{k}"] = v
    for k in ("encoder_params", "encoder_flops", "latency_ms", "payload_bytes"):
        rec[k] = (m.get("cost") or {}).get(k)
    rec["train_s"] = (m.get("timings") or {}).get("train_s")
    return rec


def load_records(out: str | Path, status: str | None = "finished") -> list[dict[str, Any]]:
    """``run_summary`` of every run of a store (``out``: a runs folder or its ``results.sqlite``)."""
    from ..experiments.store import ResultsStore

    path = Path(out)
    if path.is_dir():
        path = path / "results.sqlite"
    if not path.exists():
        raise FileNotFoundError(f"no results store at {path} (run `splitveil run ... --out {path.parent}` first)")
    return [run_summary(r) for r in ResultsStore(path).runs(status)]


def load_results(out: str | Path, status: str | None = "finished"):
    """Every finished run of a store as a pandas DataFrame, one row per run (columns of ``run_summary``:
    ``defense``, ``defense_desc``, ``seed``, ``accuracy``, ``<attack>.mse``, ``worst.mse``, ``worst.mse.attack``,
    ``flags``, ``cem.snr``, ``encoder_flops``, ...). ``status=None`` includes unfinished runs."""
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_results needs pandas: pip install pandas "
                          "(or use splitveil.report.results.load_records for a list of dicts)") from e
    return pd.DataFrame(load_records(out, status))
