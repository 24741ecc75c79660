"""One run in its folder: lock, store row, config and log around the pipeline (data -> split model -> train ->
accuracy -> attacks -> cost -> record, see pipeline.py). Finished stages are kept: an interrupted run resumes."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ..models import build_split_model
from ..params import ConfigError, CorruptFileError
from ..results.store import ResultsStore, RunBusyError, is_finished, owner_id, run_lock  # noqa: F401  (RunBusyError: re-exported)
from ..utils import atomic_write_text, previous_path, remove_stale_tmp, resolve_device
from ..runtime import tune_allocator
from .config import RunConfig, resolve_threads
from .pipeline import chance_accuracy, quality_flags, run_pipeline, versions  # noqa: F401  (re-exported)

log = logging.getLogger("splitveil.run")


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


def check_out(out: str | Path, field: str = "--out") -> Path:
    """``out`` is a folder (or does not exist yet); a ConfigError naming ``field`` when it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{field}: {out} is a file, not a folder of runs; name a folder (it is created)")
    return out


def check_device(device: str) -> None:
    """The configured device exists here; a ConfigError naming ``device`` otherwise."""
    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device: {e}") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device: '{device}' does not exist here ({torch.cuda.device_count()} CUDA device(s))")


def preflight(cfg: RunConfig) -> None:
    """Cheap checks of what only fails once a run has started (the device exists, the data root exists,
    ``model.cut`` is a block of the model): a bad value is a ConfigError before anything is recorded."""
    from ..data import DATASETS
    from ..data.build import resolve_root

    check_device(cfg.device)
    info = DATASETS.get(cfg.data.name)
    resolve_root(cfg.data)
    channels = cfg.data.channels or info.channels or 3
    size = cfg.data.image_size or info.default_image_size
    with torch.random.fork_rng(devices=[]):
        build_split_model(cfg.model, info.num_classes or 10, (channels, size, size))


RESUMABLE = ("interrupted", "running", "failed")   # a failed run (disk full, a bug fixed since) keeps its checkpoints


def _has_state(run_dir: Path) -> bool:
    ckpt = run_dir / "checkpoint.pt"
    return ckpt.exists() or previous_path(ckpt).exists() or (run_dir / "attacks.json").exists()


def run_experiment(cfg: RunConfig, out: str | Path = "runs", resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run ``cfg``; returns its metrics (also in ``<out>/<run-id>/metrics.json`` and the results store).

    A finished run with the same config is reused unless ``force``; an interrupted or failed one (or one left
    'running' by a killed process) continues from its last verified checkpoint (training epoch, finished
    attacks), with or without ``resume``; ``force`` starts over. Every file a run resumes from is checked
    against the SHA-256 recorded when it was written; one that differs is set aside and the run falls back to
    the state before it, or starts that stage afresh (logged). One process at a time runs a run id in ``out``
    (a file lock; :class:`RunBusyError` otherwise).

    A ConfigError found once the run started (e.g. while the data is read) leaves no row and no run folder
    behind when the run had recorded nothing before."""
    out = check_out(out)
    run_id = cfg.run_id()
    run_dir = run_dir_of(out, run_id)
    preflight(cfg)
    store = ResultsStore(out / "results.sqlite")
    with run_lock(out, run_id):
        prev = store.get(run_id)
        if is_finished(prev, run_dir) and not force:
            log.warning("run %s already finished: reusing its metrics from %s (--force runs it again)", run_id, run_dir)
            return _read_json(run_dir / "metrics.json")
        if not resume and not force and prev and prev["status"] in RESUMABLE and _has_state(run_dir):
            log.warning("run %s was %s%s: resuming from its last verified checkpoints (--force starts it over)",
                        run_id, prev["status"], f" ({prev['error']})" if prev.get("error") else "")
            resume = True
        new_folder = not run_dir.exists()
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
        allocator = tune_allocator()   # fewer page faults per step; results unchanged
        failed = None
        try:
            metrics = _execute(cfg, run_id, run_dir, resume)
            metrics["runtime"] = {"allocator": allocator}
            atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        except KeyboardInterrupt:
            store.set_status(run_id, "interrupted", "KeyboardInterrupt", owner=owner)
            raise
        except BaseException as e:
            failed = e
            store.set_status(run_id, "failed", f"{type(e).__name__}: {e}", owner=owner)
            if isinstance(e, OSError) and type(e).__name__ == "DiskFullError":
                log.error("%s; the run's verified checkpoints are kept: it resumes from them", e)
            raise
        finally:
            torch.set_num_threads(threads_before)
            logging.getLogger("splitveil").removeHandler(handler)
            handler.close()
            if isinstance(failed, ConfigError) and prev is None and new_folder and not _has_state(run_dir):
                _forget(store, run_id, run_dir)   # a bad input found late: nothing of the run is left behind
        store.finish(run_id, metrics, owner=owner)
    return metrics


def _forget(store: ResultsStore, run_id: str, run_dir: Path) -> None:
    """Remove the row and the folder of a run that stopped on a ConfigError before producing anything."""
    import shutil

    store.delete(run_id)
    shutil.rmtree(run_dir, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: cannot be read ({type(e).__name__}: {e}); delete it and run again "
                               f"(--force re-runs a finished run)") from None


def _execute(cfg: RunConfig, run_id: str, run_dir: Path, resume: bool) -> dict[str, Any]:
    """The run's stages (``pipeline.run_pipeline``); returns metrics.json's dict."""
    return run_pipeline(cfg, run_id, run_dir, resume).to_dict()
