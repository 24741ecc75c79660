"""Decoder (inverse-network) attack: a conv/deconv decoder trained on aux pairs (z, x) with MSE
(He et al. 2019; Yang et al. 2019), its shape adapted to the transmitted features."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataBundle, ImageSplit
from ..defenses import Edge
from ..models.decoder import (InversionDecoder, ResidualBlock, TokensToMap, auto_width,  # noqa: F401 (re-exported)
                              make_activation, token_grid)
from ..params import require
from ..precision import MixedPrecision
from ..utils import atomic_torch_save, load_or_none, progress, rng_state, set_rng_state
from .base import ATTACKS, Attack, inference_split, transmitted


@dataclass
class InverseNetworkParams:
    epochs: int = 40                   # see docs/attacks.md for how the default budget was established
    batch_size: int = 64
    lr: float = 1e-3
    beta1: float = 0.9
    weight_decay: float = 1e-4         # decoupled (AdamW)
    schedule: Literal["cosine", "none"] = "cosine"   # per step, over the whole budget
    arch: Literal["residual", "plain", "ir"] = "residual"  # plain: the old 5-layer conv/deconv decoder; ir: reversed IR units (models/ir_decoder.py)
    channels: int | None = None        # width of the first stage; None: clamp(C_in / 2, 64, 256); halved per upsampling (>= 32)
    blocks: int = 4                    # residual blocks before the upsampling stages (residual arch)
    ir_units: int = 2                  # reversed IR units per stage (ir arch)
    activation: Literal["auto", "prelu", "tanh", "relu"] = "auto"  # auto: PReLU for maps <= 8x8 (GPZ), else ReLU (Tanh: plain)
    val_fraction: float = 0.1          # of the attacker's images held out to choose the epoch (never test images)
    select: Literal["best", "last"] = "best"  # keep the epoch with the lowest held-out MSE, or the last one
    max_seconds: float | None = None   # optional time budget for fitting
    max_steps: int | None = None       # optional budget of optimisation steps (batches) for fitting
    # evaluation mode of the CEM reference: "training-time" fits on the aux split and attacks the test split;
    # "inference-time" fits on a seeded fraction (fit_fraction) of the test split and attacks the rest
    # (in a run, one split seeded by the run seed is shared by every attack)
    mode: Literal["training-time", "inference-time"] = "training-time"
    fit_fraction: float = 0.9
    # numeric precision of the fit (issue 12; splitveil/precision.py): autocast bf16/fp16 with float32 weights,
    # optimiser state, losses and metrics; auto: bf16 + channels-last where the device runs bf16 fast, else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    def validate(self) -> None:
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1 or null")
        require(0.0 < self.fit_fraction < 1.0, "fit_fraction", "must be in (0, 1)")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be positive")
        require(0.0 <= self.beta1 < 1.0, "beta1", "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.channels is None or self.channels >= 4, "channels", "must be >= 4 or null")
        require(0 <= self.blocks <= 16, "blocks", "must be in [0, 16]")
        require(self.arch in ("residual", "plain", "ir"), "arch", f"must be residual, plain or ir (got {self.arch!r})")
        require(self.ir_units >= 1, "ir_units", "must be >= 1")
        require(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", "must be auto, fp32, bf16 or fp16")
        require(self.channels_last in (True, False, "auto"), "channels_last", "must be auto, true or false")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine decay of every group's lr from its initial value to 0 over ``total_steps``."""
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


