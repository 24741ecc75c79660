"""White-box regularised maximum-likelihood inversion (rMLE, He et al. 2019).

For each transmitted z, optimise an image x_hat in [0, 1] (from a neutral start) with Adam, the edge frozen:

    min_x  E_noise ||edge(x) - z||^2 / ||z||^2  +  lambda_TV * TV(x)

The feature distance is the expectation over ``noise_samples`` draws of the deployed edge's own randomness
(noise, dropout): the attacker runs the defended edge exactly as deployed. It is normalised by ||z||^2 so
that one lambda_TV suits every cut. TV is the anisotropic total variation (mean absolute difference of
neighbouring pixels). Images are optimised in batches, each image independently of the others.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..data import DataBundle
from ..defenses import Edge
from ..params import require
from ..utils import atomic_torch_save, progress
from .base import ATTACKS, Attack


@dataclass
class RmleParams:
    steps: int = 500                 # Adam steps per batch of images
    lr: float = 0.05                 # Adam learning rate on [0, 1] pixel values
    tv_weight: float = 0.01          # lambda_TV
    batch_size: int = 128            # images optimised together (independently)
    init: Literal["gray", "mean_aux", "zeros", "uniform"] = "gray"   # the neutral start
    noise_samples: int = 8           # draws of the edge's randomness per step; 1 when the edge is deterministic
    max_seconds: float | None = None  # optional time budget per batch of images

    def validate(self) -> None:
        require(self.steps >= 1, "steps", "must be >= 1")
        require(self.lr > 0, "lr", "must be positive")
        require(self.tv_weight >= 0, "tv_weight", "must be >= 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.noise_samples >= 1, "noise_samples", "must be >= 1")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per image: mean |x[i+1, j] - x[i, j]| + mean |x[i, j+1] - x[i, j]| (over channels too)."""
    n = x.shape[0]
    tv = x.new_zeros(n)
    if x.shape[-2] > 1:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().reshape(n, -1).mean(1)
    if x.shape[-1] > 1:
        tv = tv + (x[..., :, 1:] - x[..., :, :-1]).abs().reshape(n, -1).mean(1)
    return tv


@ATTACKS.register("rmle", "white-box rMLE: optimise x_hat with Adam to match the transmitted features, TV prior, "
                  "expected loss over the edge's noise")
class RmleAttack(Attack):
    name = "rmle"
    Params = RmleParams

    def fit(self, edge: Edge, data: DataBundle) -> dict[str, Any]:
        """Nothing is trained: keep the frozen edge, the normalisation and the start image; check whether the
        edge is random (then the expected loss uses ``noise_samples`` draws)."""
        self.edge = edge.eval()
        self.data = data
        shape = data.image_shape
        aux01 = self.fit_split(data).images.float() / 255.0
        self.start = {"gray": torch.full(shape, 0.5), "mean_aux": aux01.mean(0), "zeros": torch.zeros(shape),
                      "uniform": None}[self.params.init]
        with torch.no_grad():
            x = data.to_model_input(self.fit_split(data).images[:2], self.device)
            self.random_edge = not torch.equal(edge(x), edge(x))
        self.samples = self.params.noise_samples if self.random_edge else 1
        self._batch = 0
        return {"random_edge": self.random_edge, "noise_samples": self.samples}

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._resumable(zb.to(self.device)) for zb in z.split(self.params.batch_size)])

    def _resumable(self, z: torch.Tensor) -> torch.Tensor:
        """Finished batches are checkpointed (keyed by batch number and a fingerprint of z), so an interrupted
        run resumes after the last finished batch instead of re-optimising it."""
        ckpt = self.checkpoint_path()
        key = (self._batch, z.shape[0], float(z.double().sum()), float(z.double().abs().sum()))
        state = torch.load(ckpt, weights_only=True) if ckpt and ckpt.exists() else {"batches": []}
        for k, x in state["batches"]:
            if tuple(k) == key:
                self._batch += 1
                return x.to(self.device)
        x = self._optimise(z)
        if ckpt:
            state["batches"].append((list(key), x.cpu()))
            atomic_torch_save(state, ckpt)
        return x

    def _optimise(self, z: torch.Tensor) -> torch.Tensor:
        p, n = self.params, z.shape[0]
        gen = torch.Generator().manual_seed(self.seed + self._batch)
        self._batch += 1
        shape = self.data.image_shape
        if self.start is None:
            x0 = torch.rand(n, *shape, generator=gen)
        else:
            x0 = self.start.expand(n, *shape)
        x = x0.clone().to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=p.lr)
        s = self.samples
        zt = z.repeat(s, *[1] * (z.dim() - 1))
        znorm = z.flatten(1).pow(2).sum(1).clamp_min(1e-8)
        t0 = time.perf_counter()
        bar = progress(range(p.steps), self.show_progress, desc=f"attack {self.name} batch {self._batch}", leave=False)
        with torch.enable_grad(), torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed + self._batch)
            for step in bar:
                xin = self.data.normalize(x)
                feat = self.edge(xin.repeat(s, 1, 1, 1) if s > 1 else xin)
                dist = (feat - zt).flatten(1).pow(2).sum(1).view(s, n).mean(0) / znorm
                loss = (dist + p.tv_weight * total_variation(x)).sum()
                x.grad, = torch.autograd.grad(loss, x)
                opt.step()
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
                if step % 50 == 0:
                    bar.set_postfix(feat=f"{float(dist.detach().mean()):.4f}")
                if p.max_seconds is not None and time.perf_counter() - t0 > p.max_seconds:
                    break
        return x.detach()
