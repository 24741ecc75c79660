"""Image metrics, defined once: per image, on [0, 1] images, then averaged (DESIGN.md section 2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # PSNR of an exact reconstruction (MSE 0) is capped here instead of +inf


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("image metrics got non-finite values")


def mse_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over pixels and channels, one value per image."""
    _check(x, y)
    return ((x.double() - y.double()) ** 2).flatten(1).mean(1)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    mse = mse_per_image(x, y)
    cap = data_range ** 2 / 10 ** (PSNR_CAP_DB / 10)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(cap))


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    ax = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
                   sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), one value per image.

    The convention of torchmetrics' ``structural_similarity_index_measure``: images are reflect-padded by
    half a window, the SSIM map is averaged over the whole image and all channels (equal channel weights).
    Images smaller than the window use the largest odd window that reflect-padding allows."""
    _check(x, y)
    x, y = x.double(), y.double()
    c = x.shape[1]
    win = min(win_size, 2 * min(x.shape[-2:]) - 1)
    win -= 1 - win % 2
    pad = (win - 1) // 2
    w = _gaussian_window(win, sigma, x.device, x.dtype).expand(c, 1, win, win)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = (filt(x * x) - mu_x ** 2).clamp_min(0)
    syy = (filt(y * y) - mu_y ** 2).clamp_min(0)
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return smap.flatten(1).mean(1)


def _mean_std(v: torch.Tensor) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std(unbiased=False)) if v.numel() > 1 else 0.0


def image_metrics(x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """MSE / PSNR / SSIM of reconstructions ``x_hat`` against originals ``x`` (both in [0, 1])."""
    out: dict[str, float] = {}
    for key, fn in (("mse", mse_per_image), ("psnr", psnr_per_image), ("ssim", ssim_per_image)):
        m, s = _mean_std(fn(x_hat, x))
        out[key], out[f"{key}_std"] = m, s
    out["n_images"] = int(x.shape[0])
    return out


def psnr_from_mse(mse: float, data_range: float = 1.0) -> float:
    return 10 * math.log10(data_range ** 2 / max(mse, data_range ** 2 / 10 ** (PSNR_CAP_DB / 10)))
