"""Datasets in their published layouts (Fashion-MNIST IDX, CIFAR-100 / CIFAR-10 python batches, Tiny ImageNet),
built as small folders here; the restricted unpickler; an attacker's aux set from another dataset."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitveil.data import DataConfig, build_data
from splitveil.data.safe_pickle import safe_load, safe_loads
from splitveil.params import ConfigError


# -- the restricted unpickler -------------------------------------------------------------------------------
class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("fn,args", [(os.system, ("echo pwned",)), (eval, ("1+1",)), (getattr, ("abc", "upper")),
                                     (__import__, ("os",))])
def test_safe_pickle_refuses_code(fn, args):
    data = pickle.dumps({"data": _Evil(fn, *args)}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        safe_loads(data)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_safe_pickle_reads_arrays_and_builtins(protocol):
    d = {"data": np.arange(24, dtype=np.uint8).reshape(2, 12), "fine_labels": [3, 1], "x": (1.5, {2}), "b": b"q"}
    out = safe_loads(pickle.dumps(d, protocol=protocol))
    assert np.array_equal(out["data"], d["data"]) and out["data"].dtype == np.uint8
    assert out["fine_labels"] == [3, 1] and out["x"] == (1.5, {2}) and out["b"] == b"q"


def _cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def test_cifar10_batches_use_the_safe_unpickler(tmp_path):
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    imgs = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs[name] = _cifar_images(4, i)
        with open(root / name, "wb") as fh:
            pickle.dump({"data": imgs[name], "labels": [i % 10, 1, 2, 3], "batch_label": "b"}, fh, protocol=2)
    b = build_data(DataConfig(name="cifar10", root=str(tmp_path), aux_size=2, cache=False))
    assert len(b.train) + len(b.aux) == 20 and len(b.test) == 4
    tb = imgs["test_batch"].reshape(-1, 3, 32, 32)
    assert any(torch.equal(b.test.images[j], torch.from_numpy(tb[0])) for j in range(4))
    with open(root / "data_batch_3", "wb") as fh:   # a crafted batch: refused, nothing runs
        pickle.dump({"data": _Evil(os.system, "touch " + str(tmp_path / "pwned")), "labels": []}, fh, protocol=2)
    with pytest.raises(ConfigError, match=r"data_batch_3: refusing to load global '(posix|os|nt)\.system'"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path), aux_size=2, cache=False))
    assert not (tmp_path / "pwned").exists()


# -- CIFAR-100 ----------------------------------------------------------------------------------------------
def test_cifar100_python_batches_fine_labels(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    tr, te = _cifar_images(30, 1), _cifar_images(10, 2)
    fine_tr, fine_te = [i % 100 for i in range(0, 90, 3)], [99 - i for i in range(10)]
    for name, x, fine in (("train", tr, fine_tr), ("test", te, fine_te)):
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": x, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                         "filenames": [b"f"] * len(fine)}, fh, protocol=2)
    names = [f"class{i}" for i in range(100)]
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]}, fh)
    b = build_data(DataConfig(name="cifar100", root=str(tmp_path), aux_size=5, test_size=10, cache=False))
    assert b.num_classes == 100 and b.class_names[7] == "class7" and b.image_shape == (3, 32, 32)
    # the test split keeps the file's pairing of image and fine label
    x = torch.from_numpy(te.reshape(-1, 3, 32, 32))
    for img, lab in zip(b.test.images, b.test.labels):
        j = next(j for j in range(10) if torch.equal(x[j], img))
        assert int(lab) == fine_te[j]
    assert sorted(torch.cat([b.train.labels, b.aux.labels]).tolist()) == sorted(fine_tr)


# -- Tiny ImageNet --------------------------------------------------------------------------------------------
def test_tiny_imagenet_layout_with_val_annotations(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]                      # sorted: n01 -> 0, n02 -> 1, n03 -> 2
    colours = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250)}
    (folder).mkdir()
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01\tgoldfish\nn02\ttabby cat\nn03\tbus\nn99\tunused\n")
    for w in wnids:
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), colours[w]).save(d / f"{w}_{i}.JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    ann = []
    for i, w in enumerate(["n03", "n01", "n02", "n03"]):
        Image.new("RGB", (64, 64), colours[w]).save(folder / "val" / "images" / f"val_{i}.JPEG")
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    Image.new("L", (64, 64), 128).save(folder / "train" / "n01" / "images" / "n01_grey.JPEG")   # a grey JPEG
    (folder / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    b = build_data(DataConfig(name="tiny_imagenet", root=str(tmp_path), aux_size=2, cache=False))
    assert b.image_shape == (3, 64, 64) and b.class_names == ["goldfish", "tabby cat", "bus"]
    assert len(b.test) == 4 and len(b.train) + len(b.aux) == 10
    for split in (b.train, b.test):
        for img, lab in zip(split.images, split.labels):   # each image's dominant colour names its class
            if img.float().std(0).max() < 1:               # the grey image
                continue
            assert int(img.float().mean((1, 2)).argmax()) == int(lab)
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="wnid of wnids.txt"):
        build_data(DataConfig(name="tiny_imagenet", root=str(tmp_path), aux_size=2, cache=False))


# -- Fashion-MNIST ----------------------------------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def fashion_root(tmp_path: Path, n_train=40, n_test=10) -> Path:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y_tr, y_te = np.arange(n_train) % 10, np.arange(n_test) % 10
    x_tr = (y_tr[:, None, None] * 25 + rng.integers(0, 5, (n_train, 28, 28))).astype(np.uint8)
    x_te = (y_te[:, None, None] * 25 + rng.integers(0, 5, (n_test, 28, 28))).astype(np.uint8)
    for stem, a in (("train-images-idx3-ubyte", x_tr), ("train-labels-idx1-ubyte", y_tr),
                    ("t10k-images-idx3-ubyte", x_te), ("t10k-labels-idx1-ubyte", y_te)):
        _write_idx(folder / f"{stem}.gz", a)
    return tmp_path


def test_fashion_mnist_idx_gz(tmp_path):
    root = fashion_root(tmp_path)
    b = build_data(DataConfig(name="fashion_mnist", root=str(root), image_size=28, aux_size=5, cache=False))
    assert b.image_shape == (1, 28, 28) and b.class_names[9] == "ankle boot" and len(b.test) == 10
    for img, lab in zip(b.test.images, b.test.labels):
        assert int(lab) * 25 <= int(img.min()) and int(img.max()) < int(lab) * 25 + 5


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    b = build_data(DataConfig(name="fashion_mnist", root="/usr/share/datasets", train_size=100, test_size=100,
                              aux_size=100, cache=False))
    assert b.num_classes == 10 and len(b.test) == 100 and b.image_shape == (1, 32, 32)


# -- an attacker's aux set from another dataset ------------------------------------------------------------------
def test_aux_from_another_dataset(tmp_path):
    root = fashion_root(tmp_path)
    cfg = DataConfig(name="fashion_mnist", root=str(root), aux_size=50, aux={"name": "digits"}, cache=False)
    cfg.validate()
    b = build_data(cfg, seed=0)
    assert len(b.train) == 40                       # nothing held out of the victim's pool
    assert len(b.aux) == 50 and b.aux.pool == "aux:digits" and b.aux.images.shape[1:] == (1, 32, 32)
    from splitveil.data.builtin import load_digits
    digits = load_digits(None, 32, 1)
    for img, i in zip(b.aux.images[:5], b.aux.indices[:5]):
        assert torch.equal(img, digits.train_images[i])   # the attacker's images are the other dataset's
    assert b.mean == (0.2860,)                           # the victim's preprocessing applies to them
    assert torch.equal(build_data(cfg, seed=0).aux.indices, b.aux.indices)
    with pytest.raises(ConfigError, match="aux.name"):
        DataConfig(name="digits", aux={"name": "nope"}).validate()
    with pytest.raises(ConfigError, match="unknown field"):
        DataConfig(name="digits", aux={"name": "digits", "size": 3}).validate()
    with pytest.raises(ConfigError, match="data.aux"):   # aux dataset without its root
        build_data(DataConfig(name="digits", aux={"name": "fashion_mnist"}, cache=False))
