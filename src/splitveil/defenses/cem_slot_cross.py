"""CEM with a Slot Attention + gated cross-attention surrogate (the proposal and slides; DESIGN.md section 3).

Tokens: every sample is one token, its flat features LayerNormed and projected to ``slot_dim`` (keys k_m and
values v_m). Per class c of the batch, Slot Attention (Locatello et al. 2020) aggregates the class's tokens into
S slots over T iterations (softmax over slots, weighted mean over tokens, GRU + MLP update, logit scale
``temperature``, default slot_dim^-1/2 on q.k, i.e. the slides' slot_dim^-1/4 on each of q and k); all classes run
in one batched pass with class masks, from a learned per-slot initialisation (``slot_init: learned``, default:
deterministic, so the module is permutation invariant over the batch) or, as the slides, slots sampled from a
learned mean and std (``slot_init: sampled``: mu + sigma * eps, eps ~ N(0, I) from the global generator).

Gated cross-attention (Flamingo), as the slides: the *tokens are the queries* and their class's slots the
keys/values,
    q_m = k_m;   y_m = q_m + tanh(alpha_attn) CrossAttn(LN(q_m), slots_c);   y_m = y_m + tanh(alpha_ffn) FFN(LN(y_m)),
alpha_* initialised at ``gate_init`` (0.1, the slides). y_m is token m's attention-weighted reconstruction from the slots.
Assignments r_ms = softmax_s(beta cos(y_m, slot_s)) (beta 20: sharp enough that the slot variances match the
within-cluster variance) give per-slot masses, raw-feature means mu_s and per-dimension variances var_s
(float32, two passes). The loss of class c is
    L_c = sum_s g_mass(s) mean_d [ g_dim(s,d) g_snr(s,d) softplus_beta'(log(clip(var_sd) + gamma) - log tau - m) ]
and L_C = sum_c g_class(c) L_c / #present classes, tau = var_threshold sigma^2 + gamma. Gates (each switchable):
  - per-dim gate  g_dim = sigmoid(MLP(LayerNorm(log var_s))), rescaled to mean 1 over dimensions;
  - SNR gate      g_snr = sigmoid(snr_kappa (log var - log sigma^2 - snr_tau)): relative to the *noise*, so
    spread already buried in the noise is not pushed further;
  - slot-mass gate g_mass = (mass_s / M_c)^mass_power, renormalised to sum 1 over the class's slots
    (``mass_renorm``; the slides' power 2.5);
  - class gate    g_class = sigmoid(class_a (M_c / B - class_b)), down-weighting classes with very few samples.
The SNR, mass and class gates are computed from detached statistics. Schedule (each switchable): warm-up
``warmup_epochs`` (slides: 3), early shut-off ``shutoff_steps`` (no loss during the first 100 steps *counted from
the first step at which the term is active*, i.e. the first step after the warm-up; the step is kept in the
checkpoint), ``shutoff_gate_open`` (no loss while |tanh(alpha_attn)| exceeds it: the gates are widely open),
``shutoff_epoch`` (off from that epoch). Variance clipping (``var_min``, ``var_max``; var_min also plays the slides'
+eps of the SNR gate); the non-finite guard is cem_common's. ``info()`` records, for metrics.json, the first active
step, the first step with a nonzero factor, the number of steps muted by the open-gate rule, and tanh(alpha_attn),
tanh(alpha_ffn) at initialisation and after each epoch.

How the surrogate's own parameters are trained (``surrogate_update``): with ``fit`` (default) the slot and
cross-attention modules see detached features and are trained on a fitting term only, ``fit_weight`` * the soft
k-means distortion sum_s (mass_s / M_c) mean_d var_sd (the analogue of the GMM's refit), reported as the ``fit``
loss term; the penalty reaches the encoder through the statistics only (assignments detached), and the per-dim
gate receives the penalty's gradient reversed (it seeks the dimensions with the largest excess spread). With
``joint`` everything, the surrogate included, minimises the total loss (the literal reading of the slides; the
surrogate can then lower the term by itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..params import require
from .base import DEFENSES
from .cem_common import CEMDefense, CEMParams, class_masks, component_stats, flat, grad_reverse, softplus_margin


@dataclass
class CEMSlotCrossParams(CEMParams):
    warmup_epochs: int = 3            # the slides' attention warm-up
    slots: int = 8                    # S
    iters: int = 3                    # T
    slot_dim: int = 64
    heads: int = 4                    # cross-attention heads
    temperature: float | None = None  # slot attention logit scale; null: slot_dim^-1/2
    beta: float = 20.0                # assignment sharpness on cosine similarity
    gate_init: float = 0.1            # initial alpha of the tanh gates (the slides: 0.1)
    slot_init: Literal["learned", "sampled"] = "learned"  # per-slot learned init, or mu + sigma * eps (slides)
    sharpness: float = 5.0            # beta' of the softplus margin
    margin: float = 0.0               # m in log var - log tau - m
    var_min: float = 1e-6             # variance clipping
    var_max: float = 1e4
    dim_gate: bool = True
    dim_gate_hidden: int = 64
    snr_gate: bool = True
    snr_kappa: float = 5.0
    snr_tau: float = 0.0              # the SNR gate is 1/2 at log var - log sigma^2 = snr_tau
    mass_gate: bool = True
    mass_power: float = 2.5
    mass_renorm: bool = True          # renormalise (mass share)^power over the class's slots
    class_gate: bool = True
    class_a: float = 50.0
    class_b: float = 0.02
    shutoff_steps: int = 100          # early shut-off: no loss during the first n active steps (after the warm-up; 0: none)
    shutoff_gate_open: float | None = 0.9  # no loss while |tanh(alpha_attn)| > this; null: never
    shutoff_epoch: int | None = None  # off from this epoch on; null: never
    surrogate_update: Literal["fit", "joint"] = "fit"
    fit_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        for f in ("slots", "iters", "slot_dim", "heads", "dim_gate_hidden"):
            require(getattr(self, f) >= 1, f, "must be >= 1")
        require(self.slot_dim % self.heads == 0, "heads", "must divide slot_dim")
        require(0 < self.var_min < self.var_max, "var_min", "must satisfy 0 < var_min < var_max")
        require(self.beta > 0, "beta", "must be positive")
        require(self.sharpness > 0, "sharpness", "must be positive")
        require(self.temperature is None or self.temperature > 0, "temperature", "must be positive or null")
        require(self.fit_weight >= 0, "fit_weight", "must be >= 0")
        require(self.slot_init in ("learned", "sampled"), "slot_init", "must be 'learned' or 'sampled'")
        require(self.mass_power >= 0, "mass_power", "must be >= 0")
        require(self.shutoff_steps >= 0, "shutoff_steps", "must be >= 0")
        require(self.shutoff_gate_open is None or 0 < self.shutoff_gate_open <= 1, "shutoff_gate_open",
                "must be in (0, 1] or null")


class SlotCrossSurrogate(nn.Module):
    """Slot Attention over each class's tokens, then gated cross-attention with the tokens as queries."""

    def __init__(self, dim: int, p: CEMSlotCrossParams):
        super().__init__()
        sd = p.slot_dim
        self.p = p
        self.scale = p.temperature if p.temperature is not None else sd ** -0.5
        self.norm_in = nn.LayerNorm(dim)
        self.to_k = nn.Linear(dim, sd)
        self.to_v = nn.Linear(dim, sd)
        if p.slot_init == "sampled":    # Locatello et al.: one learned mean and std, each slot drawn from them
            self.slots_mu = nn.Parameter(torch.randn(1, sd) * sd ** -0.5)
            self.slots_log_sigma = nn.Parameter(torch.full((1, sd), math.log(sd ** -0.5)))
        else:
            self.slots_init = nn.Parameter(torch.randn(p.slots, sd) * sd ** -0.5)
        self.norm_slots = nn.LayerNorm(sd)
        self.to_q = nn.Linear(sd, sd, bias=False)
        self.gru = nn.GRUCell(sd, sd)
        self.norm_mlp = nn.LayerNorm(sd)
        self.mlp = nn.Sequential(nn.Linear(sd, 2 * sd), nn.ReLU(), nn.Linear(2 * sd, sd))
        # gated cross-attention: token queries, slot keys/values
        self.norm_q = nn.LayerNorm(sd)
        self.norm_kv = nn.LayerNorm(sd)
        self.xq = nn.Linear(sd, sd, bias=False)
        self.xk = nn.Linear(sd, sd, bias=False)
        self.xv = nn.Linear(sd, sd, bias=False)
        self.xo = nn.Linear(sd, sd)
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

    def initial_slots(self, C: int, sd: int) -> torch.Tensor:
        if self.p.slot_init == "sampled":
            eps = torch.randn(C, self.p.slots, sd, device=self.slots_mu.device, dtype=self.slots_mu.dtype)
            return self.slots_mu + self.slots_log_sigma.exp() * eps
        return self.slots_init.unsqueeze(0).expand(C, self.p.slots, sd)

    def slot_attention(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, return_attn: bool = False):
        """Slots (C, S, sd) of each class (rows of ``mask`` (C, N)); with ``return_attn`` also the last
        iteration's attention (C, S, N) (softmax over the slots, zero outside the class)."""
        C, S, sd = mask.shape[0], self.p.slots, k.shape[1]
        slots = self.initial_slots(C, sd)
        for _ in range(self.p.iters):
            prev = slots
            q = self.to_q(self.norm_slots(slots))
            attn = torch.softmax(self.scale * q @ k.t(), dim=1) * mask.unsqueeze(1)       # softmax over slots
            w = attn / attn.sum(-1, keepdim=True).clamp_min(1e-8)                          # mean over tokens
            slots = self.gru((w @ v).reshape(-1, sd), prev.reshape(-1, sd)).view(C, S, sd)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return (slots, attn) if return_attn else slots

    def cross(self, q: torch.Tensor, y: torch.Tensor, slots: torch.Tensor):
        """Gated cross-attention: token m (query) attends to its own class's slots. q (N, sd), y (N,) labels,
        slots (C, S, sd). Returns the refined tokens y_m (N, sd) and the head-averaged attention (N, S)."""
        N, sd = q.shape
        h = self.p.heads
        kv = self.norm_kv(slots)[y]                                                        # (N, S, sd)
        qh = self.xq(self.norm_q(q)).view(N, h, 1, sd // h)
        kh = self.xk(kv).view(N, -1, h, sd // h).transpose(1, 2)                           # (N, h, S, d)
        vh = self.xv(kv).view(N, -1, h, sd // h).transpose(1, 2)
        att = torch.softmax(qh @ kh.transpose(-1, -2) * (sd // h) ** -0.5, dim=-1)         # (N, h, 1, S)
        out = self.xo((att @ vh).reshape(N, sd))
        yt = q + torch.tanh(self.alpha_attn) * out
        yt = yt + torch.tanh(self.alpha_ffn) * self.ffn(self.norm_ffn(yt))
        return yt, att.mean(1).squeeze(1)

    def forward(self, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        """Soft assignments r (C, S, N) (zero outside each class), the slots and the refined tokens."""
        k, v = self.tokens(z)
        slots = self.slot_attention(k, v, mask)
        refined, _ = self.cross(k, y, slots)
        sim = (nn.functional.normalize(refined, dim=-1).unsqueeze(1)
               * nn.functional.normalize(slots, dim=-1)[y]).sum(-1)                       # (N, S)
        r = torch.softmax(self.p.beta * sim, dim=1)
        r = r.t().unsqueeze(0) * mask.unsqueeze(1)                                          # (C, S, N)
        return r, slots, refined

    def dim_gate(self, log_var: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate_mlp(self.norm_gate(log_var)))
        return g / g.mean(-1, keepdim=True).clamp_min(1e-8)


@DEFENSES.register("cem_slot_cross", "CEM with a Slot Attention + gated cross-attention surrogate (the proposal; "
                   "params: sigma, lambda, slots, iters, beta, gates, warmup_epochs, shutoff_*)")
class CEMSlotCross(CEMDefense):
    Params = CEMSlotCrossParams
    trains_during_warmup = True

    def __init__(self, params=None, **param_values):
        super().__init__(params, **param_values)
        # the global step at which the term was first active (-1: not yet); in the checkpoint, so a resumed run
        # keeps counting the early shut-off from the same step
        self.register_buffer("first_active_step", torch.full((), -1, dtype=torch.long))
        self._first_active: int | None = None
        # steps at which the term was active but muted because the gates were widely open (device counter)
        self.register_buffer("gate_open_steps", torch.zeros((), dtype=torch.long), persistent=False)
        self.alpha_history: list[dict[str, float]] = []   # tanh of the gates after each epoch (run diagnostics)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the shut-off counted from the first active step have no such entry
        state_dict.setdefault(prefix + "first_active_step", torch.full((), -1, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def allocate(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        super().allocate(num_classes, dim, device)
        self.surrogate_net = SlotCrossSurrogate(dim, self.params).to(device)

    def gates(self) -> dict[str, float]:
        """tanh(alpha_attn), tanh(alpha_ffn) now (reads the device: between epochs only)."""
        net = self.surrogate_net
        return {"attn": float(torch.tanh(net.alpha_attn.detach())), "ffn": float(torch.tanh(net.alpha_ffn.detach()))}

    def on_epoch_start(self, ctx, epoch: int) -> None:
        super().on_epoch_start(ctx, epoch)
        first = int(self.first_active_step)          # between epochs: a resumed run reads it back here
        self._first_active = first if first >= 0 else None

    def on_epoch_end(self, ctx, epoch: int) -> None:
        super().on_epoch_end(ctx, epoch)
        self.alpha_history.append({"epoch": epoch + 1, **{f"tanh_alpha_{k}": v for k, v in self.gates().items()}})

    def active(self, epoch: int) -> bool:
        off = self.params.shutoff_epoch is not None and epoch >= self.params.shutoff_epoch
        return super().active(epoch) and not off

    def info(self) -> dict:
        out = super().info()
        p = self.params
        first = int(self.first_active_step)
        out["first_active_step"] = first if first >= 0 else None
        out["shutoff_until_step"] = first + p.shutoff_steps if first >= 0 else None   # first step with the term on
        out["gate_open_steps"] = int(self.gate_open_steps)
        out["tanh_alpha_init"] = math.tanh(p.gate_init)
        if hasattr(self, "surrogate_net"):
            out.update({f"tanh_alpha_{k}_end": v for k, v in self.gates().items()})
        out["tanh_alpha_per_epoch"] = list(self.alpha_history)
        return out

    def penalty(self, z: torch.Tensor, y: torch.Tensor, r: torch.Tensor, mask: torch.Tensor, reverse_gate: bool):
        """L_C from raw features z (N, D) and assignments r (C, S, N); also returns the statistics."""
        p = self.params
        C, S, N = r.shape
        mass, mu, var = component_stats(z, r, y)
        var_c = var.clamp(p.var_min, p.var_max)
        log_v = torch.log(var_c + p.gamma)
        base = softplus_margin(log_v - math.log(self.tau) - p.margin, p.sharpness)            # (C, S, D)
        if p.dim_gate:
            g = self.surrogate_net.dim_gate(log_v.detach())
            base = base * (grad_reverse(g) if reverse_gate else g)
        if p.snr_gate:
            snr = torch.log(var_c.detach()) - math.log(p.sigma ** 2)
            base = base * torch.sigmoid(p.snr_kappa * (snr - p.snr_tau))
        n_c = mask.sum(1)                                                                    # (C,)
        share = (mass.detach() / n_c.clamp_min(1).unsqueeze(1)).clamp_min(0)
        if p.mass_gate:
            w_slot = share.pow(p.mass_power)
            if p.mass_renorm:
                w_slot = w_slot / w_slot.sum(1, keepdim=True).clamp_min(1e-12)
        else:
            w_slot = torch.full_like(share, 1.0 / S)
        per_class = (w_slot * base.mean(-1)).sum(1)
        present = (n_c > 0).to(per_class.dtype)
        weight = present
        if p.class_gate:
            weight = present * torch.sigmoid(p.class_a * (n_c / max(1, N) - p.class_b))
        l_c = (per_class * weight).sum() / present.sum().clamp_min(1)
        return l_c, {"mass": mass, "mean": mu, "var": var}

    def schedule_factor(self, step: int) -> torch.Tensor | float:
        """1, or 0 during the early shut-off: the first ``shutoff_steps`` steps from the first active step, and
        while the gates are widely open. Called at active steps only; a device scalar, no host sync."""
        p = self.params
        if self._first_active is None:                # the first step at which the term is active
            self._first_active = step
            self.first_active_step.fill_(step)
        if step - self._first_active < p.shutoff_steps:
            return 0.0
        if p.shutoff_gate_open is not None:
            open_ = torch.tanh(self.surrogate_net.alpha_attn.detach()).abs() > p.shutoff_gate_open
            self.gate_open_steps += open_.long()
            return (~open_).float()
        return 1.0

    def loss(self, step):
        self._step = step.step
        return super().loss(step)

    def surrogate(self, z, y, epoch):
        p = self.params
        z = flat(z)
        mask = class_masks(y, self.num_classes, z.dtype)
        factor = self.schedule_factor(getattr(self, "_step", 1 << 30)) if self.active(epoch) else 0.0
        if p.surrogate_update == "joint":
            r, _, _ = self.surrogate_net(z, y, mask)
            l_c, _ = self.penalty(z, y, r, mask, reverse_gate=False)
            return l_c * factor, {}
        r, _, _ = self.surrogate_net(z.detach(), y, mask)
        extra = {}
        if p.fit_weight > 0:
            mass, _, var = component_stats(z.detach(), r, y)
            n_c = mask.sum(1)
            share = mass / n_c.clamp_min(1).unsqueeze(1)
            distortion = (share * var.mean(-1)).sum(1)
            extra["fit"] = p.fit_weight * distortion.sum() / (n_c > 0).to(z.dtype).sum().clamp_min(1)
        if not self.active(epoch):
            return torch.zeros((), device=z.device), extra
        l_c, _ = self.penalty(z, y, r.detach(), mask, reverse_gate=True)
        return l_c * factor, extra
