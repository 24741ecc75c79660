"""Figures: reconstruction grids."""
from __future__ import annotations

from pathlib import Path

import torch


def save_recon_grid(path: str | Path, originals: torch.Tensor, rows: dict[str, torch.Tensor], title: str = "") -> None:
    """Originals on top, one row of reconstructions per attack below (all [0, 1], N x C x H x W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = {"original": originals, **rows}
    n = originals.shape[0]
    fig, axes = plt.subplots(len(all_rows), n, figsize=(1.2 * n + 1.2, 1.3 * len(all_rows)), squeeze=False)
    for r, (label, imgs) in enumerate(all_rows.items()):
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c].detach().cpu().clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
