"""Attention blocks and feature enhancements of the Golden Partition Zone paper's inversion model.

Every block maps (N, C, H, W) -> (N, C, H, W) for any spatial size (1x1 included) and is residual, so it
can be dropped between the upsampling stages of :class:`InversionDecoder`. Ordered from weak to strong
decoupling, as the paper places them: Attention-as-Conv and squeeze-and-excitation early (small maps next
to z), large-kernel attention and multi-scale channel attention late; multi-head self-attention optional.

The feature enhancements act on the transmitted features before the decoder: global normalisation, an FFT
view (residual or concatenated) and a small dropout-regularised network (residual or concatenated).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentionAsConv(nn.Module):
    """Local self-attention over a k x k window, computed like a convolution (unfold): every position
    attends to its neighbours with a learned relative-position bias (Chen et al., "attention as a
    convolutional layer"). Output = x + gamma * attention, gamma initialised at 0."""

    def __init__(self, channels: int, kernel: int = 3, heads: int = 1):
        super().__init__()
        heads = max(1, min(heads, channels))
        while channels % heads:
            heads -= 1
        self.k, self.heads = kernel, heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.rel = nn.Parameter(torch.zeros(heads, kernel * kernel))
        self.proj = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        hd, k2 = c // self.heads, self.k * self.k
        q, kk, v = self.qkv(x).chunk(3, dim=1)
        pad = self.k // 2
        # neighbours of every position: (N, heads, hd, k2, H*W); zero padding outside the map
        kk = F.unfold(kk, self.k, padding=pad).view(n, self.heads, hd, k2, h * w)
        v = F.unfold(v, self.k, padding=pad).view(n, self.heads, hd, k2, h * w)
        q = q.reshape(n, self.heads, hd, 1, h * w)
        logits = (q * kk).sum(2) / math.sqrt(hd) + self.rel.view(1, self.heads, k2, 1)
        # padded neighbours (outside the map) must not receive attention
        valid = F.unfold(torch.ones(1, 1, h, w, device=x.device, dtype=x.dtype), self.k, padding=pad)
        logits = logits.masked_fill(valid.view(1, 1, k2, h * w) == 0, float("-inf"))
        attn = logits.softmax(2).unsqueeze(2)                      # (N, heads, 1, k2, HW)
        out = (attn * v).sum(3).reshape(n, c, h, w)
        return x + self.gamma * self.proj(out)


class SqueezeExcitation(nn.Module):
    """Channel gates from globally pooled statistics (Hu et al. 2018): x * sigmoid(MLP(avgpool(x)))."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x)


class LargeKernelAttention(nn.Module):
    """Large-kernel attention: a k x k receptive field from two separable branches (k x 1 then 1 x k, and
    1 x k then k x 1) as in the global convolutional network ("large kernel matters", Peng et al. 2017,
    the paper the GPZ model cites), on a reduced width; a 1x1 conv turns their sum into an attention map
    that multiplies x; residual. (Depth-wise dilated kernels, the VAN form, are very slow on CPU.)"""

    def __init__(self, channels: int, kernel: int = 7, reduction: int = 4):
        super().__init__()
        h, pad = max(4, channels // reduction), kernel // 2
        self.a = nn.Sequential(nn.Conv2d(channels, h, (kernel, 1), padding=(pad, 0)), nn.Conv2d(h, h, (1, kernel), padding=(0, pad)))
        self.b = nn.Sequential(nn.Conv2d(channels, h, (1, kernel), padding=(0, pad)), nn.Conv2d(h, h, (kernel, 1), padding=(pad, 0)))
        self.pw = nn.Conv2d(h, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * self.pw(self.a(x) + self.b(x))


class MultiScaleChannelAttention(nn.Module):
    """Multi-scale channel attention (MS-CAM, Dai et al. 2021): channel gates from a local branch
    (point-wise bottleneck at every position) plus a global branch (the same on the pooled map),
    x * sigmoid(local + global); doubled so the block starts near identity (sigmoid(0) = 1/2)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)

        def branch() -> nn.Sequential:   # no BatchNorm: must work for a single image and 1x1 maps
            return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

        self.local, self.glob = branch(), branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x * torch.sigmoid(self.local(x) + self.glob(F.adaptive_avg_pool2d(x, 1)))


