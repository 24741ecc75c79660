"""TensorBoard back-end: scalars per epoch, per attack and for the final record; the config as text.

``tracking: {tensorboard: DIR}`` writes event files under ``DIR/<run id>/`` (``tensorboard --logdir DIR``).
Needs the ``tensorboard`` package (``pip install 'splitveil[tensorboard]'``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..params import ConfigError, require
from . import TRACKERS, Tracker, flat_scalars, summary_scalars


@dataclass
class TensorBoardParams:
    log_dir: str   # one sub-folder per run id

    def validate(self) -> None:
        require(bool(str(self.log_dir).strip()), "log_dir", "must be a folder")


@TRACKERS.register("tensorboard", "TensorBoard event files under DIR/<run id> (param: log_dir)")
class TensorBoardTracker(Tracker):
    Params = TensorBoardParams

    def __init__(self, params: TensorBoardParams):
        super().__init__(params)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"tracking.tensorboard: the tensorboard package is not installed ({e}); "
                              "pip install 'splitveil[tensorboard]'") from None
        self._writer_cls = SummaryWriter
        self.writer: Any = None
        self.log_dir: Path | None = None

    def run_start(self, run_id: str, config: Mapping[str, Any]) -> None:
        import yaml

        self.log_dir = Path(self.params.log_dir).expanduser() / run_id
        self.writer = self._writer_cls(log_dir=str(self.log_dir))
        self.writer.add_text("config", "```\n" + yaml.safe_dump(dict(config), sort_keys=False) + "```", 0)

    def epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.writer is not None:
            for k, v in flat_scalars(metrics).items():
                self.writer.add_scalar(f"train/{k}", v, int(epoch))

    def attack(self, name: str, result: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for k in ("mse", "psnr", "ssim", "ssim_cem", "mse_std"):
            v = result.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"attack/{name}/{k}", float(v), 0)
        curve = result.get("fit.val_curve")
        if isinstance(curve, list):   # the attack's held-out curve, when it records one
            for i, v in enumerate(curve):
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"attack/{name}/val_curve", float(v), i)

    def run_end(self, record: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in summary_scalars(record).items():
            self.writer.add_scalar(f"final/{k}", v, 0)
        flags = record.get("flags") or []
        self.writer.add_text("flags", ", ".join(map(str, flags)) or "none", 0)

    def close(self, status: str = "finished") -> None:
        if self.writer is not None:
            self.writer.add_text("status", status, 0)
            self.writer.close()
            self.writer = None
