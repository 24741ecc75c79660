"""A finished run's model back in memory, as it was at the end of training: the data and split model rebuilt
by the pipeline's first stage from the run's ``config.yaml``, then ``checkpoint.pt`` loaded (``weights_only``)
with every defense's state (PATROL's pruned shapes are re-applied before the weights are loaded, as a resume
does). ``load_edge(run_dir)`` is what the device runs: the encoder and the defenses' inference transform.
The audit and the export start here."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..defenses import Edge
from ..models import BlockModel, SplitModel
from ..params import ConfigError, CorruptFileError
from . import pipeline
from .config import RunConfig, load_config

log = logging.getLogger("splitveil.trained")


@dataclass
class TrainedRun:
    """A run's trained model: the pipeline's :class:`~pipeline.Prepared` (data, model with its weights, defenses
    with their state, device, seeds) and what the checkpoint says of itself."""
    cfg: RunConfig
    prep: pipeline.Prepared
    run_dir: Path | None
    source: dict[str, Any] = field(default_factory=dict)   # run dir / checkpoint file and its SHA-256
    history: list[dict[str, Any]] = field(default_factory=list)
    precision: dict[str, Any] | None = None

    def edge(self) -> Edge:
        return pipeline.freeze_edge(self.prep.model.encoder, self.prep.defenses)


def read_checkpoint(f: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint file, loaded with ``weights_only=True`` (tensors and plain containers only)."""
    if not f.is_file():
        raise ConfigError(f"{f}: no such checkpoint file")
    try:
        return torch.load(f, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or unsafe: named
        raise CorruptFileError(f"{f}: not a readable checkpoint, or it holds objects other than tensors and plain "
                               f"containers, which are refused ({type(e).__name__})") from None


def restore(prep: pipeline.Prepared, state: dict[str, Any], where: str) -> None:
    """Load a trainer checkpoint's model and defense state into ``prep`` (pruned shapes first)."""
    if not isinstance(state, dict) or "model" not in state:
        raise ConfigError(f"{where}: not a splitveil training checkpoint (no 'model' state)")
    try:
        prep.defenses.prepare_load(state)
        prep.model.load_state_dict(state["model"])
        if "defenses" in state:
            prep.defenses.load_state_dict(state["defenses"])
    except RuntimeError as e:
        raise ConfigError(f"{where}: does not fit the model its config.yaml describes ({str(e).splitlines()[0]})") \
            from None
    prep.model.eval()
    prep.defenses.eval()


def resolve_run_dir(path: str | Path) -> Path:
    """``path`` itself when it is a run folder; otherwise the one finished run folder beside it whose name starts
    with ``path``'s name and a dash (``runs/my-resnet18`` -> ``runs/my-resnet18-digits-...-s0-<hash>``): the run of
    a config is found by its ``name``. Several matches are an error listing them."""
    p = Path(path)
    if (p / "config.yaml").is_file():
        return p
    parent = p.parent if str(p.parent) else Path(".")
    found = sorted(d for d in parent.glob(f"{p.name}-*") if (d / "config.yaml").is_file()
                   and (d / "checkpoint.pt").is_file() and not d.name.startswith("audit-"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"{p}: not a run folder, and no run folder {p.name}-* with a checkpoint in {parent}")
    raise ConfigError(f"{p}: {len(found)} run folders match ({', '.join(d.name for d in found[:5])}); give the one "
                      "you mean")


def load_trained(run_dir: str | Path, device: str | None = "cpu", overrides: list[str] | tuple[str, ...] = ()
                 ) -> TrainedRun:
    """The run in ``run_dir`` (its ``config.yaml`` and ``checkpoint.pt``) rebuilt with its trained weights.
    ``device``: where to load it (None: the config's); ``overrides``: ``--set`` assignments for the config
    (attacks, eval, seed: what does not change the model)."""
    run_dir = resolve_run_dir(run_dir)
    cfg_file, ckpt = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    if not cfg_file.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    if not ckpt.is_file():
        raise ConfigError(f"{run_dir}: no checkpoint.pt (a run with train.epochs 0 trains and saves no model)")
    ov = list(overrides) + ([f"device={device}"] if device else [])
    cfg = load_config(cfg_file, ov)
    state = read_checkpoint(ckpt)
    prep = pipeline.prepare(cfg)
    restore(prep, state, str(ckpt))
    prep.model.to(prep.device)
    prep.defenses.to(prep.device)
    return TrainedRun(cfg, prep, run_dir, {"run_dir": str(run_dir), "checkpoint": str(ckpt),
                                           "sha256": _sha256(ckpt), "epoch": state.get("epoch")},
                      list(state.get("history") or []), state.get("precision"))


def load_edge(run_dir: str | Path, device: str = "cpu") -> Edge:
    """What the run's device runs and sends: the trained encoder (pruned shapes restored) followed by the
    defenses' inference transform (noise included), frozen, in eval mode. Attributes: ``input_shape``,
    ``feature_shape``, ``mean`` / ``std`` (the normalisation its input expects), ``run_id``."""
    tr = load_trained(run_dir, device)
    run_dir = tr.run_dir
    edge = tr.edge()
    edge.input_shape = tuple(tr.prep.data.image_shape)
    edge.feature_shape = tuple(tr.prep.model.feature_shape)
    edge.mean, edge.std = tuple(tr.prep.data.mean), tuple(tr.prep.data.std)
    edge.run_id = Path(run_dir).name
    return edge


def chain(model: SplitModel) -> BlockModel:
    """The whole trained model as one chain of blocks (the edge's, bottleneck included, then the cloud's), sharing
    its modules: cutting it after k blocks gives the edge of cut k; after the trained cut, the trained edge."""
    keys = [f"e{i}" for i in range(len(model.encoder))] + [f"c{i}" for i in range(len(model.decoder))]
    mods = list(model.encoder.children()) + list(model.decoder.children())
    c = BlockModel(list(zip(keys, mods)), model.input_shape, names=model.edge_block_names + model.cloud_block_names)
    return c.train(model.training)


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
