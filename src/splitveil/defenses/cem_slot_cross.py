"""CEM with a Slot Attention + gated cross-attention surrogate (the proposal; DESIGN.md section 3).

Per class c of the batch, the class's samples are tokens (one flat feature vector each, LayerNormed and
projected to ``slot_dim``). Slot Attention (Locatello et al. 2020) aggregates them into S slots over T
iterations (softmax over slots, weighted mean over tokens, GRU + MLP update, scale ``temperature``, default
slot_dim^-1/2); all classes run in one batched pass, with class masks. Slot initialisation is a learned
per-slot embedding (deterministic, so the module is exactly permutation invariant over the batch).
A Flamingo-style gated cross-attention block then refines the slots against the class's tokens:
    y = s + tanh(alpha_attn) CrossAttn(LN(s), tokens);   y = y + tanh(alpha_ffn) FFN(LN(y)),
with alpha_* initialised at ``gate_init`` (near 0: the refined slots start as the plain slots).
Soft assignments r_ms = softmax_s(beta cos(k_m, y_s)) give per-slot masses, means and per-dimension variances
of the *raw* features (the noise threshold is in raw units). The loss of class c is
    L_c = sum_s g_mass(s) mean_d [ g_dim(s,d) g_snr(s,d) softplus_beta'(log(clip(var_sd) + gamma) - log tau - m) ]
and L_C = sum_c g_class(c) L_c / #present classes, with the switchable gates of the slides:
  - per-dim gate  g_dim = sigmoid(MLP(LayerNorm(log var_s))), rescaled to mean 1 over dimensions (it moves
    the penalty between dimensions, it cannot scale it away);
  - SNR gate      g_snr = sigmoid(kappa (var / (mu^2 + eps) - snr_tau));
  - slot-mass gate g_mass = (mass_s / M_c)^mass_power (mass_power 1: the mixture weight pi_s);
  - class gate    g_class = sigmoid(a (M_c / B - b)), which down-weights classes with very few samples.
The SNR, mass and class gates are weights computed from detached statistics.
Warm-up (``warmup_epochs``), early shut-off (``shutoff_epoch``), variance clipping (``var_min``, ``var_max``)
and the non-finite guard (counted in ``info()['nonfinite_skipped']``) are switchable.

How the surrogate's own parameters are trained: all of them are in the trainer's optimizer (the same optimizer
as the model). With ``surrogate_update: fit`` (default) the slot/cross-attention part sees detached features
and is trained on a fitting term only, ``fit_weight`` * the soft k-means distortion
sum_s (mass_s/M_c) mean_d var_sd (the analogue of the GMM's EM refit), reported as the ``fit`` loss term;
the penalty's gradient reaches the encoder through the statistics only (assignments detached), and the
per-dim gate receives the penalty gradient reversed (it seeks the dimensions with the largest excess
spread). With ``surrogate_update: joint`` everything, surrogate included, simply minimises the total loss
(the literal reading of the slides; the surrogate can then lower the term by itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..params import require
from .base import DEFENSES
from .cem_common import (CEMDefense, CEMParams, class_masks, flat, grad_reverse, softplus_margin,
                         weighted_stats)


@dataclass
class CEMSlotCrossParams(CEMParams):
    slots: int = 8                    # S
    iters: int = 3                    # T
    slot_dim: int = 64
    heads: int = 4                    # cross-attention heads
    temperature: float | None = None  # slot attention logit scale; null: slot_dim^-1/2
    beta: float = 5.0                 # assignment sharpness on cosine similarity
    gate_init: float = 0.01           # initial alpha of the tanh gates
    sharpness: float = 5.0            # beta' of the softplus margin
    margin: float = 0.0               # m in log var - log tau - m
    var_min: float = 1e-6             # variance clipping
    var_max: float = 1e4
    dim_gate: bool = True
    dim_gate_hidden: int = 64
    snr_gate: bool = True
    snr_kappa: float = 5.0
    snr_tau: float = 1.0
    mass_gate: bool = True
    mass_power: float = 1.0
    class_gate: bool = True
    class_a: float = 50.0
    class_b: float = 0.02
    shutoff_epoch: int | None = None  # epoch from which the term is off again (early shut-off); null: never
    surrogate_update: Literal["fit", "joint"] = "fit"
    fit_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        for f in ("slots", "iters", "slot_dim", "heads", "dim_gate_hidden"):
            require(getattr(self, f) >= 1, f, "must be >= 1")
        require(self.slot_dim % self.heads == 0, "heads", "must divide slot_dim")
        require(0 < self.var_min < self.var_max, "var_min", "must satisfy 0 < var_min < var_max")
        require(self.beta > 0 and self.sharpness > 0, "beta", "beta and sharpness must be positive")
        require(self.temperature is None or self.temperature > 0, "temperature", "must be positive or null")
        require(self.fit_weight >= 0, "fit_weight", "must be >= 0")


class SlotCrossSurrogate(nn.Module):
    """Slot Attention over each class's tokens, refined by gated cross-attention; returns soft assignments."""

    def __init__(self, dim: int, p: CEMSlotCrossParams):
        super().__init__()
        sd = p.slot_dim
        self.p = p
        self.scale = p.temperature if p.temperature is not None else sd ** -0.5
        self.norm_in = nn.LayerNorm(dim)
        self.to_k = nn.Linear(dim, sd)
        self.to_v = nn.Linear(dim, sd)
        self.slots_init = nn.Parameter(torch.randn(p.slots, sd) * sd ** -0.5)
        self.norm_slots = nn.LayerNorm(sd)
        self.to_q = nn.Linear(sd, sd, bias=False)
        self.gru = nn.GRUCell(sd, sd)
        self.norm_mlp = nn.LayerNorm(sd)
        self.mlp = nn.Sequential(nn.Linear(sd, 2 * sd), nn.ReLU(), nn.Linear(2 * sd, sd))
        self.norm_x = nn.LayerNorm(sd)
        self.xattn = nn.MultiheadAttention(sd, p.heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(sd)
        self.ffn = nn.Sequential(nn.Linear(sd, 2 * sd), nn.GELU(), nn.Linear(2 * sd, sd))
        self.alpha_attn = nn.Parameter(torch.tensor(float(p.gate_init)))
        self.alpha_ffn = nn.Parameter(torch.tensor(float(p.gate_init)))
        if p.dim_gate:
            self.norm_gate = nn.LayerNorm(dim)
            self.gate_mlp = nn.Sequential(nn.Linear(dim, p.dim_gate_hidden), nn.ReLU(), nn.Linear(p.dim_gate_hidden, dim))

    def tokens(self, z: torch.Tensor):
        x = self.norm_in(z)
        return self.to_k(x), self.to_v(x)

    def slot_attention(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Plain slots (C, S, sd) of each class (rows of ``mask`` (C, N))."""
        C, S, sd = mask.shape[0], self.p.slots, k.shape[1]
        slots = self.slots_init.unsqueeze(0).expand(C, S, sd)
        for _ in range(self.p.iters):
            prev = slots
            q = self.to_q(self.norm_slots(slots))
            attn = torch.softmax(self.scale * q @ k.t(), dim=1) * mask.unsqueeze(1)       # softmax over slots
            w = attn / attn.sum(-1, keepdim=True).clamp_min(1e-8)                          # mean over tokens
            slots = self.gru((w @ v).reshape(-1, sd), prev.reshape(-1, sd)).view(C, S, sd)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots

    def refine(self, slots: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gated cross-attention: the slots (queries) attend to their class's tokens (keys/values)."""
        C = slots.shape[0]
        kv = k.unsqueeze(0).expand(C, -1, -1)
        pad = (mask == 0) & (mask.sum(1, keepdim=True) > 0)          # an absent class attends to all (weight 0)
        att, _ = self.xattn(self.norm_x(slots), kv, kv, key_padding_mask=pad, need_weights=False)
        y = slots + torch.tanh(self.alpha_attn) * att
        return y + torch.tanh(self.alpha_ffn) * self.ffn(self.norm_ffn(y))

    def forward(self, z: torch.Tensor, mask: torch.Tensor):
        """Soft assignments r (C, S, N) (zero outside each class), plain and refined slots."""
        k, v = self.tokens(z)
        plain = self.slot_attention(k, v, mask)
        refined = self.refine(plain, k, mask)
        sim = nn.functional.normalize(refined, dim=-1) @ nn.functional.normalize(k, dim=-1).t()   # (C, S, N)
        r = torch.softmax(self.p.beta * sim, dim=1) * mask.unsqueeze(1)
        return r, plain, refined

    def dim_gate(self, log_var: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate_mlp(self.norm_gate(log_var)))
        return g / g.mean(-1, keepdim=True).clamp_min(1e-8)


@DEFENSES.register("cem_slot_cross", "CEM with a Slot Attention + gated cross-attention surrogate (the proposal; "
                   "params: sigma, lambda, slots, iters, gates, warmup_epochs)")
class CEMSlotCross(CEMDefense):
    name = "cem_slot_cross"
    Params = CEMSlotCrossParams
    trains_during_warmup = True

    def allocate(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        super().allocate(num_classes, dim, device)
        self.surrogate_net = SlotCrossSurrogate(dim, self.params).to(device)

    def active(self, epoch: int) -> bool:
        off = self.params.shutoff_epoch is not None and epoch >= self.params.shutoff_epoch
        return super().active(epoch) and not off

    def penalty(self, z: torch.Tensor, y: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, reverse_gate: bool):
        """L_C from raw features z (N, D) and assignments r (C, S, N); also returns the statistics."""
        p = self.params
        C, S, N = r.shape
        mass, mu, var = weighted_stats(z, r.reshape(C * S, N))
        mass, mu, var = mass.view(C, S), mu.view(C, S, -1), var.view(C, S, -1)
        var_c = var.clamp(p.var_min, p.var_max)
        base = softplus_margin(torch.log(var_c + p.gamma) - math.log(self.tau) - p.margin, p.sharpness)      # (C, S, D)
        if p.dim_gate:
            g = self.surrogate_net.dim_gate(torch.log(var_c + p.gamma).detach())
            base = base * (grad_reverse(g) if reverse_gate else g)
        if p.snr_gate:
            v, m = var_c.detach(), mu.detach()
            base = base * torch.sigmoid(p.snr_kappa * (v / (m * m + 1e-6) - p.snr_tau))
        n_c = mask.sum(1)                                                                           # (C,)
        share = (mass.detach() / n_c.clamp_min(1).unsqueeze(1)).clamp_min(0)
        w_slot = share.pow(p.mass_power) if p.mass_gate else torch.full_like(share, 1.0 / S)
        per_class = (w_slot * base.mean(-1)).sum(1)
        present = (n_c > 0).to(z.dtype)
        if p.class_gate:
            present = present * torch.sigmoid(p.class_a * (n_c / max(1, N) - p.class_b))
        l_c = (per_class * present).sum() / (n_c > 0).to(z.dtype).sum().clamp_min(1)
        return l_c, {"mass": mass, "mean": mu, "var": var}

    def surrogate(self, z, y, epoch):
        p = self.params
        z = flat(z)
        mask = class_masks(y, self.num_classes, z.dtype)
        if p.surrogate_update == "joint":
            r, _, _ = self.surrogate_net(z, mask)
            l_c, _ = self.penalty(z, y, r, mask, reverse_gate=False)
            return l_c, {}
        r, _, _ = self.surrogate_net(z.detach(), mask)
        extra = {}
        if p.fit_weight > 0:
            C, S, N = r.shape
            mass, _, var = weighted_stats(z.detach(), r.reshape(C * S, N))
            n_c = mask.sum(1)
            share = mass.view(C, S) / n_c.clamp_min(1).unsqueeze(1)
            distortion = (share * var.view(C, S, -1).mean(-1)).sum(1)
            extra["fit"] = p.fit_weight * distortion.sum() / (n_c > 0).to(z.dtype).sum().clamp_min(1)
        if not self.active(epoch):
            return torch.zeros((), device=z.device), extra
        l_c, _ = self.penalty(z, y, r.detach(), mask, reverse_gate=True)
        return l_c, extra
