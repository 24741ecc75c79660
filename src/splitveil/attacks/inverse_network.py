"""Decoder (inverse-network) attack: a conv/deconv decoder trained on aux pairs (z, x) with MSE
(He et al. 2019; Yang et al. 2019), its shape adapted to the transmitted features."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataBundle
from ..defenses import Edge
from ..params import require
from ..utils import atomic_torch_save, progress, rng_state, set_rng_state
from .base import ATTACKS, Attack


@dataclass
class InverseNetworkParams:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    channels: int = 128            # width of the first decoder stage (halved per upsampling, >= 32)
    activation: Literal["auto", "prelu", "tanh", "relu"] = "auto"  # auto: PReLU for maps <= 8x8 (GPZ), else Tanh
    max_seconds: float | None = None   # optional time budget for fitting

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be positive")
        require(self.channels >= 4, "channels", "must be >= 4")


def make_activation(kind: str, channels: int) -> nn.Module:
    return {"prelu": lambda: nn.PReLU(channels), "tanh": nn.Tanh, "relu": lambda: nn.ReLU(inplace=True)}[kind]()


class InversionDecoder(nn.Module):
    """z (C, h, w) or (d,) -> image (C_x, H, W) in [0, 1]: conv stem, log2(H/h) x2 upsamplings, conv head.

    ``stage_hook(channels, size)`` may return a module inserted after each stage (attention blocks)."""

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], channels: int = 128,
                 activation: str = "auto", stage_hook=None):
        super().__init__()
        cx, H, W = image_shape
        self.image_size = (H, W)
        if len(feature_shape) == 1:   # vector features: project to a 4x4 map first
            c_in, h = channels, 4
            self.project = nn.Sequential(nn.Linear(feature_shape[0], channels * 16), nn.Unflatten(1, (channels, 4, 4)))
        else:
            c_in, h = feature_shape[0], feature_shape[1]
            self.project = nn.Identity()
        act = activation if activation != "auto" else ("prelu" if h <= 8 else "tanh")
        n_up = max(0, round(math.log2(max(H, 1) / max(h, 1))))
        c = channels
        layers: list[nn.Module] = [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), make_activation(act, c),
                                   nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), make_activation(act, c)]
        size = h
        if stage_hook:
            layers.append(stage_hook(c, size))
        for _ in range(n_up):
            c_out = max(32, c // 2)
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), make_activation(act, c_out)]
            c, size = c_out, size * 2
            if stage_hook:
                layers.append(stage_hook(c, size))
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, cx, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.project(z))
        if tuple(h.shape[-2:]) != self.image_size:
            h = F.interpolate(h, size=self.image_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(h))


@ATTACKS.register("inverse_network", "decoder attack: conv/deconv inversion network trained on aux (z, x) pairs with MSE")
class InverseNetworkAttack(Attack):
    """Subclasses change ``build_decoder`` (architecture) or ``train_step`` (objective); the fitting loop,
    its progress bar, time budget and per-epoch checkpoints are shared."""

    name = "inverse_network"
    Params = InverseNetworkParams

    def build_decoder(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> nn.Module:
        return InversionDecoder(feature_shape, image_shape, self.params.channels, self.params.activation)

    def setup_training(self, data: DataBundle) -> None:
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=self.params.lr)

    def train_step(self, z: torch.Tensor, x01: torch.Tensor) -> dict[str, float]:
        loss = F.mse_loss(self.decoder(z), x01)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"mse": float(loss.detach())}

    def modules_to_save(self) -> dict[str, Any]:
        return {"decoder": self.decoder, "optimizer": self.optimizer}

    def fit(self, edge: Edge, data: DataBundle) -> dict[str, Any]:
        import time

        edge.eval()
        split = self.fit_split(data)
        torch.manual_seed(self.seed)
        feature_shape = tuple(edge(data.to_model_input(split.images[:1], self.device)).shape[1:])
        self.decoder = self.build_decoder(feature_shape, data.image_shape).to(self.device)
        self.setup_training(data)
        gen = torch.Generator().manual_seed(self.seed)
        start_epoch, last = 0, {}
        ckpt = self.checkpoint_path()
        if ckpt and ckpt.exists():  # resume an interrupted fit
            st = torch.load(ckpt, map_location=self.device, weights_only=True)
            for k, m in self.modules_to_save().items():
                m.load_state_dict(st[k])
            start_epoch, last = st["epoch"], st["last"]
            gen.set_state(st["generator"])
            set_rng_state(st["rng"])
        t0 = time.perf_counter()
        bar = progress(range(start_epoch, self.params.epochs), self.show_progress, desc=f"attack {self.name}",
                       initial=start_epoch, total=self.params.epochs, leave=False)
        epochs_done = start_epoch
        for epoch in bar:
            self.decoder.train()
            sums, n = {}, 0
            for x, _ in data.batches(split, self.params.batch_size, self.device, shuffle=True, generator=gen):
                with torch.no_grad():
                    z = edge(x)   # fresh defense randomness every batch, exactly as the edge sends it
                for k, v in self.train_step(z, data.denormalize(x)).items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
            last = {k: v / max(1, n) for k, v in sums.items()}
            epochs_done = epoch + 1
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
            if ckpt:
                atomic_torch_save({"epoch": epochs_done, "last": last, "generator": gen.get_state(), "rng": rng_state(),
                                   **{k: m.state_dict() for k, m in self.modules_to_save().items()}}, ckpt)
            if self.params.max_seconds is not None and time.perf_counter() - t0 > self.params.max_seconds:
                break
        self.decoder.eval()
        return {"epochs": epochs_done, **{f"train_{k}": v for k, v in last.items()}}

    @torch.no_grad()
    def invert(self, z: torch.Tensor) -> torch.Tensor:
        self.decoder.eval()
        return self.decoder(z)
