"""Image-folder datasets: any ``root/<class>/*`` tree (optionally with train/ and test/ sub-trees)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..params import CorruptFileError
from .base import DATASETS, DatasetInfo, RawData, resize_u8

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".gif", ".tif", ".tiff", ".webp"}


def natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: natural_key(d.name))


def _read_tree(root: Path, classes: list[str], image_size: int, channels: int | None,
               desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..utils import progress

    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        files += [(f, label) for f in sorted(d.iterdir(), key=lambda p: natural_key(p.name))
                  if f.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise FileNotFoundError(f"no images found under {root} (expected {root}/<class>/<image>)")
    mode = {1: "L", 3: "RGB"}.get(channels or 0)
    if mode is None:  # keep the dataset's own colour mode, decided by the first image
        try:
            with Image.open(files[0][0]) as im0:
                mode = "L" if im0.mode in ("L", "I", "I;16", "1") else "RGB"
        except (OSError, ValueError, SyntaxError) as e:
            raise CorruptFileError(f"{files[0][0]}: not a readable image ({type(e).__name__}: {e}); replace or "
                                   f"remove it") from None
    out = torch.empty((len(files), 1 if mode == "L" else 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    for i, (f, _) in enumerate(progress(files, desc=desc, unit="img", mininterval=1.0, leave=False)):
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for truncated or non-image files
            raise CorruptFileError(f"{f}: not a readable image ({type(e).__name__}: {e}); replace or remove "
                                   f"it") from None
        out[i] = torch.from_numpy(arr.reshape(image_size, image_size, -1).copy()).permute(2, 0, 1)
    return out, labels


def load_image_folder(root: Path, image_size: int, channels: int | None) -> RawData:
    """``root/train/<class>/*`` + ``root/test/<class>/*`` if present, else ``root/<class>/*``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [d.name for d in _class_dirs(root / "train")]
        tr_x, tr_y = _read_tree(root / "train", classes, image_size, channels, f"decode {root.name}/train")
        te_x, te_y = _read_tree(root / "test", classes, image_size, channels, f"decode {root.name}/test")
        return RawData(tr_x, tr_y, te_x, te_y, classes)
    classes = [d.name for d in _class_dirs(root)]
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    x, y = _read_tree(root, classes, image_size, channels, f"decode {root.name}")
    return RawData(x, y, None, None, classes)


DATASETS.register("imagefolder", "any root/<class>/* tree (FaceScrub, TinyImageNet, CelebA identities); "
                  "set data.root to the tree")(DatasetInfo(load_image_folder, default_image_size=32, subdir=None))
DATASETS.register("att_faces", "AT&T (ORL) faces: 40 identities x 10 grey 92x112 images (s<id>/<n>.pgm)")(
    DatasetInfo(load_image_folder, default_image_size=32, subdir="att_faces", num_classes=40,
                class_names=tuple(f"s{i}" for i in range(1, 41)), channels=1))
DATASETS.register("cifar10", "CIFAR-10, 10 classes of 32x32 RGB (ImageFolder layout or torchvision batches)")(
    DatasetInfo(lambda root, image_size, channels: _load_cifar10(root, image_size, channels),
                default_image_size=32, subdir="cifar10",
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), num_classes=10,
                class_names=CIFAR10_CLASSES, channels=3))


def _load_cifar10(root: Path, image_size: int, channels: int | None) -> RawData:
    root = Path(root)
    batches = root / "cifar-10-batches-py"
    if not batches.is_dir() and root.name == "cifar-10-batches-py":
        batches = root
    if batches.is_dir():
        from .safe_pickle import safe_load

        def read(names):
            xs, ys = [], []
            for n in names:
                with open(batches / n, "rb") as fh:
                    d = safe_load(fh)  # the official CIFAR batch format; numpy arrays and builtins only
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d["labels"], dtype=np.int64))
            return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

        tr_x, tr_y = read([f"data_batch_{i}" for i in range(1, 6)])
        te_x, te_y = read(["test_batch"])
        from .base import convert_channels
        classes = list(CIFAR10_CLASSES)
        tr_x, te_x = (resize_u8(convert_channels(t, channels), image_size) for t in (tr_x, te_x))
        return RawData(tr_x, tr_y, te_x, te_y, classes)
    return load_image_folder(root, image_size, channels)
