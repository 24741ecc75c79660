"""The deployment review: how much does a trained model leak if it is cut here? No training.

::

    source ─────────────────► at every cut k ────────────────────────────────────────────► audit table
    a run folder (config.yaml  the model as one chain of blocks, cut after k: the edge       audit.md / .csv /
    + checkpoint.pt), or the   (encoder + the defenses' inference transform) ─► the run's    .json, one run
    user's module:function +   attack stage (same seeds, test images, worst case) ─► cost   folder + store
    a state dict (weights_only) stage ─► the run's record (metrics.json, recon.png)          row per cut

The stages are the pipeline's (``pipeline.prepare_data``, ``freeze_edge``, ``attack_all``, ``measure_cost``,
``record``, ``tracking``): at the cut the source was trained at, with the same seeds and attacks, the audit's
numbers are the run's own. At another cut the defenses' inference transform (noise, dropout, ...) is applied
there; what the defense did in training is in the weights. Each cut is one run folder ``<out>/<cut run id>/``
(config.yaml with ``model.cut`` set to the audited cut, metrics.json with an ``audit`` entry, recon.png,
recon_<attack>.pt, the attacks' checkpoints) and one row of ``<out>/results.sqlite``, so ``splitveil report``
reads them like runs; a finished cut is reused (``force`` redoes it). The table goes to
``<out>/audit-<name>-<hash>/``."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from ..models import SplitModel, create_model
from ..models.generic import TracedModel
from ..params import ConfigError
from ..results.figures import save_recon_grid, score_note
from ..results.records import RunRecord
from ..results.store import ResultsStore, is_finished, owner_id, run_lock
from ..utils import atomic_write_text, resolve_device
from . import pipeline
from .config import RunConfig, resolve_threads
from .run import run_dir_of
from .trained import TrainedRun, chain, load_trained, read_checkpoint

log = logging.getLogger("splitveil.audit")


class _Audited:
    """Stands for the trainer in the record: the audit trains nothing; the precision is the source's."""

    def __init__(self, precision: dict[str, Any] | None):
        self.amp = self
        self._info = dict(precision or {"precision": "fp32", "channels_last": False, "note": "audit: no training"})

    def info(self) -> dict[str, Any]:
        return dict(self._info)


# -- the source --------------------------------------------------------------------------------------------------
def from_run(run_dir: str | Path, overrides: Iterable[str] = (), device: str | None = None) -> TrainedRun:
    """A finished run's model (see ``trained.load_trained``); ``overrides`` set attacks, eval, seed, tracking."""
    return load_trained(run_dir, device, list(overrides))


def from_weights(cfg: RunConfig, weights: str | Path) -> TrainedRun:
    """The model ``cfg.model`` names (a registered name or the user's ``module:function``), its weights loaded
    from ``weights`` (``weights_only=True``): the module's own state dict (``torch.save(model.state_dict(), f)``),
    or a mapping holding it under ``state_dict`` or ``model``. Data, defenses and attacks come from ``cfg``."""
    f = Path(weights).expanduser()
    seeds = pipeline.Seeds(cfg.seed)
    data, _ = pipeline.prepare_data(cfg, seeds)
    device = resolve_device(cfg.device)
    backbone = create_model(cfg.model.name, data.num_classes, data.image_shape, cfg.model.width, **cfg.model.options)
    st = read_checkpoint(f)
    sd = st
    if isinstance(st, dict) and not any(isinstance(v, torch.Tensor) for v in st.values()):
        sd = st.get("state_dict", st.get("model"))
    if not isinstance(sd, dict):
        raise ConfigError(f"--weights: {f} holds no state dict (expected torch.save(model.state_dict(), file))")
    target = backbone.source if isinstance(backbone, TracedModel) else backbone
    try:
        target.load_state_dict(sd)
    except RuntimeError as e:
        raise ConfigError(f"--weights: {f} does not fit {cfg.model.name}: {str(e).splitlines()[0]} "
                          f"{' '.join(str(e).splitlines()[1:2])}") from None
    model = SplitModel(backbone, cfg.model.cut)   # the defenses are set up on the configured cut
    defenses = pipeline.prepare_defenses(cfg, model, data, device)
    prep = pipeline.Prepared(data, model.to(device).eval(), defenses.to(device).eval(), device, seeds)
    from .trained import _sha256

    return TrainedRun(cfg, prep, None, {"model": cfg.model.name, "weights": str(f), "sha256": _sha256(f)})


# -- one cut -----------------------------------------------------------------------------------------------------
@dataclass
class AuditCut:
    cut: str
    cut_index: int
    run_id: str
    run_dir: Path
    record: dict[str, Any]
    reused: bool = False


@torch.no_grad()
def accuracy_at(model: SplitModel, defenses, data, device: torch.device, batch_size: int, seed: int) -> float:
    """Test accuracy of the whole model with the defenses' inference transform at this cut (their randomness drawn
    from ``seed``)."""
    model.eval()
    correct = 0
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for x, y in data.batches(data.test, batch_size, device):
            logits = model.decoder(defenses.transform(model.encoder(x), training=False))
            correct += int((logits.argmax(1) == y).sum())
    return correct / max(1, len(data.test))


