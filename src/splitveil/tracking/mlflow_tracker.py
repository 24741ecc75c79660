"""MLflow back-end: the config as parameters, metrics per epoch, per attack and for the final record, and the
final record (metrics.json) as an artifact.

``tracking: {mlflow: URI}`` (``{mlflow: {uri: URI, experiment: NAME}}``; experiment default: the config's
``name``). A local store (``file:./mlruns`` or a folder) is MLflow's file store, which MLflow 3 keeps only
behind ``MLFLOW_ALLOW_FILE_STORE=true``: set here for a local store unless the environment says otherwise. Needs
``mlflow`` or the lighter ``mlflow-skinny`` (``pip install 'splitveil[mlflow]'``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from ..params import ConfigError, require
from . import TRACKERS, Tracker, flat_scalars, summary_scalars


@dataclass
class MLflowParams:
    uri: str                       # tracking URI: file:./mlruns, a folder, http://host:5000, sqlite:///mlflow.db
    experiment: str | None = None  # default: the config's name

    def validate(self) -> None:
        require(bool(str(self.uri).strip()), "uri", "must be a tracking URI or a folder")


def _is_local(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


def _file_uri(uri: str) -> str:
    if uri.startswith("file:"):
        return uri
    from pathlib import Path

    return Path(uri).expanduser().resolve().as_uri()


@TRACKERS.register("mlflow", "MLflow tracking (params: uri, experiment)")
class MLflowTracker(Tracker):
    Params = MLflowParams

    def __init__(self, params: MLflowParams):
        super().__init__(params)
        uri = str(params.uri)
        if _is_local(uri):
            uri = _file_uri(uri)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ConfigError(f"tracking.mlflow: mlflow is not installed ({e}); pip install 'splitveil[mlflow]' "
                              "(mlflow-skinny)") from None
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None

    def run_start(self, run_id: str, config: Mapping[str, Any]) -> None:
        name = self.params.experiment or str(config.get("name") or "splitveil")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(exp_id, run_name=run_id, tags={"splitveil.run_id": run_id})
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k[:250], str(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        if self.run_id is None or not values:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(_key(k), float(v), ts, int(step)) for k, v in values.items()]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._metrics({f"train.{k}": v for k, v in flat_scalars(metrics).items()}, epoch)

    def attack(self, name: str, result: Mapping[str, Any]) -> None:
        self._metrics({f"attack.{name}.{k}": float(result[k]) for k in ("mse", "psnr", "ssim", "mse_std")
                       if isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)}, 0)

    def run_end(self, record: Mapping[str, Any]) -> None:
        if self.run_id is None:
            return
        self._metrics({f"final.{k}": v for k, v in summary_scalars(record).items()}, 0)
        self.client.log_dict(self.run_id, dict(record), "metrics.json")
        flags = record.get("flags") or []
        self.client.set_tag(self.run_id, "splitveil.flags", ",".join(map(str, flags)) or "none")

    def close(self, status: str = "finished") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status,
                                                                                                         "FAILED"))
            self.run_id = None


def _key(k: str) -> str:
    """An MLflow metric name (letters, digits, _ - . / and spaces)."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out
