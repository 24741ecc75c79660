"""GAN inversion: the inverse-network decoder (the generator) trained with a weighted reconstruction loss
plus an adversarial loss from a WGAN-GP critic on the attacker's aux images (Gulrajani et al. 2017),
initialised from a fitted inverse network by default (the run's own when it has one), fine-tuned with cosine
schedules on both optimisers; every critic update draws a fresh batch of the attacker's data.

Generator objective: rec_weight * MSE(G(z), x) - adv_weight * D(G(z)); with adv_weight = 0 it is the inverse
network's objective (scaled by rec_weight). Critic objective: D(G(z)) - D(x) + gp_weight * (||grad D(x_mix)|| - 1)^2.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataBundle, ImageSplit
from ..defenses import Edge
from ..params import require
from ..utils import load_or_none, verify_file
from .base import ATTACKS
from .inverse_network import InverseNetworkAttack, InverseNetworkParams, cosine_schedule


@dataclass
class GanParams(InverseNetworkParams):
    epochs: int = 10            # fine-tuning epochs after the warm start
    lr: float = 2e-4            # generator (decoder) Adam lr; beta1 0.5 (GPZ / DCGAN practice), cosine schedule
    beta1: float = 0.5
    rec_weight: float = 1.0     # weight of the reconstruction (MSE) loss
    adv_weight: float = 1e-3    # weight of the adversarial loss; 0 reduces to the inverse network objective
    critic_lr: float = 1e-4     # WGAN-GP paper: Adam lr 1e-4, betas (0, 0.9), 5 critic steps, lambda 10
    critic_beta1: float = 0.0
    critic_beta2: float = 0.9
    n_critic: int = 5           # critic updates per generator update, each on a fresh batch of the attacker's data
    gp_weight: float = 10.0
    critic_channels: int = 64
    init_from_inverse: bool = True   # start from a fitted inverse network (the run's, if shape-compatible)
    init_epochs: int | None = None   # epochs of the inverse network fitted first when the run has none (None: its default)

    def validate(self) -> None:
        super().validate()
        require(self.rec_weight >= 0 and self.adv_weight >= 0, "adv_weight", "weights must be >= 0")
        require(self.rec_weight > 0 or self.adv_weight > 0, "rec_weight", "rec_weight and adv_weight cannot both be 0")
        require(self.critic_lr > 0, "critic_lr", "must be positive")
        require(self.n_critic >= 1, "n_critic", "must be >= 1")
        require(self.gp_weight >= 0, "gp_weight", "must be >= 0")
        require(self.critic_channels >= 4, "critic_channels", "must be >= 4")
        require(self.init_epochs is None or self.init_epochs >= 1, "init_epochs", "must be >= 1 or null")


class Critic(nn.Module):
    """WGAN critic on [0, 1] images: strided convs with LayerNorm-free leaky ReLUs (no BatchNorm: the gradient
    penalty is per sample), then a linear score."""

    def __init__(self, image_shape: tuple[int, int, int], channels: int = 64):
        super().__init__()
        cx, h, w = image_shape
        layers: list[nn.Module] = []
        c_in, c, size = cx, channels, min(h, w)
        while size > 4:
            layers += [nn.Conv2d(c_in, c, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            c_in, c, size = c, min(4 * channels, c * 2), size // 2
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.LeakyReLU(0.2, inplace=True), nn.AdaptiveAvgPool2d(1),
                   nn.Flatten(), nn.Linear(c_in, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net(x01 * 2 - 1).flatten()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


@ATTACKS.register("gan", "decoder trained with reconstruction loss + WGAN-GP adversarial loss (critic on aux images), "
                  "warm-started from the fitted inverse network")
class GanAttack(InverseNetworkAttack):
    Params = GanParams

    _init_state: dict | None = None

    def score(self, x01: torch.Tensor) -> torch.Tensor:
        """Critic scores in float32, the critic run in the fit's precision (autocast) and layout."""
        with self.amp.autocast():
            return self.critic(self.amp.input(x01)).float()

    def generator_loss(self, x_hat: torch.Tensor, x01: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec = F.mse_loss(x_hat, x01)   # float32 (x_hat is the decoder's float32 output)
        if self.params.adv_weight == 0:
            return self.params.rec_weight * rec, {"mse": rec.detach()}
        adv = -self.score(x_hat).mean()
        loss = self.params.rec_weight * rec + self.params.adv_weight * adv
        return loss, {"mse": rec.detach(), "g_adv": adv.detach()}

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        return self._init_state

    def setup_training(self, data: DataBundle, total_steps: int) -> None:
        p = self.params
        super().setup_training(data, total_steps)   # generator: AdamW + schedule
        self.critic = self.amp.prepare(Critic(data.image_shape, p.critic_channels).to(self.device))
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=p.critic_lr, betas=(p.critic_beta1, p.critic_beta2))
        if p.schedule == "cosine" and p.adv_weight > 0:
            self.schedulers.append(cosine_schedule(self.critic_optimizer, total_steps))

    def _critic_stream(self, edge: Edge, data: DataBundle, split: ImageSplit) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless shuffled batches (z as the edge sends it, x in [0, 1]) of the attacker's training images,
        independent of the generator's batches: every critic step sees a fresh batch."""
        gen = torch.Generator().manual_seed(self.seed + 23)
        while True:
            for x, _ in data.batches(split, self.params.batch_size, self.device, shuffle=True, generator=gen):
                with torch.no_grad():
                    z = edge(x)
                yield z, data.denormalize(x)

    def train_epochs(self, edge, data, split, val_data, warm=False):
        self._stream = self._critic_stream(edge, data, split)
        return super().train_epochs(edge, data, split, val_data, warm)

    def critic_step(self) -> dict[str, torch.Tensor]:
        z, real = next(self._stream)
        with torch.no_grad():
            fake = self.decode(z)
        wdist = self.score(real).mean() - self.score(fake).mean()
        gp = gradient_penalty(self.critic, real, fake)   # float32, outside autocast (a double backward)
        d_loss = -wdist + self.params.gp_weight * gp
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.amp.backward_step(d_loss, self.critic_optimizer)
        return {"d_loss": d_loss.detach(), "wdist": wdist.detach(), "gp": gp.detach()}

    def train_step(self, z: torch.Tensor, x01: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.params
        d_info: dict[str, torch.Tensor] = {}
        if p.adv_weight > 0:   # with adv_weight 0 the critic cannot change the generator: not trained
            for _ in range(p.n_critic):
                d_info = self.critic_step()
            for q in self.critic.parameters():
                q.requires_grad_(False)
        loss, info = self.generator_loss(self.decode(z), x01)
        self.optimizer.zero_grad(set_to_none=True)
        self.amp.backward_step(loss, self.optimizer)
        if p.adv_weight > 0:
            for q in self.critic.parameters():
                q.requires_grad_(True)
        return {**info, "g_loss": loss.detach(), **d_info}

    def modules_to_save(self) -> dict[str, Any]:
        return {**super().modules_to_save(), "critic": self.critic, "critic_optimizer": self.critic_optimizer}

    def fit(self, edge: Edge, data: DataBundle) -> dict[str, Any]:
        self._init_state, info = None, {}
        own = self.checkpoint_path()
        if self.params.init_from_inverse and not (own and verify_file(own) is None):
            self._init_state, info = self._inverse_init(edge, data)
        out = super().fit(edge, data)
        return {**out, **info}

    def _inverse_init(self, edge: Edge, data: DataBundle) -> tuple[dict, dict[str, Any]]:
        """Decoder weights of a fitted inverse network: the run's ``attack_inverse_network.pt`` (its selected
        epoch) when it has the same architecture, else a fresh inverse network with this decoder's
        architecture fitted here (``init_epochs``, default the inverse network's default budget)."""
        p = self.params
        prev = self.workdir / "attack_inverse_network.pt" if self.workdir else None
        st = load_or_none(prev, "fitting an inverse network for the start here", self.device)
        if st is not None:
            state = st.get("best") or st["decoder"]
            with torch.no_grad():
                z0 = edge(data.to_model_input(self.fit_split(data).images[:1], self.device))
            probe = self.build_decoder(tuple(z0.shape[1:]), data.image_shape)
            if {k: v.shape for k, v in probe.state_dict().items()} == {k: v.shape for k, v in state.items()}:
                return state, {"init": "run's inverse_network"}
        shared = {f.name: getattr(p, f.name) for f in fields(InverseNetworkParams)}
        defaults = InverseNetworkParams()
        shared.update(epochs=p.init_epochs or defaults.epochs, lr=defaults.lr, beta1=defaults.beta1)
        inv = InverseNetworkAttack(InverseNetworkParams(**shared), device=self.device, seed=self.seed,
                                   show_progress=self.show_progress)
        inv.test_split = self.test_split
        inv.fit(edge, data)
        return inv.selected_state(), {"init": f"inverse_network fitted {shared['epochs']} epochs"}
