"""Shared figure helpers (one matplotlib set-up, one image-grid renderer, one way to save) and the
reconstruction grid of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (works with no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(fig, path: str | Path, title: str = "", dpi: int = 100) -> None:
    """Title, tight layout, save to ``path`` (folders created) and close."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def image_grid(rows: Sequence[tuple[str, torch.Tensor]], n: int | None = None, cell: tuple[float, float] = (1.2, 1.3),
               label_size: int = 8):
    """A figure with one labelled row of images per ``(label, N x C x H x W tensor in [0, 1])``."""
    plt = pyplot()
    n = n or min(r.shape[0] for _, r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(cell[0] * n + 1.2, cell[1] * len(rows) + 0.2), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c].detach().float().cpu().clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=label_size, rotation=0, ha="right", va="center")
    return fig


def save_recon_grid(path: str | Path, originals: torch.Tensor, rows: dict[str, torch.Tensor], title: str = "") -> None:
    """Originals on top, one row of reconstructions per attack below (all [0, 1], N x C x H x W)."""
    fig = image_grid([("original", originals), *rows.items()], n=originals.shape[0])
    finish_figure(fig, path, title)