class MultiHeadSelfAttention(nn.Module):
    """Global multi-head self-attention over all H*W positions (pre-LayerNorm, residual, learned zero-init
    scale). Quadratic in H*W: the decoder inserts it only where the map has few positions."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        heads = max(1, min(heads, channels))
        while channels % heads:
            heads -= 1
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))
        out, _ = self.attn(t, t, t, need_weights=False)
        return x + self.gamma * out.transpose(1, 2).reshape(n, c, h, w)


BLOCKS = {
    "aac": AttentionAsConv,
    "se": SqueezeExcitation,
    "lka": LargeKernelAttention,
    "msca": MultiScaleChannelAttention,
    "mhsa": MultiHeadSelfAttention,
}


# -- feature enhancements (attacker side, before the decoder) -----------------------------------------

def global_normalize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each sample's features standardised by their own global mean and standard deviation."""
    flat = z.flatten(1)
    mu = flat.mean(1).view(-1, *[1] * (z.dim() - 1))
    sd = flat.std(1, unbiased=False).view(-1, *[1] * (z.dim() - 1))
    return (z - mu) / (sd + eps)


def fft_view(z: torch.Tensor) -> torch.Tensor:
    """Log-magnitude spectrum of z, same shape: 2-D FFT over (H, W) for maps, 1-D over the last axis else."""
    spec = torch.fft.fft2(z.float()) if z.dim() == 4 else torch.fft.fft(z.float(), dim=-1)
    return torch.log1p(spec.abs()).to(z.dtype)


class FeatureEnhancer(nn.Module):
    """z -> enhanced z (GPZ paper, Table 4): optional normalisation of the input, an FFT view and a
    small dropout-regularised network, each added to z ("residual") or concatenated along the feature axis
    (channels for maps, the last axis otherwise).

    ``normalize``: "channel" standardises every channel (the last axis for tokens and vectors) with a mean and
    std over the attacker's features, set by :meth:`set_statistics` (identity until then); "sample"
    standardises each sample by its own global statistics (discards brightness/contrast); "none" (or False).
    ``True`` means "sample" (the old behaviour)."""

    def __init__(self, feature_shape: tuple[int, ...], normalize: bool | str = False, fft: str = "none",
                 nn_enrich: str = "none", dropout: float = 0.1, hidden: int = 64):
        super().__init__()
        normalize = {True: "sample", False: "none"}.get(normalize, normalize) if isinstance(normalize, bool) else normalize
        self.normalize, self.fft, self.nn_mode = normalize, fft, nn_enrich
        self.is_map = len(feature_shape) == 3
        c = feature_shape[0] if self.is_map else feature_shape[-1]
        self.axis = 1 if self.is_map else -1
        stat_shape = (1, c, 1, 1) if self.is_map else (1,) * (len(feature_shape)) + (c,)
        self.register_buffer("mu", torch.zeros(stat_shape))
        self.register_buffer("sd", torch.ones(stat_shape))
        self.net: nn.Module | None = None
        if nn_enrich != "none":
            if self.is_map:
                self.net = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.PReLU(hidden), nn.Dropout2d(dropout),
                                         nn.Conv2d(hidden, c, 3, padding=1))
            else:
                self.net = nn.Sequential(nn.Linear(c, hidden), nn.PReLU(), nn.Dropout(dropout), nn.Linear(hidden, c))

    @torch.no_grad()
    def set_statistics(self, z: torch.Tensor) -> None:
        """Per-channel mean and std of the attacker's features ``z`` (N, *feature_shape)."""
        dims = [0, 2, 3] if self.is_map else list(range(z.dim() - 1))
        self.mu.copy_(z.float().mean(dims, keepdim=True).reshape(self.mu.shape))
        self.sd.copy_(z.float().std(dims, keepdim=True, unbiased=False).clamp_min(1e-5).reshape(self.sd.shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.normalize == "sample":
            z = global_normalize(z)
        elif self.normalize == "channel":
            z = (z - self.mu) / self.sd
        parts = [z]
        base = z
        if self.fft == "residual":
            base = base + fft_view(z)
            parts[0] = base
        elif self.fft == "concat":
            parts.append(fft_view(z))
        if self.net is not None:
            e = self.net(z)
            if self.nn_mode == "residual":
                parts[0] = parts[0] + e
            else:
                parts.append(e)
        return torch.cat(parts, dim=self.axis) if len(parts) > 1 else parts[0]

    @property
    def active(self) -> bool:
        return self.normalize != "none" or self.fft != "none" or self.net is not None
