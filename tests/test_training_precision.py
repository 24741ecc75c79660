"""Issue 12: precision/layout switches of the training loop, sync-free steps, vectorised augmentation and
checkpoints that resume across precisions. Small and fast: tiny models on the built-in digits."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from splitveil import DataConfig, ModelConfig, TrainConfig, Trainer, build_data, build_defenses, build_split_model
from splitveil import precision as prec
from splitveil.data.base import random_crop_flip
from splitveil.experiments.config import config_from_dict
from splitveil.params import ConfigError, coerce
from splitveil.precision import DeviceMeter, MixedPrecision, resolve_channels_last, resolve_precision
from splitveil.training import NonFiniteLossError


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits", train_size=256, test_size=128, aux_size=64), seed=0)


def make(data, ckpt=None, seed=0, **train):
    torch.manual_seed(seed)
    model = build_split_model(ModelConfig(name="vgg11_bn", cut=2, width=0.125, bottleneck_channels=4),
                              data.num_classes, data.image_shape)
    defenses = build_defenses({"name": "none"})
    defenses.setup(model, data, torch.device("cpu"))
    cfg = dict(epochs=2, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0)
    cfg.update(train)
    return Trainer(model, defenses, data, TrainConfig(**cfg), torch.device("cpu"), seed=seed, ckpt_path=ckpt,
                   show_progress=False, augment=True)


def reference_crop_flip(images, generator, pad=4):
    """The pre-issue-12 per-image loop, kept here as the reference."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


# -- augmentation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,pad", [((16, 3, 8, 8), 4), ((9, 1, 6, 10), 2)])
def test_vectorised_crop_flip_equals_the_per_image_loop(shape, pad):
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        got = random_crop_flip(images, torch.Generator().manual_seed(seed), pad=pad)
        want = reference_crop_flip(images, torch.Generator().manual_seed(seed), pad=pad)
        assert got.dtype == torch.uint8 and got.shape == images.shape
        assert torch.equal(got, want)
    a = random_crop_flip(images, torch.Generator().manual_seed(1), pad=pad)
    b = random_crop_flip(images, torch.Generator().manual_seed(2), pad=pad)
    assert not torch.equal(a, b)  # the draws matter
    # the generator advances exactly as the loop's did (x offsets, y offsets, flips): later draws line up
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    random_crop_flip(images, g1, pad=pad)
    reference_crop_flip(images, g2, pad=pad)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


# -- resolving the switches -------------------------------------------------------------------------------------
def test_resolve_precision_and_channels_last(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16" and resolve_channels_last("auto", cpu) is True
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32" and resolve_channels_last("auto", cpu) is False
    assert resolve_channels_last(True, cpu) is True and resolve_channels_last(False, cpu) is False
    with pytest.raises(ConfigError, match=r"train\.precision.*CUDA"):
        resolve_precision("fp16", cpu, "train.precision")
    with pytest.raises(ConfigError, match=r"x\.precision"):
        resolve_precision("fp64", cpu, "x.precision")
    assert MixedPrecision.create("fp32", False, cpu).scaler is None


def test_train_config_fields_coerce_and_name_the_field():
    assert coerce(TrainConfig, {}).precision == "auto" and coerce(TrainConfig, {}).channels_last == "auto"
    assert coerce(TrainConfig, {"channels_last": "true"}).channels_last is True
    assert coerce(TrainConfig, {"channels_last": False}).channels_last is False
    assert coerce(TrainConfig, {"precision": "bf16"}).precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.precision"):
        config_from_dict({"train": {"precision": "fp64"}})
    with pytest.raises(ConfigError, match=r"train\.channels_last"):
        config_from_dict({"train": {"channels_last": "sometimes"}})
    ids = {config_from_dict({}, [f"train.precision={p}"]).run_id() for p in ("auto", "fp32", "bf16")}
    assert len(ids) == 3  # part of the run id


# -- the step ---------------------------------------------------------------------------------------------------
class CountScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``float(t)``, ``int(t)``, ``bool(t)``, ``t.item()``)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_training_step_never_reads_device_values(digits):
    # SGD: torch's Adam reads its step counter with .item() itself; the trainer's own step must read nothing
    tr = make(digits, optimizer="sgd", lr=0.01, precision="fp32", channels_last=False)
    tr.sync_every = 1000
    with CountScalarReads() as c:
        stats = tr.train_epoch()
    assert c.n == 0
    assert 0.0 <= stats["train_accuracy"] <= 1.0 and stats["loss.task"] > 0


