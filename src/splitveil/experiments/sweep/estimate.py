"""An ESTIMATE of each sweep point's run time on this machine, from a short measured calibration
(``splitveil sweep --dry-run``).

For every distinct (data, model, batch size, device) of the sweep, a few training steps of the split model (SGD,
forward + backward, random labels, on real images of the dataset) and a few forward passes are timed after one
warm-up step; for every distinct learned attack (``inverse_network`` and the attacks built on its decoder), a few
decoder training steps on the model's features are timed the same way. A point's estimate is then

    training   = epochs x ceil(train images / batch) x step time  +  (epochs + accuracy draws) x test images x
                 forward time per image          (the per-epoch test evaluation and the final accuracy)
    attacks    = sum over learned attacks of epochs x ceil(attacker images / batch) x decoder step time

What it leaves out, and so under-estimates: the defenses' own training cost (CEM: 1.02-1.17x per epoch, measured
in docs/cem.md), a GAN's discriminator, the data loading and augmentation, the attacks without a decoder (rmle:
named as not estimated), the cost measurement and checkpoints. Timings are taken on the idle-or-not machine as
it is now; a loaded machine gives a larger estimate.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import RunConfig


@dataclass
class PointEstimate:
    train_s: float
    attack_s: float
    not_estimated: list[str] = field(default_factory=list)   # attacks without a timed decoder

    @property
    def total_s(self) -> float:
        return self.train_s + self.attack_s


def _timed(fn, steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls, after one warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


class Calibration:
    """Measured step times, cached per distinct configuration (one dataset load per data config)."""

    def __init__(self, steps: int = 3):
        self.steps = max(1, steps)
        self._data: dict[str, Any] = {}
        self._model: dict[str, tuple[float, float, tuple[int, ...], torch.nn.Module]] = {}
        self._attack: dict[str, float | None] = {}

    def data(self, cfg: RunConfig):
        from ...data import build_data

        key = json.dumps(cfg.data.__dict__, sort_keys=True, default=str)
        if key not in self._data:
            self._data[key] = build_data(cfg.data, cfg.seed)
        return self._data[key]

    def model(self, cfg: RunConfig, device: torch.device):
        """(seconds per training step, seconds per image of a forward pass, feature shape, encoder)."""
        from ...models import build_split_model

        data = self.data(cfg)
        bs = cfg.train.batch_size
        key = json.dumps([cfg.model.__dict__, cfg.data.name, bs, str(device)], sort_keys=True, default=str)
        if key not in self._model:
            model = build_split_model(cfg.model, data.num_classes, data.image_shape).to(device)
            x = data.train.images[:bs].to(device).float() / 255 if len(data.train) >= bs else \
                torch.rand(bs, *data.image_shape, device=device)
            y = torch.randint(0, data.num_classes, (x.shape[0],), device=device)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step():
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            model.train()
            step_s = _timed(step, self.steps)
            model.eval()
            with torch.no_grad():
                fwd_s = _timed(lambda: model(x), self.steps) / x.shape[0]
            self._model[key] = (step_s, fwd_s, tuple(model.feature_shape), model.encoder)
        return self._model[key]

    def attack(self, cfg: RunConfig, name: str, params: Any, device: torch.device) -> float | None:
        """Seconds per decoder training step of a learned attack; None for an attack without a decoder."""
        from ...attacks import ATTACKS

        data = self.data(cfg)
        _, _, feat, encoder = self.model(cfg, device)
        bs = int(getattr(params, "batch_size", 64))
        key = json.dumps([name, repr(params), feat, data.image_shape, str(device)], default=str)
        if key not in self._attack:
            attack = ATTACKS.get(name)(params, device=device, seed=0)
            build = getattr(attack, "build_decoder", None)
            if build is None or not hasattr(params, "epochs"):
                self._attack[key] = None
            else:
                dec = build(feat, data.image_shape).to(device)
                x = torch.rand(bs, *data.image_shape, device=device)
                with torch.no_grad():
                    z = encoder(data.train.images[:bs].to(device).float() / 255) if len(data.train) >= bs else \
                        torch.rand(bs, *feat, device=device)
                opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)

                def step():
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.mse_loss(dec(z), x[: z.shape[0]]).backward()
                    opt.step()

                self._attack[key] = _timed(step, self.steps)
        return self._attack[key]


def estimate_point(cfg: RunConfig, calib: Calibration, device: torch.device) -> PointEstimate:
    data = calib.data(cfg)
    step_s, fwd_s, _, _ = calib.model(cfg, device)
    bs = cfg.train.batch_size
    draws = cfg.eval.accuracy_draws or 5
    train_s = cfg.train.epochs * math.ceil(len(data.train) / bs) * step_s + \
        (cfg.train.epochs + draws) * len(data.test) * fwd_s
    attack_s, missing = 0.0, []
    for name, params in cfg.attack_params().items():
        per = calib.attack(cfg, name, params, device)
        if per is None:
            missing.append(name)
            continue
        n_fit = len(data.aux) if getattr(params, "mode", "training-time") == "training-time" else len(data.test)
        attack_s += int(params.epochs) * math.ceil(n_fit / int(getattr(params, "batch_size", 64))) * per
    return PointEstimate(train_s, attack_s, missing)


def fmt_duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def estimate_lines(points, device: torch.device | None = None, steps: int = 3) -> list[str]:
    """One line per point (``SweepPoint``) and the total, labelled as an estimate."""
    from ...utils import resolve_device

    calib = Calibration(steps)
    lines, total = [], 0.0
    for p in points:
        dev = device or resolve_device(p.config.device)
        try:
            est = estimate_point(p.config, calib, dev)
        except Exception as e:   # e.g. the dataset is not where data.root says: the listing above still stands
            lines.append(f"  [{p.index}] {p.label}: not estimated ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            continue
        total += est.total_s
        extra = f"; not estimated: {', '.join(est.not_estimated)}" if est.not_estimated else ""
        lines.append(f"  [{p.index}] {p.label}: ~{fmt_duration(est.total_s)} (training {fmt_duration(est.train_s)}, "
                     f"attacks {fmt_duration(est.attack_s)}{extra})")
    head = (f"ESTIMATED run time per point on this machine ({device or 'each point`s device'}), from {steps} timed "
            f"steps per distinct model / attack (training steps x epochs x batches; excludes defense overhead, "
            f"data loading and attacks without a decoder):")
    return [head] + lines + [f"ESTIMATED total: ~{fmt_duration(total)} of run time (one worker; divide by parallel "
                             f"workers for wall time)"]
