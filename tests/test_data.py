import numpy as np
import pytest
import torch
from PIL import Image

from splitveil.data import DATASETS, DataConfig, build_data
from splitveil.params import ConfigError, coerce


def test_digits_splits_are_disjoint_and_deterministic():
    a = build_data(DataConfig(name="digits", aux_size=100), seed=3)
    b = build_data(DataConfig(name="digits", aux_size=100), seed=3)
    c = build_data(DataConfig(name="digits", aux_size=100), seed=4)
    assert torch.equal(a.train.indices, b.train.indices) and torch.equal(a.aux.indices, b.aux.indices)
    assert not torch.equal(a.train.indices, c.train.indices)
    # digits has no official test split: all three come from one pool and must not overlap
    tr, te, ax = (set(s.indices.tolist()) for s in (a.train, a.test, a.aux))
    assert not (tr & te) and not (tr & ax) and not (te & ax)
    assert len(tr) + len(te) + len(ax) == 1797
    assert len(ax) == 100 and a.image_shape == (1, 32, 32) and a.num_classes == 10


def test_denormalize_round_trip():
    d = build_data(DataConfig(name="digits"), seed=0)
    x01 = d.train.images[:16].float() / 255.0
    back = d.denormalize(d.normalize(x01))
    assert torch.allclose(back, x01, atol=1e-6)
    xn, _ = next(d.batches(d.train, 16))
    assert torch.allclose(d.denormalize(xn), x01, atol=1e-6)
    # normalised training data has roughly zero mean and unit std (statistics of the train split)
    allx = d.normalize(d.train.images.float() / 255.0)
    assert abs(float(allx.mean())) < 1e-3 and abs(float(allx.std()) - 1.0) < 1e-2


def test_mnist_subsets_and_official_test_pool(data_root):
    d = build_data(DataConfig(name="mnist", root=str(data_root), train_size=300, test_size=50, aux_size=200), seed=0)
    assert (len(d.train), len(d.test), len(d.aux)) == (300, 50, 200)
    assert d.test.pool == "test" and d.train.pool == d.aux.pool == "train"
    assert not set(d.train.indices.tolist()) & set(d.aux.indices.tolist())
    assert d.mean == (0.1307,) and d.image_shape == (1, 32, 32)


def test_imagefolder_loader_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "tree" / c / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "tree"), image_size=16, aux_size=3, test_fraction=0.34)
    d = build_data(cfg, seed=0)
    assert d.class_names == ["cat", "dog", "eel"] and d.image_shape == (3, 16, 16)
    assert len(d.test) == 6 and len(d.aux) == 3 and len(d.train) == 9   # 2 test images per class
    cached = list((tmp_path / "cache" / "data").glob("imagefolder-16-*.pt"))
    assert len(cached) == 1
    d2 = build_data(cfg, seed=0)   # second build reads the cache: identical tensors
    assert torch.equal(d.train.images, d2.train.images)


def test_bad_data_config_names_the_field():
    with pytest.raises(ConfigError, match="name"):
        coerce(DataConfig, {"name": "imagenet-xxl"})
    with pytest.raises(ConfigError, match="test_fraction"):
        coerce(DataConfig, {"name": "digits", "test_fraction": 1.5})
    with pytest.raises(ConfigError, match="data.root"):
        build_data(DataConfig(name="mnist"))
    assert {"digits", "mnist", "cifar10", "att_faces", "imagefolder"} <= set(DATASETS.names())


def test_cifar10_binary_batches_and_mnist_gz_layouts(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 python batches and gzipped MNIST IDX files, in folders the test creates."""
    import gzip
    import pickle

    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    batches = tmp_path / "c10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 12) for i in range(1, 6)] + [("test_batch", 8)]:
        with open(batches / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "labels": [i % 10 for i in range(n)]}, fh)
    d = build_data(DataConfig(name="cifar10", root=str(tmp_path / "c10"), aux_size=10), seed=0)
    assert (len(d.train), len(d.test), len(d.aux)) == (50, 8, 10) and d.image_shape == (3, 32, 32)
    assert d.class_names[0] == "airplane" and d.mean == (0.4914, 0.4822, 0.4465)

    raw = tmp_path / "mn" / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(path, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(header + arr.astype(np.uint8).tobytes())

    imgs = rng.integers(0, 255, (30, 28, 28))
    idx(raw / "train-images-idx3-ubyte", imgs)
    idx(raw / "train-labels-idx1-ubyte", np.arange(30) % 10)
    idx(raw / "t10k-images-idx3-ubyte", imgs[:6])
    idx(raw / "t10k-labels-idx1-ubyte", np.arange(6) % 10)
    m = build_data(DataConfig(name="mnist", root=str(tmp_path / "mn"), image_size=28, aux_size=5), seed=0)
    assert (len(m.train), len(m.test)) == (25, 6)
    # pixels survive exactly at native size
    assert torch.equal(m.test.images[:, 0].sort(0).values, torch.from_numpy(imgs[:6].astype(np.uint8)).sort(0).values)