def test_sync_every_reads_once_per_interval(digits):
    tr = make(digits, optimizer="sgd", lr=0.01, precision="fp32", channels_last=False)
    calls = []
    real = DeviceMeter.means
    tr.sync_every = 2

    def spy(self):
        calls.append(1)
        return real(self)

    DeviceMeter.means = spy
    try:
        tr.train_epoch()  # 4 steps: reads after steps 2 and 4, and once at the end of the epoch
    finally:
        DeviceMeter.means = real
    assert len(calls) == 3


def test_bf16_channels_last_keeps_float32_state_and_hands_back_contiguous(digits, tmp_path):
    tr = make(digits, ckpt=tmp_path / "c.pt", precision="bf16", channels_last=True)
    seen = {}
    real_loss = tr.task_loss

    def spy(logits, y):
        w = next(p for p in tr.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
        seen["logits"] = logits.dtype
        seen["cl"] = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        return real_loss(logits, y)

    tr.task_loss = spy
    hist = tr.fit()
    assert seen["logits"] == torch.float32
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert all(t.dtype == torch.float32 for s in tr.optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert all(p.is_contiguous() for p in tr.model.parameters())  # released after fit
    st = torch.load(tmp_path / "c.pt", weights_only=True)
    assert st["precision"] == {"precision": "bf16", "channels_last": True}
    assert all(v.dtype == torch.float32 for v in st["model"].values() if v.is_floating_point())
    assert len(hist) == 2 and all(h["loss.task"] == h["loss.task"] for h in hist)
    # bf16 autocast actually ran: the same seed in fp32 trains to different weights
    ref = make(digits, precision="fp32", channels_last=False)
    ref.fit()
    diff = max((a - b).abs().max().item() for a, b in zip(tr.model.parameters(), ref.model.parameters()))
    assert diff > 1e-4
    assert seen["cl"] is True  # the weights were channels-last during the step


def test_non_finite_loss_is_caught_at_the_next_read(digits, tmp_path):
    tr = make(digits, ckpt=tmp_path / "c.pt", precision="fp32", channels_last=False)
    tr.sync_every = 2
    real = tr.task_loss
    calls = []

    def bad(logits, y):
        calls.append(1)
        loss = real(logits, y)
        return loss * float("nan") if len(calls) == 3 else loss

    tr.task_loss = bad
    with pytest.raises(NonFiniteLossError, match=r"'task'.*epoch 1"):
        tr.fit()
    assert len(calls) == 4  # the NaN at step 3 is seen at the read after step 4, not at the epoch's end
    assert not (tmp_path / "c.pt").exists()  # no checkpoint of a poisoned epoch


@pytest.mark.parametrize("first,then", [("bf16", "fp32"), ("fp32", "bf16")])
def test_checkpoint_resumes_in_the_other_precision(digits, tmp_path, first, then):
    ckpt = tmp_path / "c.pt"
    # a run that trains epoch 1 in ``first`` and writes its checkpoint
    a = make(digits, ckpt=ckpt, epochs=2, precision=first, channels_last=first == "bf16")
    a.cfg.epochs = 1  # stop after epoch 1 (the cosine schedule was built for 2 epochs)
    a.fit()
    # reference: the same object switched to ``then`` for epoch 2, without going through the checkpoint
    a.cfg.epochs, a.ckpt_path = 2, None
    a.amp = MixedPrecision.create(then, then == "bf16", "cpu")
    a.fit()
    # a fresh trainer configured with ``then`` resumes from the checkpoint
    b = make(digits, ckpt=ckpt, epochs=2, seed=123, precision=then, channels_last=then == "bf16")
    hist = b.fit(resume=True)
    assert [h["epoch"] for h in hist] == [1, 2] and b.epoch == 2
    for (name, p), q in zip(b.model.named_parameters(), a.model.parameters()):
        assert p.dtype == torch.float32
        assert torch.equal(p, q), name
    assert hist[-1]["test_accuracy"] == a.history[-1]["test_accuracy"]


def test_run_records_resolved_precision(tmp_path):
    from splitveil import run_experiment

    cfg = config_from_dict({
        "name": "p", "device": "cpu", "progress": False,
        "data": {"name": "digits", "train_size": 128, "test_size": 64, "aux_size": 64},
        "model": {"name": "vgg11_bn", "width": 0.125, "cut": 1},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "precision": "bf16",
                  "channels_last": "auto"},
        "attacks": {"inverse_network": {"epochs": 1, "batch_size": 32, "channels": 8}},
        "eval": {"latency_repeats": 1, "latency_batch": 2, "recon_images": 2},
    })
    m = run_experiment(cfg, tmp_path)
    want = {"precision": "bf16", "channels_last": prec.fast_bf16("cpu")}
    assert m["precision"] == want
    assert json.loads((tmp_path / cfg.run_id() / "metrics.json").read_text())["precision"] == want


def test_allocator_tuning_cuts_page_faults_and_changes_no_number():
    """tune_allocator (glibc): the same computation gives bit-identical results, with far fewer minor page faults
    per repeated multi-megabyte allocation (counted, not timed)."""
    import resource
    import subprocess
    import sys

    code = r'''
import resource, sys, torch
from splitveil.runtime import tune_allocator
if sys.argv[1] == "1":
    assert tune_allocator()["tuned"]
torch.manual_seed(0)
w = torch.randn(64, 64, 3, 3)
acc = torch.zeros(())
for i in range(5):
    x = torch.randn(64, 64, 32, 32)          # 16 MB: above glibc's initial mmap threshold
    acc += torch.nn.functional.conv2d(x, w, padding=1).sum()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    x = torch.randn(64, 64, 32, 32)
    acc += torch.nn.functional.conv2d(x, w, padding=1).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, repr(float(acc)))
'''
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc allocator tuning is Linux-only")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SPLITVEIL_MALLOC_TUNE", None)
    out = {t: subprocess.run([sys.executable, "-c", code, t], capture_output=True, text=True, env=env, check=True).stdout.split()
           for t in ("0", "1")}
    faults_off, faults_on = int(out["0"][0]), int(out["1"][0])
    assert out["0"][1] == out["1"][1]                  # the same numbers, bit for bit
    assert faults_on * 5 < faults_off, (faults_on, faults_off)


