"""One run: data -> split model -> train under the defense -> accuracy -> attacks
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
from ..attacks.base import share_split, weak_attack_warnings, worst_case
from ..data import build_data
from ..defenses import Edge, build_defenses
from ..metrics import edge_cost
from ..models import build_split_model
from ..report.figures import save_recon_grid
from ..training import Trainer
from ..params import ConfigError, CorruptFileError
from ..utils import atomic_torch_save, atomic_write_text, remove_stale_tmp, resolve_device, seed_everything
from .config import RunConfig, resolve_threads
from .store import ResultsStore, RunBusyError, owner_id, run_lock  # noqa: F401  (RunBusyError: re-exported)

log = logging.getLogger("splitveil.run")


def versions() -> dict[str, str]:
    import numpy

    v = {"splitveil": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
         "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
    return v


def chance_accuracy(labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy that a classifier learning nothing reaches on ``labels`` within two standard errors: the
    majority-class frequency (constant prediction) plus 2 sqrt(p (1 - p) / n)."""
    n = max(1, int(labels.numel()))
    p = float(torch.bincount(labels.cpu(), minlength=num_classes).max()) / n
    return p + 2.0 * (p * (1.0 - p) / n) ** 0.5


def quality_flags(accuracy: float, data) -> list[str]:
    """Warnings stored in metrics.json ``flags``: ``chance_accuracy`` when the model learned nothing (its
    attack MSE then says nothing about a defense)."""
    flags = []
    if accuracy <= chance_accuracy(data.test.labels, data.num_classes):
        flags.append("chance_accuracy")
    return flags


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("splitveil")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def run_dir_of(out: str | Path, run_id: str) -> Path:
    """``<out>/<run-id>``, checked to stay inside ``out`` (a run name cannot point elsewhere)."""
    out_r = Path(out).resolve()
    run_dir = (out_r / run_id).resolve()
    if run_dir.parent != out_r:
        raise ConfigError(f"name: the run folder {run_dir} would lie outside --out {out_r}")
    return run_dir


def preflight(cfg: RunConfig) -> None:
    """Cheap checks of what only fails once a run has started (the data root exists, ``model.cut`` is a
    block of the model): a bad value is a ConfigError before anything is recorded."""
    from ..data import DATASETS
    from ..data.build import resolve_root

    info = DATASETS.get(cfg.data.name)
    resolve_root(cfg.data)
    channels = cfg.data.channels or info.channels or 3
    size = cfg.data.image_size or info.default_image_size
    with torch.random.fork_rng(devices=[]):
        build_split_model(cfg.model, info.num_classes or 10, (channels, size, size))