@ATTACKS.register("inverse_network", "decoder attack: residual inversion network trained on aux (z, x) pairs with MSE")
class InverseNetworkAttack(Attack):
    """Subclasses change ``build_decoder`` (architecture), ``setup_training`` (optimisers) or ``train_step``
    (objective); the fitting loop (``train_epochs``), held-out epoch selection, budgets and per-epoch
    checkpoints are shared."""

    Params = InverseNetworkParams

    def _test_parts(self, data: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference-time mode: the run's shared split (``test_split``), or a split seeded by this attack's
        seed when it is used on its own."""
        if self.test_split is not None:
            return self.test_split
        return inference_split(len(data.test), self.params.fit_fraction, self.seed)

    def fit_split(self, data: DataBundle) -> ImageSplit:
        if self.params.mode == "inference-time":
            return data.test.subset(self._test_parts(data)[0])
        return data.aux

    def eval_split(self, data: DataBundle) -> ImageSplit:
        if self.params.mode == "inference-time":
            return data.test.subset(self._test_parts(data)[1])
        return super().eval_split(data)

    def train_val_parts(self, split: ImageSplit) -> tuple[ImageSplit, ImageSplit | None]:
        """The attacker's images split (seeded) into a training part and a held-out ``val_fraction`` part that
        chooses the epoch; no held-out part when val_fraction is 0 or there are fewer than 10 images."""
        n = len(split)
        k = int(round(self.params.val_fraction * n))
        if k < 1 or n < 10:
            return split, None
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 17))
        return split.subset(perm[k:].sort().values), split.subset(perm[:k].sort().values)

    def build_decoder(self, feature_shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> nn.Module:
        p = self.params
        if p.arch == "ir":
            from ..models.ir_decoder import IRInversionDecoder
            c_in = feature_shape[0] if len(feature_shape) == 3 else 256
            return IRInversionDecoder(feature_shape, image_shape, p.channels or auto_width(c_in), p.ir_units)
        return InversionDecoder(feature_shape, image_shape, p.channels if p.arch == "residual" else (p.channels or 128),
                                p.activation, arch=p.arch, blocks=p.blocks)

    def setup_training(self, data: DataBundle, total_steps: int) -> None:
        p = self.params
        self.optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=p.lr, betas=(p.beta1, 0.999), weight_decay=p.weight_decay)
        self.schedulers = [cosine_schedule(self.optimizer, total_steps)] if p.schedule == "cosine" else []

    def calibrate(self, z: torch.Tensor) -> None:
        """Called once before training with transmitted features of (up to 1024) training images."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's output in float32, computed in the fit's precision (autocast) and layout."""
        with self.amp.autocast():
            return self.decoder(self.amp.input(z)).float()

    def train_step(self, z: torch.Tensor, x01: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step; returns detached scalar tensors (read once per epoch: no host sync per step)."""
        loss = F.mse_loss(self.decode(z), x01)   # float32 loss
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.backward_step(loss, self.optimizer)
        return {"mse": loss.detach()}

    def modules_to_save(self) -> dict[str, Any]:
        return {"decoder": self.decoder, "optimizer": self.optimizer,
                **{f"scheduler{i}": s for i, s in enumerate(self.schedulers)}}

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """Decoder weights to start from (a warm start; subclasses), or None for a fresh decoder."""
        return None

    @torch.no_grad()
    def held_out_mse(self, z: torch.Tensor, x01: torch.Tensor) -> float:
        """Per-image MSE of the decoder on held-out (z, x), averaged (eval mode)."""
        self.decoder.eval()
        errs = [((self.decode(zb.to(self.device)).cpu() - xb) ** 2).flatten(1).mean(1)
                for zb, xb in zip(z.split(256), x01.split(256))]
        return float(torch.cat(errs).mean())

    def fit(self, edge: Edge, data: DataBundle) -> dict[str, Any]:
        edge.eval()
        p = self.params
        self.amp = MixedPrecision.create(p.precision, p.channels_last, self.device, field=f"attacks.{self.name}")
        split, val = self.train_val_parts(self.fit_split(data))
        torch.manual_seed(self.seed)
        feature_shape = tuple(edge(data.to_model_input(split.images[:1], self.device)).shape[1:])
        self.decoder = self.build_decoder(feature_shape, data.image_shape).to(self.device)
        init = self.initial_state()
        if init is not None:
            self.decoder.load_state_dict(init)
        else:
            z_cal, _ = transmitted(edge, data, split.subset(torch.arange(min(1024, len(split)))), self.device, self.seed + 5)
            self.calibrate(z_cal.to(self.device))
        self.amp.prepare(self.decoder)
        per_epoch = math.ceil(len(split) / self.params.batch_size)
        total = self.params.epochs * per_epoch
        if self.params.max_steps is not None:
            total = min(total, self.params.max_steps)
        self.setup_training(data, total)
        val_data = transmitted(edge, data, val, self.device, self.seed + 3) if val is not None else None
        info = self.train_epochs(edge, data, split, val_data, warm=init is not None)
        return {**info, "fit_images": len(split), "val_images": len(val) if val is not None else 0, **self.amp.info()}

    def train_epochs(self, edge: Edge, data: DataBundle, split: ImageSplit,
                     val_data: tuple[torch.Tensor, torch.Tensor] | None, warm: bool = False) -> dict[str, Any]:
        """The training loop: epochs of shuffled batches through the edge (fresh defense randomness every
        batch), the lr schedule per step, the held-out MSE after every epoch (the best epoch's weights are
        kept when ``select='best'``), the time/step budgets and a resumable checkpoint after every epoch."""
        p = self.params
        gen = torch.Generator().manual_seed(self.seed)
        start_epoch, last, steps, val_curve = 0, {}, 0, []
        best: tuple[float, int, dict] | None = None
        if warm and val_data is not None:   # a warm start competes too: fine-tuning cannot end worse on held-out data
            best = (self.held_out_mse(*val_data), 0, copy_state(self.decoder))
        ckpt = self.checkpoint_path()
        # resume an interrupted fit (after checking the checkpoint's recorded SHA-256)
        st = load_or_none(ckpt, f"fitting attack {self.name} from its first epoch", self.device)
        if st is not None:
            for k, m in self.modules_to_save().items():
                m.load_state_dict(st[k])
            start_epoch, last, steps, val_curve = st["epoch"], st["last"], st.get("steps", 0), st.get("val_curve", [])
            if st.get("best") is not None:
                best = (st["best_mse"], st["best_epoch"], st["best"])
            gen.set_state(st["generator"])
            set_rng_state(st["rng"])
        t0 = time.perf_counter()
        bar = progress(range(start_epoch, p.epochs), self.show_progress, desc=f"attack {self.name}",
                       initial=start_epoch, total=p.epochs, leave=False)
        epochs_done = start_epoch
        max_steps = p.max_steps
        encoded = EncodedSplit.build(edge, data, split, self.device) if p.epochs - start_epoch > 1 else None
        for epoch in bar:
            if max_steps is not None and steps >= max_steps:
                break
            self.decoder.train()
            sums, n = {}, 0
            batches = (encoded.batches(p.batch_size, gen) if encoded is not None
                       else ((edge(x), data.denormalize(x))
                             for x, _ in data.batches(split, p.batch_size, self.device, shuffle=True, generator=gen)))
            for z, x01 in batches:   # fresh defense randomness every batch, exactly as the edge sends it
                for k, v in self.train_step(z, x01).items():   # tensors stay on the device
                    v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                    sums[k] = sums[k] + v if k in sums else v
                for s in self.schedulers:
                    s.step()
                n += 1
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            last = {k: float(v) / max(1, n) for k, v in sums.items()}   # one read per epoch
            epochs_done = epoch + 1
            if val_data is not None:
                v = self.held_out_mse(*val_data)
                val_curve.append(v)
                if best is None or v < best[0]:
                    best = (v, epochs_done, copy_state(self.decoder))
            bar.set_postfix({**{k: f"{v:.4f}" for k, v in last.items()}, **({"val": f"{val_curve[-1]:.4f}"} if val_curve else {})})
            if ckpt:
                atomic_torch_save({"epoch": epochs_done, "last": last, "steps": steps, "val_curve": val_curve,
                                   "generator": gen.get_state(), "rng": rng_state(),
                                   "best": best[2] if best else None, "best_mse": best[0] if best else None,
                                   "best_epoch": best[1] if best else None,
                                   **{k: m.state_dict() for k, m in self.modules_to_save().items()}}, ckpt)
            if p.max_seconds is not None and time.perf_counter() - t0 > p.max_seconds:
                break
        out = {"epochs": epochs_done, "steps": steps, **{f"train_{k}": v for k, v in last.items()}}
        if val_curve:
            out["val_curve"] = [round(v, 6) for v in val_curve]
            out["last_val_mse"] = val_curve[-1]
        if best is not None and p.select == "best":
            self.decoder.load_state_dict(best[2])
            out.update(best_epoch=best[1], val_mse=best[0])
        elif val_curve:
            out.update(best_epoch=epochs_done, val_mse=val_curve[-1])
        self.decoder.eval()
        self.amp.release(self.decoder)   # the default layout for whoever uses the fitted decoder next
        return out

    def selected_state(self) -> dict[str, torch.Tensor]:
        """The fitted decoder's (selected) weights."""
        return copy_state(self.decoder)

    @torch.no_grad()
    def invert(self, z: torch.Tensor) -> torch.Tensor:
        self.decoder.eval()
        return self.decode(z)


class EncodedSplit:
    """The attacker's images encoded once: the encoder's (eval-mode, deterministic) output for every image of a
    split, kept with the split's uint8 images. Each batch then draws only the defenses' randomness (noise,
    dropout masks) afresh, so what the attacker trains on is exactly what the edge would send for those images,
    without running the encoder again every epoch (issue 23: the encoder pass was the same in every epoch).

    The batches follow ``DataBundle.batches(shuffle=True)`` exactly: the same permutation from the same
    generator, the same [0, 1] targets (``denormalize(to_model_input(u8))``), and the defenses' transform draws
    from the global RNG in the same order as ``edge(x)`` did."""

    def __init__(self, edge: Edge, data: DataBundle, split: ImageSplit, z_clean: torch.Tensor):
        self.edge, self.data, self.split, self.z_clean = edge, data, split, z_clean

    @classmethod
    @torch.no_grad()
    def build(cls, edge: nn.Module, data: DataBundle, split: ImageSplit, device: torch.device,
              batch_size: int = 256) -> "EncodedSplit | None":
        """None when ``edge`` is not an :class:`Edge` (nothing to separate) or the split is empty."""
        if not isinstance(edge, Edge) or len(split) == 0:
            return None
        was = edge.training
        edge.eval()
        try:
            z = torch.cat([edge.encoder(x) for x, _ in data.batches(split, batch_size, device)])
        finally:
            edge.train(was)
        return cls(edge, data, split, z)

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            with torch.no_grad():
                z = self.edge.defenses.transform(self.z_clean[idx.to(self.z_clean.device)], training=self.edge.training)
            x01 = self.data.denormalize(self.data.to_model_input(self.split.images[idx], self.z_clean.device))
            yield z, x01


def copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