def test_lr_warmup_is_linear_per_step_then_the_schedule_takes_over():
    """train.warmup_epochs: lr rises linearly per step over the warm-up to the schedule's lr; the epoch-wise
    schedule then decays from its own value (not from a warmed-up one)."""
    from splitveil.data.base import DataBundle, ImageSplit
    from splitveil.defenses import build_defenses

    g = torch.Generator().manual_seed(0)
    split = ImageSplit(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=g),
                       torch.randint(0, 2, (32,), generator=g), torch.arange(32), "train")
    data = DataBundle("synthetic", split, split, split, 2, ["a", "b"], (0.5,), (0.25,))

    def lrs(cfg):
        torch.manual_seed(0)
        model = build_split_model(ModelConfig(name="vgg11_bn", width=0.125, cut=1), 2, (1, 8, 8))
        tr = Trainer(model, build_defenses({"name": "none"}), data, cfg, torch.device("cpu"), show_progress=False)
        seen = []
        real = tr.optimizer.step

        def step(*a, **k):
            seen.append(round(tr.optimizer.param_groups[0]["lr"], 10))
            return real(*a, **k)
        tr.optimizer.step = step
        while tr.epoch < cfg.epochs:
            tr.train_epoch()
        return seen

    cfg = TrainConfig(epochs=3, batch_size=8, optimizer="sgd", lr=0.1, schedule="multistep", milestones=[2], gamma=0.1,
                      warmup_epochs=1.5, precision="fp32", channels_last=False)
    got = lrs(cfg)
    assert got == pytest.approx([0.1 * k / 6 for k in range(1, 7)] + [0.1, 0.1] + [0.01] * 4)
    plain = lrs(TrainConfig(**{**cfg.__dict__, "warmup_epochs": 0.0}))
    assert plain == pytest.approx([0.1] * 8 + [0.01] * 4)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        coerce(TrainConfig, {"epochs": 2, "warmup_epochs": 3})
