"""Decoder (inverse-network) attack: a conv/deconv decoder trained on aux pairs (z, x) with MSE
(He et al. 2019; Yang et al. 2019), its shape adapted to the transmitted features."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataBundle, ImageSplit
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
    max_steps: int | None = None       # optional budget of optimisation steps (batches) for fitting
    # evaluation mode of the CEM reference: "training-time" fits on the aux split and attacks the test split;
    # "inference-time" fits on a seeded fraction (fit_fraction) of the test split and attacks the rest
    mode: Literal["training-time", "inference-time"] = "training-time"
    fit_fraction: float = 0.5

    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        require(0.0 < self.fit_fraction < 1.0, "fit_fraction", "must be in (0, 1)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be positive")
        require(self.channels >= 4, "channels", "must be >= 4")


def make_activation(kind: str, channels: int) -> nn.Module:
    return {"prelu": lambda: nn.PReLU(channels), "tanh": nn.Tanh, "relu": lambda: nn.ReLU(inplace=True)}[kind]()


def token_grid(n_tokens: int) -> int:
    """Side of the square patch grid of ``n_tokens`` transformer tokens (n = side^2, or 1 + side^2 with a class
    token first); 0 if there is none."""
    for n in (n_tokens, n_tokens - 1):
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return side
    return 0


class TokensToMap(nn.Module):
    """Tokens (N, T, dim) -> map (N, dim, side, side): drops a leading class token, patch tokens row-major."""

    def __init__(self, n_tokens: int, side: int):
        super().__init__()
        self.skip, self.side = n_tokens - side * side, side

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, self.skip:].transpose(1, 2).reshape(z.shape[0], z.shape[2], self.side, self.side)


class InversionDecoder(nn.Module):
    """z (C, h, w), tokens (T, dim) or (d,) -> image (C_x, H, W) in [0, 1]: conv stem, log2(H/h) x2 upsamplings, conv head.

    ``stage_hook(channels, size)`` may return a module inserted after each stage (attention blocks)."""

    def __init__(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int], channels: int = 128,
                 activation: str = "auto", stage_hook=None):
        super().__init__()
        cx, H, W = image_shape
        self.image_size = (H, W)
        if len(feature_shape) == 2 and token_grid(feature_shape[0]):  # ViT tokens (T, dim): patch tokens -> map
            side = token_grid(feature_shape[0])
            c_in, h = feature_shape[1], side
            self.project = TokensToMap(feature_shape[0], side)
        elif len(feature_shape) <= 2:   # vector features (or tokens without a square grid): project to a 4x4 map
            c_in, h = channels, 4
            n_in = math.prod(feature_shape)
            self.project = nn.Sequential(nn.Flatten(), nn.Linear(n_in, channels * 16), nn.Unflatten(1, (channels, 4, 4)))
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

    def _test_parts(self, data: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference-time mode: a seeded split of the test indices into (fit, eval) positions."""
        n = len(data.test)
        k = min(n - 1, max(1, round(self.params.fit_fraction * n)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[:k].sort().values, perm[k:].sort().values

    def fit_split(self, data: DataBundle) -> ImageSplit:
        if self.params.mode == "inference-time":
            return data.test.subset(self._test_parts(data)[0])
        return data.aux

    def eval_split(self, data: DataBundle) -> ImageSplit:
        if self.params.mode == "inference-time":
            return data.test.subset(self._test_parts(data)[1])
        return data.test

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
        start_epoch, last, steps = 0, {}, 0
        ckpt = self.checkpoint_path()
        if ckpt and ckpt.exists():  # resume an interrupted fit
            st = torch.load(ckpt, map_location=self.device, weights_only=True)
            for k, m in self.modules_to_save().items():
                m.load_state_dict(st[k])
            start_epoch, last, steps = st["epoch"], st["last"], st.get("steps", 0)
            gen.set_state(st["generator"])
            set_rng_state(st["rng"])
        t0 = time.perf_counter()
        bar = progress(range(start_epoch, self.params.epochs), self.show_progress, desc=f"attack {self.name}",
                       initial=start_epoch, total=self.params.epochs, leave=False)
        epochs_done = start_epoch
        max_steps = self.params.max_steps
        for epoch in bar:
            if max_steps is not None and steps >= max_steps:
                break
            self.decoder.train()
            sums, n = {}, 0
            for x, _ in data.batches(split, self.params.batch_size, self.device, shuffle=True, generator=gen):
                with torch.no_grad():
                    z = edge(x)   # fresh defense randomness every batch, exactly as the edge sends it
                for k, v in self.train_step(z, data.denormalize(x)).items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            last = {k: v / max(1, n) for k, v in sums.items()}
            epochs_done = epoch + 1
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
            if ckpt:
                atomic_torch_save({"epoch": epochs_done, "last": last, "steps": steps, "generator": gen.get_state(), "rng": rng_state(),
                                   **{k: m.state_dict() for k, m in self.modules_to_save().items()}}, ckpt)
            if self.params.max_seconds is not None and time.perf_counter() - t0 > self.params.max_seconds:
                break
        self.decoder.eval()
        return {"epochs": epochs_done, "steps": steps, "fit_images": len(split), **{f"train_{k}": v for k, v in last.items()}}

    @torch.no_grad()
    def invert(self, z: torch.Tensor) -> torch.Tensor:
        self.decoder.eval()
        return self.decoder(z)
