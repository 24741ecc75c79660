"""Datasets in their published layouts: Fashion-MNIST (IDX .gz), CIFAR-100 (the "python" pickle batches, fine
labels) and Tiny ImageNet (``tiny-imagenet-200`` with ``val/val_annotations.txt``).

Where each goes under the data root (``data.root`` / ``--data-root``):
- ``fashion_mnist``: ``<root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (Debian's
  ``dataset-fashion-mnist`` package installs them in ``/usr/share/datasets/fashion-mnist``: use
  ``--data-root /usr/share/datasets``), or torchvision's ``<root>/FashionMNIST/raw``;
- ``cifar100``: ``<root>/cifar100/cifar-100-python/{train,test,meta}`` (the extracted ``cifar-100-python.tar.gz``);
- ``tiny_imagenet``: ``<root>/tiny-imagenet-200/{wnids.txt,train/<wnid>/images/*.JPEG,val/images/*.JPEG,
  val/val_annotations.txt}`` (the extracted ``tiny-imagenet-200.zip``); the labelled ``val`` split is the test
  split (the official ``test`` images have no labels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DATASETS, DatasetInfo, RawData, convert_channels, resize_u8
from .builtin import _finish, _read_idx

FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]


def _idx_file(folder: Path, stem: str) -> Path:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}")


def load_fashion_mnist(root, image_size: int, channels: int | None) -> RawData:
    """Fashion-MNIST IDX files in ``root`` (or ``root/fashion-mnist``, ``root/FashionMNIST/raw``, ``root/raw``)."""
    root = Path(root)
    folder = next((p for p in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw", root / "raw")
                   if p.is_dir() and any(p.glob("train-images-idx3-ubyte*"))), None)
    if folder is None:
        raise FileNotFoundError(f"no Fashion-MNIST IDX files under {root} (expected train-images-idx3-ubyte.gz; "
                                "`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)")
    tr_x, tr_y = _finish(_read_idx(_idx_file(folder, "train-images-idx3-ubyte"))[:, None],
                         _read_idx(_idx_file(folder, "train-labels-idx1-ubyte")), image_size, channels)
    te_x, te_y = _finish(_read_idx(_idx_file(folder, "t10k-images-idx3-ubyte"))[:, None],
                         _read_idx(_idx_file(folder, "t10k-labels-idx1-ubyte")), image_size, channels)
    return RawData(tr_x, tr_y, te_x, te_y, list(FASHION_CLASSES))


def load_cifar100(root, image_size: int, channels: int | None) -> RawData:
    """CIFAR-100 python batches (``train``, ``test``, ``meta``), 100 fine labels, read with the safe unpickler."""
    from .safe_pickle import safe_load

    root = Path(root)
    folder = root if (root / "train").is_file() and (root / "meta").is_file() else root / "cifar-100-python"
    if not (folder / "train").is_file():
        raise FileNotFoundError(f"no CIFAR-100 python batches under {root} (expected {root}/cifar-100-python/train, "
                                "test and meta from cifar-100-python.tar.gz)")

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        with open(folder / name, "rb") as fh:
            d = safe_load(fh)
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d["fine_labels"], dtype=np.int64)
        if len(x) != len(y):
            raise ValueError(f"CIFAR-100 {folder / name}: {len(x)} images but {len(y)} fine labels")
        return torch.from_numpy(x.copy()), torch.from_numpy(y)

    tr_x, tr_y = read("train")
    te_x, te_y = read("test")
    with open(folder / "meta", "rb") as fh:
        names = [str(n) for n in safe_load(fh)["fine_label_names"]]
    tr_x, te_x = (resize_u8(convert_channels(t, channels), image_size) for t in (tr_x, te_x))
    return RawData(tr_x, tr_y, te_x, te_y, names)


def _decode(files: list[Path], image_size: int, channels: int | None, desc: str) -> torch.Tensor:
    from tqdm.auto import tqdm

    mode = "L" if channels == 1 else "RGB"     # Tiny ImageNet has some grey JPEGs: the dataset is RGB
    out = torch.empty((len(files), 1 if mode == "L" else 3, image_size, image_size), dtype=torch.uint8)
    for i, f in enumerate(tqdm(files, desc=desc, unit="img", mininterval=1.0, leave=False)):
        with Image.open(f) as im:
            im = im.convert(mode)
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
        out[i] = torch.from_numpy(arr.reshape(image_size, image_size, -1).copy()).permute(2, 0, 1)
    return out


def load_tiny_imagenet(root, image_size: int, channels: int | None) -> RawData:
    """``tiny-imagenet-200``: classes from ``wnids.txt`` (sorted), train from ``train/<wnid>/images``, test from
    ``val/images`` labelled by ``val/val_annotations.txt``; class names from ``words.txt`` when present."""
    root = Path(root)
    folder = root if (root / "wnids.txt").is_file() else root / "tiny-imagenet-200"
    if not (folder / "wnids.txt").is_file():
        raise FileNotFoundError(f"no tiny-imagenet-200 under {root} (expected {root}/tiny-imagenet-200/wnids.txt)")
    wnids = sorted(w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    train: list[tuple[Path, int]] = []
    for w in wnids:
        d = folder / "train" / w / "images"
        if not d.is_dir():
            raise FileNotFoundError(f"tiny-imagenet-200: class {w} of wnids.txt has no {d}")
        train += [(f, index[w]) for f in sorted(d.iterdir()) if f.suffix.lower() in (".jpeg", ".jpg", ".png")]
    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"tiny-imagenet-200: {ann} not found (it labels the val images)")
    val: list[tuple[Path, int]] = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise ValueError(f"{ann}:{n}: expected '<file>\\t<wnid>\\t...' with a wnid of wnids.txt, got {line!r}")
        val.append((folder / "val" / "images" / parts[0], index[parts[1]]))
    names = dict.fromkeys(wnids)
    words = folder / "words.txt"
    if words.is_file():
        for line in words.read_text().splitlines():
            k, _, v = line.partition("\t")
            if k in names:
                names[k] = v.strip()
    classes = [names[w] or w for w in wnids]
    tr_x = _decode([f for f, _ in train], image_size, channels, "decode tiny-imagenet/train")
    te_x = _decode([f for f, _ in val], image_size, channels, "decode tiny-imagenet/val")
    return RawData(tr_x, torch.tensor([y for _, y in train], dtype=torch.int64), te_x,
                   torch.tensor([y for _, y in val], dtype=torch.int64), classes)


DATASETS.register("fashion_mnist", "Fashion-MNIST 28x28 grey, 10 classes (IDX .gz; Debian dataset-fashion-mnist: "
                  "--data-root /usr/share/datasets)")(
    DatasetInfo(load_fashion_mnist, default_image_size=32, subdir="fashion-mnist", mean=(0.2860,), std=(0.3530,)))
DATASETS.register("cifar100", "CIFAR-100, 100 fine classes of 32x32 RGB (<root>/cifar100/cifar-100-python batches)")(
    DatasetInfo(load_cifar100, default_image_size=32, subdir="cifar100",
                mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)))
DATASETS.register("tiny_imagenet", "Tiny ImageNet, 200 classes of 64x64 RGB (<root>/tiny-imagenet-200, val as test)")(
    DatasetInfo(load_tiny_imagenet, default_image_size=64, subdir=None))