def _cut_run_id(cfg: RunConfig, source: dict[str, Any], name: str, k: int, cut: str) -> str:
    d = {"source": source.get("sha256"), "model": cfg.model.name, "cut": k, "seed": cfg.seed,
         "defense": cfg.defense.resolved(), "attacks": cfg.attacks.resolved(),
         "eval": dataclasses.asdict(cfg.eval), "data": dataclasses.asdict(cfg.data),
         "device": resolve_device(cfg.device).type}
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "._-" else "." for c in f"{name}-{cut}")
    return f"audit-{safe}-{h}"


def audit_cut(tr: TrainedRun, whole, k: int, out: Path, name: str, force: bool = False) -> AuditCut:
    """Attack and cost at cut ``k`` of ``whole`` (the model as a chain), recorded as a run in ``out``."""
    cfg, prep = tr.cfg, tr.prep
    model = SplitModel(whole, k)
    cut = model.cut_name
    run_id = _cut_run_id(cfg, tr.source, name, k, cut)
    run_dir = run_dir_of(out, run_id)
    store = ResultsStore(out / "results.sqlite")
    with run_lock(out, run_id):
        prev = store.get(run_id)
        if is_finished(prev, run_dir) and not force:
            log.info("audit cut %s already finished: reusing %s", cut, run_dir)
            return AuditCut(cut, k, run_id, run_dir, json.loads((run_dir / "metrics.json").read_text()), True)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = cfg.to_dict()
        config["model"]["cut"] = cut
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        owner = owner_id()
        store.start(run_id, config, run_dir, cfg.defense_label(), owner)
        try:
            with pipeline.tracking(cfg, run_id) as tracker:
                rec = _measure(tr, model, k, run_id, run_dir, tracker)
                tracker.run_end(rec)
        except KeyboardInterrupt:
            store.set_status(run_id, "interrupted", "KeyboardInterrupt", owner=owner)
            raise
        except BaseException as e:
            store.set_status(run_id, "failed", f"{type(e).__name__}: {e}", owner=owner)
            raise
        atomic_write_text(run_dir / "metrics.json", json.dumps(rec, indent=2))
        store.finish(run_id, rec, owner=owner)
    return AuditCut(cut, k, run_id, run_dir, rec)


def _measure(tr: TrainedRun, model: SplitModel, k: int, run_id: str, run_dir: Path, tracker) -> dict[str, Any]:
    cfg, prep = tr.cfg, tr.prep
    t0 = time.perf_counter()
    here = pipeline.Prepared(prep.data, model, prep.defenses, prep.device, prep.seeds)
    edge = pipeline.freeze_edge(model.encoder, prep.defenses)
    acc = accuracy_at(model, prep.defenses, prep.data, prep.device, cfg.eval.batch_size, prep.seeds.transmit)
    trained = pipeline.Trained(_Audited(tr.precision), list(tr.history), acc,
                               pipeline.quality_flags(acc, prep.data), 0.0)
    t1 = time.perf_counter()
    outcome = pipeline.attack_all(cfg.attack_params(), edge, prep.data, prep.seeds, prep.device,
                                  show_progress=cfg.progress, workdir=run_dir,
                                  n_show=min(cfg.eval.recon_images, len(prep.data.test)),
                                  on_result=lambda n, r, x01, xh: _persist(run_dir, n, r, x01, xh, tracker))
    t2 = time.perf_counter()
    if outcome.originals is not None:
        weak = set(outcome.worst_case.weak_attacks or []) if outcome.worst_case else set()
        notes = {n: score_note(a.mse, a.ssim, n in weak, bool(a.unconverged())) for n, a in outcome.attacks.items()}
        save_recon_grid(run_dir / "recon.png", outcome.originals, outcome.recon,
                        f"audit {prep.data.name} {cfg.model.name} cut={model.cut_name} defense={prep.defenses.label}",
                        notes=notes)
    cost = pipeline.measure_cost(cfg, edge, model, prep.data, prep.device)
    timings = {"accuracy_s": t1 - t0, "attacks_s": t2 - t1, "cost_s": time.perf_counter() - t2,
               "total_s": time.perf_counter() - t0}
    rec = pipeline.record(cfg, run_id, here, trained, {}, outcome, cost, timings).to_dict()
    rec["audit"] = {"source": tr.source, "cut": model.cut_name, "cut_index": k,
                    "note": "no training: the source's weights; the defenses' inference transform at this cut"}
    return rec


def _persist(run_dir: Path, name: str, result: dict[str, Any], x01: torch.Tensor, x_hat: torch.Tensor, tracker) -> None:
    from ..utils import atomic_torch_save

    atomic_torch_save({"originals": x01, "recon": x_hat}, run_dir / f"recon_{name}.pt")
    tracker.attack(name, result)


