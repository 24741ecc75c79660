"""One run (DESIGN.md section 1): data -> split model -> train under the defense -> accuracy -> attacks
-> cost -> record. Finished stages are kept, so an interrupted run resumes where it stopped."""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from ..attacks import ATTACKS, mean_image_baseline, run_attack
from ..data import build_data
from ..defenses import Edge, build_defenses
from ..metrics import edge_cost
from ..models import build_split_model
from ..report.figures import save_recon_grid
from ..training import Trainer
from ..utils import atomic_write_text, resolve_device, seed_everything
from .config import RunConfig
from .store import ResultsStore

log = logging.getLogger("splitveil.run")


def versions() -> dict[str, str]:
    import numpy

    v = {"splitveil": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
         "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
    return v


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("splitveil")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def run_experiment(cfg: RunConfig, out: str | Path = "runs", resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run ``cfg``; returns its metrics (also in ``<out>/<run-id>/metrics.json`` and the results store).

    A finished run with the same config is reused unless ``force``; ``resume`` continues an interrupted one
    from its last checkpoint (training epoch, finished attacks)."""
    out = Path(out)
    run_id = cfg.run_id()
    run_dir = out / run_id
    store = ResultsStore(out / "results.sqlite")
    prev = store.get(run_id)
    if prev and prev["status"] == "finished" and not force and (run_dir / "metrics.json").exists():
        log.info("run %s already finished; reusing its metrics", run_id)
        return json.loads((run_dir / "metrics.json").read_text())
    if not resume and run_dir.exists():  # a fresh start: drop stale checkpoints and partial results
        for f in run_dir.glob("*"):
            if f.is_file():
                f.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.to_dict()
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    store.start(run_id, config, run_dir, cfg.defense_label())
    handler = _attach_log(run_dir)
    try:
        metrics = _execute(cfg, run_id, run_dir, resume)
    except KeyboardInterrupt:
        store.set_status(run_id, "interrupted", "KeyboardInterrupt")
        raise
    except BaseException as e:
        store.set_status(run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        logging.getLogger("splitveil").removeHandler(handler)
        handler.close()
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    store.finish(run_id, metrics)
    return metrics


def _execute(cfg: RunConfig, run_id: str, run_dir: Path, resume: bool) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    t = time.perf_counter()
    data = build_data(cfg.data, cfg.seed)
    timings["data_s"] = time.perf_counter() - t
    log.info("data %s: train %d, test %d, aux %d, shape %s", data.name, len(data.train), len(data.test),
             len(data.aux), data.image_shape)

    model = build_split_model(cfg.model, data.num_classes, data.image_shape)
    defenses = build_defenses(cfg.defense)
    defenses.setup(model, data, device)
    trainer = Trainer(model, defenses, data, cfg.train, device, seed=cfg.seed, ckpt_path=run_dir / "checkpoint.pt",
                      show_progress=cfg.progress, augment=cfg.data.augment)
    t = time.perf_counter()
    history = trainer.fit(resume=resume)
    timings["train_s"] = time.perf_counter() - t
    accuracy = trainer.evaluate("test", cfg.eval.batch_size)
    log.info("test accuracy %.4f", accuracy)
    diagnostics = defenses.diagnostics(model, data, device)  # e.g. CEM's feature scale on the test split

    edge = Edge(model.encoder, defenses).eval()
    for p in edge.parameters():
        p.requires_grad_(False)
    partial_path = run_dir / "attacks.json"
    attacks: dict[str, Any] = json.loads(partial_path.read_text()) if resume and partial_path.exists() else {}
    recon_rows: dict[str, torch.Tensor] = {}
    originals = None
    n_show = min(cfg.eval.recon_images, len(data.test))
    for i, (name, params) in enumerate(cfg.attack_params().items()):
        cls = ATTACKS.get(name)
        attack = cls(params, device=device, seed=cfg.seed + 1000 * (i + 1), show_progress=cfg.progress, workdir=run_dir)
        if name in attacks:
            log.info("attack %s already finished (resume)", name)
            continue
        seed_everything(cfg.seed + 1000 * (i + 1))
        result, x01, x_hat = run_attack(attack, edge, data, seed=cfg.seed + 7)
        attacks[name] = result
        log.info("attack %s: mse %.5f psnr %.2f ssim %.4f", name, result["mse"], result["psnr"], result["ssim"])
        atomic_write_text(partial_path, json.dumps(attacks, indent=2))
        recon_rows[name] = x_hat[:n_show]
        originals = x01[:n_show]
        torch.save({"originals": originals, "recon": recon_rows[name]}, run_dir / f"recon_{name}.pt")
    for name in attacks:  # rows of attacks finished before a resume
        f = run_dir / f"recon_{name}.pt"
        if name not in recon_rows and f.exists():
            d = torch.load(f, weights_only=True)
            recon_rows[name], originals = d["recon"], d["originals"]
    if originals is not None:
        title = f"{data.name} {cfg.model.name} cut={model.cut_name} defense={defenses.label}"
        save_recon_grid(run_dir / "recon.png", originals, recon_rows, title)

    cost = edge_cost(edge, data.image_shape, model.feature_shape, device, cfg.eval.latency_batch, cfg.eval.latency_repeats,
                     params_of=model.encoder)
    timings["total_s"] = time.perf_counter() - t_all
    return {
        "status": "finished",
        "run_id": run_id,
        "dataset": data.name,
        "model": cfg.model.name,
        "cut": model.cut_name,
        "cut_index": model.cut_index,
        "feature_shape": list(model.feature_shape),
        "defense": defenses.label,
        "defense_info": defenses.info(),
        "defense_diagnostics": diagnostics,
        "seed": cfg.seed,
        "accuracy": accuracy,
        "attacks": attacks,
        "baseline": {"mean_image": mean_image_baseline(data)},
        "lpips": {"available": False, "reason": "LPIPS needs pretrained backbone weights; splitveil downloads none "
                                                "and does not compute it yet"},
        "cost": cost,
        "history": history,
        "sizes": {"train": len(data.train), "test": len(data.test), "aux": len(data.aux)},
        "timings": timings,
        "versions": versions(),
        "device": str(device),
    }
