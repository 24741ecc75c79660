"""Dataset containers, deterministic train/test/aux splits, normalisation and batching."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..registry import Registry


@dataclass
class RawData:
    """Decoded images as uint8 tensors (N, C, H, W) and int64 labels, before any split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    class_names: list[str]


@dataclass
class DatasetInfo:
    """How a registered dataset is loaded: a loader plus its defaults."""

    loader: Callable[..., RawData]   # loader(root, image_size, channels) -> RawData (already resized)
    default_image_size: int
    needs_root: bool = True
    subdir: str | None = None        # looked up under the data root first (e.g. "cifar10")
    mean: tuple[float, ...] | None = None  # per-dataset statistics; None: computed from the train split
    std: tuple[float, ...] | None = None
    # what the data must look like (checked after loading; None: not checked): a folder of other images
    # under a registered name fails with a message naming the mismatch
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None   # compared as a set (folder order may differ)
    channels: int | None = None                  # the dataset's own channels (checked when data.channels is null)
    cache: bool = True               # False: never written to the decode cache (data the user holds in memory)
    fingerprint: str | None = None   # what the run id hashes for data without a root (the user's data: its content)


DATASETS: Registry[DatasetInfo] = Registry("dataset")


@dataclass
class ImageSplit:
    """One split: uint8 images, labels and the indices into the pool they were drawn from."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    pool: str  # "train" or "test": which source pool ``indices`` refer to

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor) -> "ImageSplit":
        return ImageSplit(self.images[idx], self.labels[idx], self.indices[idx], self.pool)


@dataclass
class DataBundle:
    """The three splits of a run (train: target model, test: evaluation, aux: the attacker's data)."""

    name: str
    train: ImageSplit
    test: ImageSplit
    aux: ImageSplit
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def _stats(self, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # made once per device and dtype: a fresh host-to-GPU copy per batch would wait for the GPU's queue
        key = (ref.device, ref.dtype, tuple(self.mean), tuple(self.std))
        cache = self.__dict__.setdefault("_stats_cache", {})
        if key not in cache:
            m = torch.tensor(self.mean, dtype=ref.dtype, device=ref.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=ref.dtype, device=ref.device).view(1, -1, 1, 1)
            cache[key] = (m, s)
        return cache[key]

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the model's input space."""
        m, s = self._stats(images01)
        return (images01 - m) / s

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input space -> [0, 1] images (clamped), the space every image metric uses."""
        m, s = self._stats(x)
        return (x * s + m).clamp(0.0, 1.0)

    def to_model_input(self, images_u8: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        return self.normalize(images_u8.to(device).float() / 255.0)

    def batches(
        self,
        split: ImageSplit,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: bool = False,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised (x, y) batches on ``device``; shuffling/augmentation use ``generator``."""
        n = len(split)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        images, labels = device_resident(split, device)
        order = order.to(images.device)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            imgs = images[idx]
            if augment:
                imgs = random_crop_flip(imgs, generator)
            yield self.to_model_input(imgs, device), labels[idx].to(device)


DEVICE_RESIDENT_MAX_BYTES = 2 * 1024 ** 3  # uint8 images of a split kept on a CUDA device up to this size


def device_resident(split: ImageSplit, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's uint8 images and labels where batches are cut: on a CUDA ``device`` a copy made once and
    kept with the split (unless over ``DEVICE_RESIDENT_MAX_BYTES``), so batching never crosses the bus;
    otherwise the split's own (CPU) tensors."""
    device = torch.device(device)
    if device.type != "cuda" or split.images.nbytes > DEVICE_RESIDENT_MAX_BYTES:
        return split.images, split.labels
    cache = getattr(split, "_on_device", None)
    if cache is None or cache[0] != device or cache[1] is not split.images or cache[2] is not split.labels:
        cache = (device, split.images, split.labels, split.images.to(device), split.labels.to(device))
        split._on_device = cache  # type: ignore[attr-defined]
    return cache[3], cache[4]


def random_crop_flip(images: torch.Tensor, generator: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch: random crop with zero padding and horizontal flip.

    Offsets and flips are drawn on the CPU from ``generator`` (x offsets, y offsets, flips, in that order), so
    the result is the same on every device; the crop is one gather, without a loop over images."""
    n, c, h, w = images.shape
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    dev = images.device
    if dev.type == "cuda":  # one pinned, asynchronous copy: no wait for the GPU's queue
        dx, dy, flip = torch.stack([dx, dy, flip.long()]).pin_memory().to(dev, non_blocking=True).unbind(0)
        flip = flip.bool()
    elif dev.type != "cpu":
        dx, dy, flip = dx.to(dev), dy.to(dev), flip.to(dev)
    padded = F.pad(images, (pad, pad, pad, pad))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)          # (n, c, 2*pad+1, 2*pad+1, h, w), a view
    out = windows[torch.arange(n, device=dev), :, dy, dx]      # (n, c, h, w): each image's own crop
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)


def resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (N, C, H, W) batch to size x size (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(2048):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < max(chunk.shape[-2:]))
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3 and images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    if channels == 1 and images.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")


def stratified_holdout(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held_out) with ``fraction`` of every class held out (at least one)."""
    kept, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:k])
        kept.append(idx[k:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values