# -- the audit ---------------------------------------------------------------------------------------------------
def parse_cut_list(spec: str | Iterable[str | int] | None, names: list[str], default: str) -> list[int]:
    """``all``, or names (first) / 1-based indices of the chain's blocks (comma-separated); default: the trained
    cut."""
    n = len(names) - 1
    if spec is None:
        spec = default
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(range(1, n + 1))
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else [str(s) for s in spec]
    if not items:
        raise ConfigError("--cuts: empty list; give cut names (e.g. layer1,layer2) or 'all'")
    out = []
    for it in items:
        if it in names[:-1]:          # a name first (an nn.Sequential's children are named by digits)
            k = names.index(it) + 1
        elif it.isdigit():
            k = int(it)
        else:
            raise ConfigError(f"--cuts: '{it}' is not a cut of this model; valid cuts: {', '.join(names[:-1])}")
        if not 1 <= k <= n:
            raise ConfigError(f"--cuts: {k} is out of range 1..{n}")
        if k not in out:
            out.append(k)
    return sorted(out)


def run_audit(tr: TrainedRun, cuts: str | Iterable[str | int] | None = None, out: str | Path = "runs",
              force: bool = False) -> dict[str, Any]:
    """Audit ``tr`` at ``cuts`` (names of the chain's blocks, ``all``, default the trained cut); returns the table's
    rows and where everything went."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    whole = chain(tr.prep.model)
    trained_cut = tr.prep.model.edge_block_names[-1]
    ks = parse_cut_list(cuts, whole.block_names, trained_cut)
    name = tr.cfg.name
    threads_before = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(tr.cfg.threads))   # as a run: CPU results depend on it
    try:
        done = [audit_cut(tr, whole, k, out, name, force) for k in ks]
    finally:
        torch.set_num_threads(threads_before)
    rows = [table_row(c) for c in done]
    key = hashlib.sha256(json.dumps([c.run_id for c in done]).encode()).hexdigest()[:10]
    adir = out / f"audit-{name}-{key}"
    adir.mkdir(parents=True, exist_ok=True)
    summary = {"source": tr.source, "model": tr.cfg.model.name, "dataset": tr.prep.data.name,
               "defense": tr.prep.defenses.label, "trained_cut": trained_cut, "rows": rows,
               "runs": {c.cut: str(c.run_dir) for c in done}}
    atomic_write_text(adir / "audit.json", json.dumps(summary, indent=2))
    atomic_write_text(adir / "audit.md", audit_table(summary) + "\n")
    atomic_write_text(adir / "audit.csv", _csv(rows))
    summary["dir"] = str(adir)
    return summary


def table_row(c: AuditCut) -> dict[str, Any]:
    r = RunRecord.from_dict(c.record)
    worst_attack, worst_mse = r.worst().best("mse")
    row: dict[str, Any] = {"cut": c.cut, "cut_index": c.cut_index, "shape": "x".join(map(str, r.feature_shape or [])),
                           "accuracy": r.accuracy}
    for n, a in r.attacks.items():
        row[f"{n}_mse"] = a.mse
    row.update({"worst_mse": worst_mse, "worst_attack": worst_attack, "baseline_mse": r.baseline_mse,
                "worst_ssim": r.worst().best("ssim")[1], "edge_params": r.cost.encoder_params if r.cost else None,
                "edge_flops": r.cost.encoder_flops if r.cost else None,
                "latency_ms": r.cost.latency_ms if r.cost else None,
                "payload_bytes": r.cost.payload_bytes if r.cost else None,
                "flags": ",".join(r.run_flags()), "run_id": c.run_id})
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.5f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def audit_table(summary: dict[str, Any]) -> str:
    """The audit as a markdown table: one row per cut (accuracy with the defense at that cut, every attack's MSE,
    the worst case, the mean-image baseline and the edge's cost)."""
    rows = summary["rows"]
    attacks = [k[:-4] for k in rows[0] if k.endswith("_mse") and k not in ("worst_mse", "baseline_mse")] if rows else []
    head = (["cut", "shape", "accuracy"] + [f"{a} MSE" for a in attacks] +
            ["worst MSE (attack)", "worst SSIM", "mean-image MSE", "edge params", "edge FLOPs", "latency ms",
             "payload B", "flags"])
    lines = [f"audit of {summary['model']} on {summary['dataset']}, defense {summary['defense']} "
             f"(trained cut: {summary['trained_cut']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["cut"], r["shape"], _fmt(r["accuracy"])] + [_fmt(r.get(f"{a}_mse")) for a in attacks] +
                 [f"{_fmt(r['worst_mse'])} ({r['worst_attack']})", _fmt(r["worst_ssim"]), _fmt(r["baseline_mse"]),
                  _fmt(r["edge_params"]), _fmt(r["edge_flops"]), _fmt(r["latency_ms"]), _fmt(r["payload_bytes"]),
                  r["flags"] or "-"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()
