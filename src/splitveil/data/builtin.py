"""Datasets shipped as arrays: scikit-learn's digits (works on any machine), MNIST IDX, FaceScrub-10 npz."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .base import DATASETS, DatasetInfo, RawData, convert_channels, resize_u8


def _finish(x: np.ndarray, y: np.ndarray, image_size: int, channels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(np.array(x, dtype=np.uint8, copy=True))
    return resize_u8(convert_channels(t, channels), image_size), torch.from_numpy(y.astype(np.int64))


def load_digits(root, image_size: int, channels: int | None) -> RawData:
    """scikit-learn's bundled 1,797 8x8 digits (values 0..16), upsampled to ``image_size``."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    xt, yt = _finish(x, d.target, image_size, channels)
    return RawData(xt, yt, None, None, [str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(raw: Path, stem: str) -> Path:
    for cand in (raw / stem, raw / f"{stem}.gz"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"MNIST file {stem} not found in {raw}")


def load_mnist(root, image_size: int, channels: int | None) -> RawData:
    """MNIST in torchvision's layout: ``<root>/MNIST/raw/*-idx?-ubyte[.gz]``."""
    root = Path(root)
    raw = next((p for p in (root / "MNIST" / "raw", root / "raw", root) if p.is_dir()
                and any(p.glob("train-images-idx3-ubyte*"))), None)
    if raw is None:
        raise FileNotFoundError(f"no MNIST IDX files under {root} (expected {root}/MNIST/raw/train-images-idx3-ubyte)")
    tr_x, tr_y = _finish(_read_idx(_find(raw, "train-images-idx3-ubyte"))[:, None],
                         _read_idx(_find(raw, "train-labels-idx1-ubyte")), image_size, channels)
    te_x, te_y = _finish(_read_idx(_find(raw, "t10k-images-idx3-ubyte"))[:, None],
                         _read_idx(_find(raw, "t10k-labels-idx1-ubyte")), image_size, channels)
    return RawData(tr_x, tr_y, te_x, te_y, [str(i) for i in range(10)])


def load_npz_faces(root, image_size: int, channels: int | None) -> RawData:
    """A ``.npz`` with ``images`` (N, H, W, 3) uint8 and ``target`` (N,), e.g. facescrub10_32x32.npz."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz file in {root}")
    with np.load(files[0], allow_pickle=False) as d:
        x, y = d["images"], d["target"]
    x = x.transpose(0, 3, 1, 2) if x.ndim == 4 else x[:, None]
    xt, yt = _finish(x, y, image_size, channels)
    return RawData(xt, yt, None, None, [str(i) for i in range(int(y.max()) + 1)])


DATASETS.register("digits", "scikit-learn's bundled 8x8 digits (1,797 images, 10 classes); needs no data root")(
    DatasetInfo(load_digits, default_image_size=32, needs_root=False, num_classes=10, channels=1))
DATASETS.register("mnist", "MNIST 28x28 digits, torchvision IDX layout (<root>/MNIST/raw)")(
    DatasetInfo(load_mnist, default_image_size=32, subdir="MNIST", mean=(0.1307,), std=(0.3081,), num_classes=10, channels=1))
DATASETS.register("facescrub10", "FaceScrub subset, 10 identities, 32x32 RGB (.npz with images/target)")(
    DatasetInfo(load_npz_faces, default_image_size=32, subdir="facescrub10", num_classes=10, channels=3))
