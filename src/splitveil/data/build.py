"""Build the train/test/aux splits of a run from a :class:`DataConfig` (with an on-disk decode cache)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..params import ConfigError, require
from .base import DATASETS, DataBundle, ImageSplit, RawData, stratified_holdout

CACHE_VERSION = 2
MAX_IMAGE_SIZE = 1024   # pixels a side: 60,000 RGB images at 1024 px are already 189 GB


@dataclass
class DataConfig:
    name: str = "digits"
    root: str | None = None          # data root (e.g. ../shared/data; null: $SPLITVEIL_DATA); the dataset's
                                     # sub-folder is found under it. Relative: to the config file
    image_size: int | None = None    # None: the dataset's default
    channels: int | None = None      # None: the dataset's own; 1 or 3 to convert
    train_size: int | None = None    # subset of the training images (after the aux hold-out); None: all
    test_size: int | None = None     # subset of the test images; None: all
    aux_size: int | None = None      # attacker images held out from the training pool (disjoint from train)
    aux_fraction: float = 0.2        # used when aux_size is null: this fraction of the training pool (an attacker with more data is the honest default)
    test_fraction: float = 0.2       # for datasets without an official test split
    augment: bool = False            # random crop + flip on training batches
    cache: bool = True               # cache decoded tensors on disk (SPLITVEIL_CACHE or ~/.cache/splitveil)
    aux: dict | None = None          # attacker data from another dataset: {name, root (default: data.root)};
                                     # aux_size images of its training pool, at this dataset's size and channels

    def validate(self) -> None:
        from ..references import is_reference

        if is_reference(self.name):   # the user's data, "module:function" (data/user.py): registered on first use
            from .user import ensure_user_dataset

            ensure_user_dataset(self.name, self.root)
        require(self.name in DATASETS, "name", DATASETS.unknown(self.name))
        require(self.image_size is None or 4 <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
                f"{self.image_size} is outside 4..{MAX_IMAGE_SIZE} (every image is decoded to this size and held in "
                f"memory)")
        require(self.channels in (None, 1, 3), "channels", "must be 1, 3 or null")
        for f in ("train_size", "test_size"):
            v = getattr(self, f)
            require(v is None or v > 0, f, "must be positive or null")
        require(self.aux_size is None or self.aux_size > 0, "aux_size", "must be positive or null")
        require(0.0 < self.aux_fraction < 1.0, "aux_fraction", "must be in (0, 1)")
        require(0.0 < self.test_fraction < 1.0, "test_fraction", "must be in (0, 1)")
        if self.aux is not None:
            require(isinstance(self.aux, dict) and "name" in self.aux, "aux",
                    "must be a mapping with the attacker's dataset name, e.g. {name: mnist, root: ...}, or null")
            unknown = sorted(set(self.aux) - AUX_FIELDS)
            require(not unknown, "aux", f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(AUX_FIELDS))}")
            require(self.aux["name"] in DATASETS, "aux.name",
                    f"unknown dataset '{self.aux['name']}'; registered: {', '.join(DATASETS.names())}")


AUX_FIELDS = {"name", "root"}


def aux_data_config(cfg: DataConfig, channels: int) -> DataConfig:
    """The DataConfig that loads ``cfg.aux``: its own name and root (default: ``cfg.root``), this dataset's image
    size and ``channels`` (so the attacker's images match the victim's after preprocessing)."""
    a = cfg.aux or {}
    return DataConfig(name=a["name"], root=a.get("root", cfg.root),
                      image_size=cfg.image_size or DATASETS.get(cfg.name).default_image_size,
                      channels=channels, cache=cfg.cache)


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITVEIL_CACHE", Path.home() / ".cache" / "splitveil"))


def resolve_root(cfg: DataConfig) -> Path | None:
    info = DATASETS.get(cfg.name)
    if not info.needs_root:
        return None
    root_s = cfg.root or os.environ.get("SPLITVEIL_DATA") or None
    if root_s is None:
        raise ConfigError(f"data.root: dataset '{cfg.name}' needs a data root (--data-root DIR, data.root in the "
                          f"config, or the SPLITVEIL_DATA environment variable)")
    root = Path(root_s).expanduser()
    if info.subdir and (root / info.subdir).exists():
        root = root / info.subdir
    if not root.exists():
        raise ConfigError(f"data.root: {root} does not exist")
    return root.resolve()


def fingerprint(root: Path) -> str:
    """A hash of every file under ``root`` (relative path, size, modification time in ns): replacing,
    adding or removing any image changes it, so the decode cache is never stale (~0.5 s for 60,000 files)."""
    h = hashlib.sha256()
    if root.is_file():
        st = root.stat()
        h.update(f"{root.name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            try:
                st = os.stat(p)
            except OSError:
                continue
            h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_raw(cfg: DataConfig) -> RawData:
    """Decode the dataset (or read the decoded tensors from the cache)."""
    info = DATASETS.get(cfg.name)
    root = resolve_root(cfg)
    size = cfg.image_size or info.default_image_size
    key_src = {"v": CACHE_VERSION, "name": cfg.name, "root": str(root), "size": size, "channels": cfg.channels}
    if root is not None:
        key_src["files"] = fingerprint(root)
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "data" / f"{cfg.name}-{size}-{key}.pt"
    from ..utils import atomic_torch_save, load_or_none

    # the cache file's recorded SHA-256 is checked first: an altered or damaged cache is set aside and decoded again
    d = load_or_none(path, "decoding the dataset again") if cfg.cache else None
    if d is not None:
        try:
            return RawData(d["train_images"], d["train_labels"], d.get("test_images"), d.get("test_labels"),
                           list(d["class_names"]))
        except (KeyError, TypeError):  # written by another version: decode again
            pass
    raw = _decode(info, root, size, cfg)
    if cfg.cache:
        d = {k: v for k, v in raw.__dict__.items() if v is not None}
        atomic_torch_save(d, path)  # atomic: concurrent runs never read a half-written cache
    return raw


def _decode(info, root: Path | None, size: int, cfg: DataConfig) -> RawData:
    """The dataset's loader; a data file refused by the safe unpickler is a ConfigError naming ``data.root``
    and the file."""
    import pickle

    try:
        return info.loader(root, size, cfg.channels)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"data.root: {root}: {e}") from None


def check_raw(cfg: DataConfig, raw: RawData, root: Path | None) -> None:
    """The loaded data matches what its registered name promises (class count, class names, channels) and
    has at least two classes; otherwise a ConfigError naming the mismatch."""
    info = DATASETS.get(cfg.name)
    where = f"data.root: {root} as data.name '{cfg.name}'" if root is not None else f"data.name '{cfg.name}'"
    k = len(raw.class_names)
    if info.num_classes is not None and k != info.num_classes:
        raise ConfigError(f"{where}: found {k} classes, '{cfg.name}' has {info.num_classes}; "
                          f"is the root the right dataset?")
    if info.class_names is not None and set(raw.class_names) != set(info.class_names):
        odd = sorted(set(raw.class_names) ^ set(info.class_names), key=str)[:5]
        raise ConfigError(f"{where}: class names differ from '{cfg.name}''s ({', '.join(map(str, odd))} ...); "
                          f"is the root the right dataset?")
    c = int(raw.train_images.shape[1])
    if cfg.channels is None and info.channels is not None and c != info.channels:
        raise ConfigError(f"{where}: images have {c} channel(s), '{cfg.name}' has {info.channels}; "
                          f"is the root the right dataset?")
    labels = [raw.train_labels] + ([raw.test_labels] if raw.test_labels is not None else [])
    for y in labels:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ConfigError(f"{where}: labels outside 0..{k - 1}")
    present = int(torch.unique(raw.train_labels).numel())
    if k < 2 or present < 2:
        raise ConfigError(f"{where}: {min(k, present)} class(es) found; a classifier "
                          f"needs at least 2 (expected <root>/<class>/<image> with one folder per class)")


def _take(n: int | None, idx: torch.Tensor) -> torch.Tensor:
    return idx if n is None else idx[: min(n, len(idx))]


def build_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Deterministic splits for ``seed``: aux is held out of the training pool, disjoint from train and test."""
    info = DATASETS.get(cfg.name)
    raw = load_raw(cfg if info.cache else dataclasses.replace(cfg, cache=False))   # data held in memory: no cache
    check_raw(cfg, raw, resolve_root(cfg))
    g = torch.Generator().manual_seed(10_007 + seed)
    pool_x, pool_y = raw.train_images, raw.train_labels
    if raw.test_images is None:
        tr_idx, te_idx = stratified_holdout(pool_y, cfg.test_fraction, g)
        test = ImageSplit(pool_x[te_idx], pool_y[te_idx], te_idx, "train")
        pool_idx = tr_idx
    else:
        te_idx = torch.arange(len(raw.test_labels))
        test = ImageSplit(raw.test_images, raw.test_labels, te_idx, "test")
        pool_idx = torch.arange(len(pool_y))
    n_aux = cfg.aux_size if cfg.aux_size is not None else max(1, round(cfg.aux_fraction * len(pool_idx)))
    if cfg.aux is not None:   # the attacker's data is another dataset: nothing is held out of this one
        n_aux = 0
    if n_aux >= len(pool_idx):
        raise ConfigError(f"data.aux_size: {n_aux} leaves no training images (pool has {len(pool_idx)})")
    perm = pool_idx[torch.randperm(len(pool_idx), generator=g)]
    aux_idx, train_idx = perm[:n_aux], perm[n_aux:]
    train_idx = _take(cfg.train_size, train_idx)
    test_sel = _take(cfg.test_size, torch.randperm(len(test), generator=g))
    train = ImageSplit(pool_x[train_idx], pool_y[train_idx], train_idx, "train")
    aux = ImageSplit(pool_x[aux_idx], pool_y[aux_idx], aux_idx, "train")
    if cfg.aux is not None:
        aux = _other_aux(cfg, train.images.shape[1:], n_aux_other=cfg.aux_size, g=g)
    test = test.subset(test_sel)
    if info.mean is not None and len(info.mean) == train.images.shape[1]:
        mean, std = info.mean, info.std
    else:  # statistics of this run's training split, per channel
        x = train.images.float() / 255.0
        mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
        std = tuple(max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3)))
    return DataBundle(cfg.name, train, test, aux, len(raw.class_names), raw.class_names, mean, std)


def _other_aux(cfg: DataConfig, shape: torch.Size, n_aux_other: int | None, g: torch.Generator) -> ImageSplit:
    """``aux_size`` images (default: all) drawn at random from the training pool of the dataset ``cfg.aux`` names,
    loaded at this dataset's image size and channels; its labels are its own classes (``source`` 'aux:<name>')."""
    acfg = aux_data_config(cfg, int(shape[0]))
    try:
        raw = load_raw(acfg)
    except ConfigError as e:
        raise ConfigError(f"data.aux: {e}") from None
    if tuple(raw.train_images.shape[1:]) != tuple(shape):
        raise ConfigError(f"data.aux: '{acfg.name}' images are {tuple(raw.train_images.shape[1:])} after "
                          f"preprocessing, the victim's are {tuple(shape)}")
    idx = torch.randperm(len(raw.train_labels), generator=g)
    idx = _take(n_aux_other, idx)
    return ImageSplit(raw.train_images[idx], raw.train_labels[idx], idx, f"aux:{acfg.name}")

