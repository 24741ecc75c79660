"""The user's own data: tensors or any map-style dataset of (image, label), split by the same rules as a
registered dataset (``build_data``: a test split held out by ``data.test_fraction`` when none is given, the
attacker's aux images held out of the training pool, disjoint from train and test, the same seeds).

Two ways in:

- Python: ``register_dataset("mydata", train=(images, labels), test=None, class_names=[...])``, then
  ``DataConfig(name="mydata")`` anywhere a dataset name goes.
- A config: ``data.name: "mypkg.data:load"``, a function (called without arguments, or with ``root=data.root``
  when it declares ``root``) returning ``train`` or ``{"train": ..., "test": ..., "class_names": [...]}``.

What ``train`` / ``test`` may be:

- ``(images, labels)``: images as a tensor or array (N, C, H, W) or (N, H, W) (one channel), either uint8
  (0..255) or float in [0, 1]; labels integers 0..K-1;
- a map-style dataset (``len(ds)``, ``ds[i]``) returning ``(image, label)``: the image a tensor (C, H, W) or
  (H, W) (uint8 or float in [0, 1], as torchvision's ``ToTensor`` gives), a PIL image, or a numpy array
  (H, W[, C]), channel-last as PIL gives.

Images are stored as uint8 (8 bits per value, as every dataset here), square at ``data.image_size`` (default: the
images' height). Data held in memory is never written to the decode cache; the run id hashes its content."""
from __future__ import annotations

import hashlib
import inspect
from typing import Any

import numpy as np
import torch

from ..params import ConfigError
from ..references import import_reference, is_reference
from .base import DATASETS, DatasetInfo, RawData, convert_channels, resize_u8


def _as_u8(x: Any, where: str) -> torch.Tensor:
    """An image batch as uint8 (N, C, H, W)."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4:
        raise ConfigError(f"{where}: images must be (N, C, H, W) or (N, H, W), got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3):
        raise ConfigError(f"{where}: images must have 1 or 3 channels first (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if not t.is_floating_point():
        raise ConfigError(f"{where}: images must be uint8 (0..255) or float in [0, 1], got {t.dtype}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{where}: images hold NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise ConfigError(f"{where}: float images must lie in [0, 1] (found {lo:.3g}..{hi:.3g}); pass uint8 images or "
                          "undo any normalisation (splitveil normalises itself)")
    return (t * 255.0).round().to(torch.uint8).contiguous()


def _one_image(img: Any, where: str) -> torch.Tensor:
    """One image as uint8 (C, H, W): a tensor is channel-first, a PIL image or numpy array channel-last."""
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.dim() == 2:
            t = t.unsqueeze(0)
    else:
        a = np.asarray(img)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ConfigError(f"{where}: an image must be 2-D or 3-D, got shape {a.shape}")
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
        if t.shape[0] == 4:   # RGBA (PIL): drop alpha
            t = t[:3]
    return _as_u8(t.unsqueeze(0), where)[0]


def _label(y: Any, where: str) -> int:
    try:
        v = y.item() if hasattr(y, "item") else y
        if isinstance(v, float) and not v.is_integer():
            raise TypeError
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: a label must be an integer class index, got {y!r}") from None


def to_tensors(part: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` or a map-style dataset of (image, label) -> (uint8 (N, C, H, W), int64 (N,))."""
    if isinstance(part, (tuple, list)) and len(part) == 2 and _is_batch(part[0]):
        x = _as_u8(part[0], f"{where} images")
        y = torch.as_tensor(np.asarray(part[1])).long().flatten()
        if len(y) != len(x):
            raise ConfigError(f"{where}: {len(x)} images but {len(y)} labels")
        return x, y
    if not (hasattr(part, "__len__") and hasattr(part, "__getitem__")):
        raise ConfigError(f"{where}: expected (images, labels) or a map-style dataset of (image, label), got "
                          f"{type(part).__name__}")
    n = len(part)
    if n == 0:
        raise ConfigError(f"{where}: the dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = part[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise ConfigError(f"{where}[{i}]: expected (image, label), got {type(item).__name__}")
        xs.append(_one_image(item[0], f"{where}[{i}]"))
        ys.append(_label(item[1], f"{where}[{i}]"))
        if xs[-1].shape != xs[0].shape:
            raise ConfigError(f"{where}[{i}]: image shape {tuple(xs[-1].shape)} differs from the first "
                              f"{tuple(xs[0].shape)}; resize them to one size first")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _is_batch(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray)) and getattr(x, "ndim", 0) >= 3