def run_experiment(cfg: RunConfig, out: str | Path = "runs", resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run ``cfg``; returns its metrics (also in ``<out>/<run-id>/metrics.json`` and the results store).

    A finished run with the same config is reused unless ``force``; an interrupted one (or one left
    'running' by a killed process) continues from its last checkpoint (training epoch, finished attacks),
    with or without ``resume``; ``force`` starts over. One process at a time runs a run id in ``out``
    (a file lock; :class:`RunBusyError` otherwise)."""
    out = Path(out)
    run_id = cfg.run_id()
    run_dir = run_dir_of(out, run_id)
    preflight(cfg)
    store = ResultsStore(out / "results.sqlite")
    with run_lock(out, run_id):
        prev = store.get(run_id)
        if prev and prev["status"] == "finished" and not force and (run_dir / "metrics.json").exists():
            log.warning("run %s already finished: reusing its metrics from %s (--force runs it again)", run_id, run_dir)
            return _read_json(run_dir / "metrics.json")
        if (not resume and not force and prev and prev["status"] in ("interrupted", "running")
                and (run_dir / "checkpoint.pt").exists()):
            log.warning("run %s was interrupted: resuming from its checkpoints (--force starts it over)", run_id)
            resume = True
        if not resume and run_dir.exists():  # a fresh start: drop stale checkpoints and partial results
            for f in run_dir.glob("*"):
                if f.is_file():
                    f.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(run_dir)
        config = cfg.to_dict()
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        owner = owner_id()
        store.start(run_id, config, run_dir, cfg.defense_label(), owner)
        handler = _attach_log(run_dir)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(resolve_threads(cfg.threads))  # fixed per run: CPU results depend on it
        try:
            metrics = _execute(cfg, run_id, run_dir, resume)
        except KeyboardInterrupt:
            store.set_status(run_id, "interrupted", "KeyboardInterrupt", owner=owner)
            raise
        except BaseException as e:
            store.set_status(run_id, "failed", f"{type(e).__name__}: {e}", owner=owner)
            raise
        finally:
            torch.set_num_threads(threads_before)
            logging.getLogger("splitveil").removeHandler(handler)
            handler.close()
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        store.finish(run_id, metrics, owner=owner)
    return metrics


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: cannot be read ({type(e).__name__}: {e}); delete it and run again "
                               f"(--force re-runs a finished run)") from None


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
    trainer.run_id = run_id   # stored in checkpoint.pt and checked on resume
    t = time.perf_counter()
    history = trainer.fit(resume=resume)
    timings["train_s"] = time.perf_counter() - t
    accuracy = trainer.evaluate("test", cfg.eval.batch_size)
    log.info("test accuracy %.4f", accuracy)
    flags = quality_flags(accuracy, data)
    if flags:
        log.warning("test accuracy %.4f is at chance level: the model learned nothing (check train.lr and "
                    "train.epochs); its privacy numbers are meaningless", accuracy)
    diagnostics = defenses.diagnostics(model, data, device)  # e.g. CEM's feature scale on the test split

    edge = Edge(model.encoder, defenses).eval()
    for p in edge.parameters():
        p.requires_grad_(False)
    partial_path = run_dir / "attacks.json"
    attacks: dict[str, Any] = {}
    if resume and partial_path.exists():
        try:
            attacks = json.loads(partial_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s cannot be read (%s): running every attack again", partial_path, e)
    recon_rows: dict[str, torch.Tensor] = {}
    originals = None
    for name in list(attacks):  # attacks finished before a resume: their rows, or run again if unreadable
        f = run_dir / f"recon_{name}.pt"
        try:
            d = torch.load(f, weights_only=True)
            recon_rows[name], originals = d["recon"], d["originals"]
        except Exception as e:
            log.warning("%s cannot be read (%s: %s): running attack %s again", f, type(e).__name__, e, name)
            del attacks[name]
    n_show = min(cfg.eval.recon_images, len(data.test))
    suite = [(i, name, ATTACKS.get(name)(params, device=device, seed=cfg.seed + 1000 * (i + 1), show_progress=cfg.progress,
                                        workdir=run_dir)) for i, (name, params) in enumerate(cfg.attack_params().items())]
    # one split of the test images per run (seeded by the run seed), shared by every attack: all are scored on
    # the same images, and so is the mean-image baseline
    shared = share_split([a for _, _, a in suite], data, cfg.seed)
    eval_split = data.test.subset(shared[1]) if shared is not None else data.test
    guess_split = data.test.subset(shared[0]) if shared is not None and all(a.inference_time for _, _, a in suite) else data.aux
    for i, name, attack in suite:
        if name in attacks:
            log.info("attack %s already finished (resume)", name)
            continue
        seed_everything(cfg.seed + 1000 * (i + 1))
        result, x01, x_hat = run_attack(attack, edge, data, seed=cfg.seed + 7)
        recon_rows[name] = x_hat[:n_show]
        originals = x01[:n_show]
        # the rows first (atomically), then attacks.json marks the attack done: a kill between the two
        # only repeats the attack
        atomic_torch_save({"originals": originals, "recon": recon_rows[name]}, run_dir / f"recon_{name}.pt")
        attacks[name] = result
        log.info("attack %s: mse %.5f psnr %.2f ssim %.4f", name, result["mse"], result["psnr"], result["ssim"])
        atomic_write_text(partial_path, json.dumps(attacks, indent=2))
    recon_rows = {n: recon_rows[n] for n in cfg.attack_params() if n in recon_rows}  # config order
    if originals is not None:
        title = f"{data.name} {cfg.model.name} cut={model.cut_name} defense={defenses.label}"
        save_recon_grid(run_dir / "recon.png", originals, recon_rows, title)

    baseline = {"mean_image": mean_image_baseline(data, eval_split, guess_split)}
    wc = worst_case(attacks, baseline["mean_image"])
    warnings = weak_attack_warnings(wc, attacks)
    if wc.get("weak_attacks"):
        flags.append("weak_attack")
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
        "flags": flags,
        "attacks": attacks,
        "baseline": baseline,
        "worst_case": wc,
        "weak_attack": bool(wc.get("weak_attacks")),
        "warnings": warnings,
        "lpips": {"available": False, "reason": "LPIPS needs pretrained backbone weights; splitveil downloads none "
                                                "and does not compute it yet"},
        "cost": cost,
        "history": history,
        "sizes": {"train": len(data.train), "test": len(data.test), "aux": len(data.aux)},
        "timings": timings,
        "versions": versions(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": trainer.amp.info(),  # resolved train.precision / train.channels_last
    }
