"""Adversarial representation learning (ARL) against inversion: a simulated inversion decoder is trained
alongside the model to reconstruct x from the transmitted features, and the encoder gets a loss term that
keeps that decoder's reconstruction poor.

"Noise-ARL" is this defense composed with noise on the features, ``name: [gaussian_noise, noise_arl]``: the
simulated decoder always sees the transmitted features (after every transform, noise included).

Schedule: during the first ``pretrain_epochs`` epochs only the decoder learns (the encoder trains on the
task alone); afterwards every encoder step adds ``weight * term`` and is followed by ``decoder_steps``
updates of the decoder (its own Adam optimizer, not the model's) on the batch's transmitted features.
The term is the decoder's PSNR in bels, ``-log10 MSE(decoder(z), x)`` (objective ``psnr``, the default: its
gradient does not vanish as the decoder gets good), ``-MSE(decoder(z), x)`` (objective ``mse``: reward the
decoder's error directly) or ``relu(SSIM(decoder(z), x) - ssim_threshold)`` (objective ``ssim``: penalise a
similarity above a threshold, as in ResSFL-style attacker-aware training).
The decoder is :class:`splitveil.models.decoder.InversionDecoder`, the decoder attacks' architecture."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..metrics.image import ssim_per_image
from ..models.decoder import InversionDecoder
from ..params import ConfigError, require
from .base import DEFENSES, Defense, StepContext


@dataclass
class NoiseARLParams:
    weight: float = 1.0                          # weight of the privacy term in the encoder's loss
    objective: Literal["psnr", "mse", "ssim"] = "psnr"  # psnr: -log10 MSE; mse: -MSE; ssim: relu(SSIM - threshold)
    ssim_threshold: float = 0.3
    decoder_steps: int = 1                       # decoder updates per encoder step
    pretrain_epochs: int = 1                     # epochs in which only the decoder learns (no privacy term)
    decoder_lr: float = 1e-3
    channels: int = 64                           # width of the simulated decoder's first stage
    activation: Literal["auto", "prelu", "tanh", "relu"] = "auto"

    def validate(self) -> None:
        require(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}")
        require(-1.0 <= self.ssim_threshold <= 1.0, "ssim_threshold", "must be in [-1, 1]")
        require(self.decoder_steps >= 1, "decoder_steps", "must be >= 1")
        require(self.pretrain_epochs >= 0, "pretrain_epochs", "must be >= 0")
        require(self.decoder_lr > 0, "decoder_lr", "must be positive")
        require(self.channels >= 4, "channels", "must be >= 4")


@DEFENSES.register("noise_arl", "adversarial representation learning: a simulated inversion decoder is trained "
                                "alongside; the encoder keeps its reconstruction poor (params: weight, objective)")
class NoiseARL(Defense):
    Params = NoiseARLParams

    needs_fixed_features = True   # the simulated decoder is built for the feature shape at setup

    def setup(self, ctx) -> None:
        p, data = self.params, ctx.data
        self.feature_shape = tuple(ctx.model.feature_shape)
        self.decoder = InversionDecoder(self.feature_shape, data.image_shape, p.channels, p.activation).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=p.decoder_lr)
        self._denormalize = data.denormalize
        self.decoder_mse: list[float] = []   # per epoch: mean MSE of the decoder on the training features
        self._sum, self._n = 0.0, 0

    def trainable_parameters(self):
        return []   # the decoder has its own optimizer; the model's optimizer never sees it

    def _check(self, z: torch.Tensor) -> None:
        if tuple(z.shape[1:]) != self.feature_shape:
            raise ConfigError(f"defense.noise_arl: the transmitted features changed shape from {self.feature_shape} "
                              f"to {tuple(z.shape[1:])} (patrol with prune_output?); the simulated decoder cannot "
                              "follow: use patrol.prune_output: false with noise_arl")

    def privacy_term(self, x_hat: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
        if self.params.objective == "psnr":
            return -torch.log10(F.mse_loss(x_hat, x01).clamp_min(1e-10))
        if self.params.objective == "mse":
            return -F.mse_loss(x_hat, x01)
        return F.relu(ssim_per_image(x_hat, x01).mean() - self.params.ssim_threshold).to(x_hat.dtype)

    def loss(self, step: StepContext) -> dict[str, torch.Tensor]:
        if step.epoch < self.params.pretrain_epochs or self.params.weight == 0:
            return {}
        self._check(step.z_sent)
        for q in self.decoder.parameters():   # the term trains the encoder only
            q.requires_grad_(False)
        x_hat = self.decoder(step.z_sent)
        return {"adv": self.params.weight * self.privacy_term(x_hat, self._denormalize(step.x))}

    def after_step(self, step: StepContext, ctx) -> None:
        for q in self.decoder.parameters():
            q.requires_grad_(True)
        self._check(step.z_sent)
        z, x01 = step.z_sent.detach(), self._denormalize(step.x)
        self.decoder.train()
        for i in range(self.params.decoder_steps):
            loss = F.mse_loss(self.decoder(z), x01)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if i == 0:   # the decoder's error on these features before it learns from them
                self._sum += float(loss.detach())
                self._n += 1

    def on_epoch_start(self, ctx, epoch: int) -> None:
        self._sum, self._n = 0.0, 0

    def on_epoch_end(self, ctx, epoch: int) -> None:
        if self._n:
            self.decoder_mse.append(self._sum / self._n)

    # the decoder's optimizer and history travel with the checkpoint (plain tensors and numbers only)
    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "decoder_mse": list(self.decoder_mse)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.decoder_mse = list(state["decoder_mse"])

    def info(self) -> dict[str, Any]:
        return {"decoder_mse_per_epoch": [round(v, 6) for v in self.decoder_mse]}