def user_raw(train: Any, test: Any = None, class_names: list[str] | None = None, where: str = "data") -> RawData:
    """The user's data as :class:`RawData` (uint8 images, int64 labels) with its checks."""
    tx, ty = to_tensors(train, f"{where} train")
    sx = sy = None
    if test is not None:
        sx, sy = to_tensors(test, f"{where} test")
        if sx.shape[1:] != tx.shape[1:]:
            raise ConfigError(f"{where}: test images are {tuple(sx.shape[1:])}, train images {tuple(tx.shape[1:])}")
    labels = torch.cat([ty] + ([sy] if sy is not None else []))
    if int(labels.min()) < 0:
        raise ConfigError(f"{where}: labels must be class indices 0..K-1 (found {int(labels.min())})")
    k = int(labels.max()) + 1
    if class_names is None:
        class_names = [str(i) for i in range(k)]
    class_names = [str(c) for c in class_names]
    if len(class_names) < k:
        raise ConfigError(f"{where}: {len(class_names)} class names for labels up to {k - 1}")
    return RawData(tx, ty, sx, sy, class_names)


def _fingerprint(raw: RawData) -> str:
    h = hashlib.sha256()
    for t in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    h.update("\0".join(raw.class_names).encode())
    return "mem:" + h.hexdigest()[:16]


def register_dataset(name: str, train: Any, test: Any = None, class_names: list[str] | None = None,
                     description: str | None = None) -> str:
    """Register the user's data under ``name`` (see the module doc); returns ``name``. Registering the same name
    again replaces the data."""
    raw = user_raw(train, test, class_names, where=f"dataset '{name}'")

    def loader(root, image_size: int, channels: int | None) -> RawData:
        def prep(x):
            return None if x is None else resize_u8(convert_channels(x, channels), image_size)
        return RawData(prep(raw.train_images), raw.train_labels, prep(raw.test_images), raw.test_labels,
                       list(raw.class_names))

    info = DatasetInfo(loader, default_image_size=int(raw.train_images.shape[-2]), needs_root=False,
                       cache=False, fingerprint=_fingerprint(raw))
    DATASETS._items.pop(name, None)   # noqa: SLF001 - replacing one's own data is allowed
    n_test = len(raw.test_labels) if raw.test_labels is not None else 0
    DATASETS.register(name, description or f"the user's data: {len(raw.train_labels)} train, {n_test} test images, "
                                           f"{len(raw.class_names)} classes")(info)
    return name


def ensure_user_dataset(ref: str, root: str | None = None) -> None:
    """Register the data the user's function ``ref`` (``module:function``) returns under that name (once)."""
    if ref in DATASETS._items:  # noqa: SLF001
        return
    if not is_reference(ref):
        raise ConfigError(f"data.name: {ref!r} is not a 'module:function' reference")
    fn = import_reference(ref, "data.name")
    if not callable(fn):
        raise ConfigError(f"data.name: {ref} is not callable")
    try:
        takes_root = "root" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_root = False
    out = fn(root=root) if takes_root else fn()
    if isinstance(out, dict):
        unknown = sorted(set(out) - {"train", "test", "class_names"})
        if unknown or "train" not in out:
            raise ConfigError(f"data.name: {ref} returned a mapping with keys {sorted(out)}; expected 'train' and "
                              "optionally 'test', 'class_names'")
        register_dataset(ref, out["train"], out.get("test"), out.get("class_names"), f"the user's data from {ref}")
    else:
        register_dataset(ref, out, description=f"the user's data from {ref}")
