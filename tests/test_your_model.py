"""Bring your own model (issue 27): any nn.Module cut by name, the user's data, audit, export, tracking, and
docs/your_model.md executed end to end at a tiny budget."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "your_model.md"

torchvision = pytest.importorskip("torchvision")


# -- 1. cutting any nn.Module --------------------------------------------------------------------------------------
def test_split_torchvision_resnet18_by_qualified_name():
    from splitveil import split
    from splitveil.models import SplitModel
    from splitveil.models.generic import TracedModel
    from splitveil.params import ConfigError

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    enc, dec = split(m, cut="layer2.1")
    with torch.no_grad():
        z = enc(x)
        assert tuple(z.shape) == (2, 128, 4, 4)          # the output of layer2 at 32x32
        assert torch.equal(dec(z), m(x))                 # the two halves are the model
    assert enc[0].get_submodule("conv1").weight is m.conv1.weight   # shared parameters, not copies
    t = TracedModel(m, (3, 32, 32))
    assert t.block_names[:6] == ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1"]
    assert t.cut_index("layer2.1") == t.cut_index("layer2") == t.block_names.index("layer2") + 1
    with pytest.raises(ConfigError, match=r"'layer2\.0\.conv1' cannot be a cut.*skip connection.*valid cuts: conv1, "):
        t.cut_index("layer2.0.conv1")
    sm = SplitModel(m, "layer3", input_shape=(3, 32, 32), bottleneck_channels=8)   # the bottleneck works on it too
    assert sm.cut_name == "layer3" and sm.feature_shape == (8, 2, 2)


class Skip(nn.Module):
    """conv -> (a -> b) + conv output -> head: no cut between a and b (the skip crosses it)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        s = self.stem(x)
        y = self.b(self.a(s)) + s
        return self.head(self.act(y))


def test_skip_across_the_cut_is_refused_with_the_valid_cuts_and_inplace_never_alters_what_is_sent():
    from splitveil import split
    from splitveil.params import ConfigError

    m = Skip().eval()
    with pytest.raises(ConfigError) as e:
        split(m, cut="a")
    msg = str(e.value)
    assert "skip connection" in msg and "'stem'" in msg and "valid cuts: stem, act" in msg, msg
    enc, dec = split(m, cut="stem")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        z = enc(x)
        assert torch.allclose(dec(z), m(x))
    # the cloud starts with an in-place ReLU on what was sent: it must work on a copy
    enc2, dec2 = split(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten()), cut="0")
    with torch.no_grad():
        z2 = enc2(x)
        before = z2.clone()
        dec2(z2)
    assert torch.equal(z2, before) and (before < 0).any()


def test_sequential_and_named_children_models_and_block_models_unchanged():
    from splitveil import split
    from splitveil.models import create_model

    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
    enc, dec = split(seq, cut="2")            # a Sequential child's name ...
    assert len(enc) == 3
    enc_i, _ = split(seq, cut=3)              # ... or the number of edge blocks
    assert len(enc_i) == 3

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.classifier = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    enc, dec = split(Named(), cut="features")
    with torch.no_grad():
        assert tuple(enc(torch.zeros(1, 1, 8, 8)).shape) == (1, 4, 8, 8)
    vgg = create_model("vgg11_bn", 10, (3, 32, 32), 0.125)
    e, d = split(vgg, 2)                       # the BlockModel path as before
    assert list(e._modules) == vgg.block_names[:2]


# -- 2. the user's data --------------------------------------------------------------------------------------------
def test_in_memory_data_follows_the_splitting_rules():
    from splitveil import DataConfig, build_data
    from splitveil.data.user import register_dataset
    from splitveil.params import ConfigError

    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 8, 8, generator=g)               # float in [0, 1]
    y = torch.arange(200) % 4

    class DS(torch.utils.data.Dataset):                     # a map-style dataset of (image, label)
        def __len__(self):
            return 200

        def __getitem__(self, i):
            return x[i], int(y[i])

    register_dataset("t27_tensors", train=(x, y))
    register_dataset("t27_dataset", train=DS())
    a = build_data(DataConfig(name="t27_tensors", aux_size=30, test_fraction=0.25), seed=3)
    b = build_data(DataConfig(name="t27_dataset", aux_size=30, test_fraction=0.25), seed=3)
    # the registered datasets' rule: round(0.25 * 50) = 12 test images per class held out, then 30 aux from the rest
    assert (len(a.train), len(a.test), len(a.aux)) == (122, 48, 30)
    assert torch.bincount(a.test.labels).tolist() == [12, 12, 12, 12]
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.aux.labels, b.aux.labels)
    assert set(a.train.indices.tolist()).isdisjoint(a.aux.indices.tolist())
    assert not set(a.test.indices.tolist()) & (set(a.train.indices.tolist()) | set(a.aux.indices.tolist()))
    assert a.train.images.dtype == torch.uint8
    assert torch.equal(a.train.images, (x[a.train.indices] * 255).round().to(torch.uint8))
    # with its own test part: nothing held out for test
    register_dataset("t27_split", train=(x[:150], y[:150]), test=(x[150:], y[150:]))
    c = build_data(DataConfig(name="t27_split", aux_size=20), seed=0)
    assert (len(c.train), len(c.test), len(c.aux)) == (130, 50, 20)
    with pytest.raises(ConfigError, match=r"float images must lie in \[0, 1\]"):
        register_dataset("t27_bad", train=(x * 2 - 1, y))


# -- 3.-5. the guide, end to end --------------------------------------------------------------------------------
SCALE = {
    "blocks": ["--input", "3,16,16"],
    "run": ["--set", "train.epochs=1", "--set", "data.image_size=16", "--set", "data.train_size=128", "--set",
            "data.test_size=64", "--set", "data.aux_size=128", "--set",
            "attacks={inverse_network: {epochs: 1, batch_size: 32, channels: 16, blocks: 1}}", "--set",
            "eval.latency_repeats=1", "--set", "eval.latency_batch=4", "--set", "threads=1", "--no-progress"],
    "audit": ["--no-progress"],
    "export": [],
}


def guide_parts() -> tuple[dict[str, str], list[list[str]], list[str]]:
    """(files marked <!-- file: NAME -->, bash commands, other python blocks) of docs/your_model.md, in order."""
    text = GUIDE.read_text()
    files, cmds, pys = {}, [], []
    for m in re.finditer(r"(<!-- file: (?P<name>\S+) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", text, re.S):
        if m.group("name"):
            files[m.group("name")] = m.group("body")
        elif m.group("lang") == "bash":
            cmds += [shlex.split(ln) for ln in m.group("body").splitlines() if ln.strip()]
        elif m.group("lang") == "python":
            pys.append(m.group("body"))
    return files, cmds, pys


def test_the_guide_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """docs/your_model.md as written (files, then every command, at the budget the guide states): blocks lists the
    cuts, run trains under noise and logs to TensorBoard, audit at 3 cuts gives the run's own attack MSE at the
    trained cut, export to ONNX matches the eager edge, and the guide's Python blocks run."""
    from splitveil.cli import main

    assert "`blocks` at `--input 3,16,16`" in GUIDE.read_text()   # the doc states the budget used here
    files, cmds, pys = guide_parts()
    assert set(files) == {"mymodels.py", "my_resnet18.yaml"} and [c[1] for c in cmds] == \
        ["blocks", "run", "audit", "export", "export"]
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPLITVEIL_ALLOW_PLUGINS", "1")
    outputs = []
    for argv in cmds:
        assert argv[0] == "splitveil"
        capsys.readouterr()
        rc = main(argv[1:] + SCALE[argv[1]])
        out = capsys.readouterr().out
        assert rc == 0, f"{shlex.join(argv)}: exit {rc}\n{out}"
        outputs.append(out)
    blocks_out, run_out, audit_out, onnx_out, pt2_out = outputs
    assert "| layer2 | layer2.1, layer2.1.relu |" in blocks_out and "skip connection" in blocks_out

    runs = tmp_path / "runs"
    run_dir = next(d for d in runs.iterdir() if d.name.startswith("my-resnet18-"))
    rec = json.loads((run_dir / "metrics.json").read_text())
    assert rec["cut"] == "layer1" and rec["defense"] == "gaussian_noise" and rec["model"] == "mymodels:resnet18"

    # TensorBoard: every epoch and the final record, read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(runs / "tb" / rec["run_id"]))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert "train/loss.task" in tags and "attack/inverse_network/mse" in tags
    assert ev.Scalars("final/accuracy")[0].value == pytest.approx(rec["accuracy"])
    assert ev.Scalars("attack/inverse_network/mse")[0].value == pytest.approx(rec["attacks"]["inverse_network"]["mse"])

    # the audit: 3 cuts; at the trained cut the run's own numbers (same weights, seeds, attacks)
    (adir,) = [d for d in runs.glob("audit-my-resnet18-*") if (d / "audit.json").exists()]   # not a per-cut run folder
    table = json.loads((adir / "audit.json").read_text())
    assert [r["cut"] for r in table["rows"]] == ["maxpool", "layer1", "layer2"]
    at_trained = next(r for r in table["rows"] if r["cut"] == "layer1")
    assert at_trained["inverse_network_mse"] == rec["attacks"]["inverse_network"]["mse"]
    assert at_trained["baseline_mse"] == rec["baseline"]["mean_image"]["mse"]
    other = {r["cut"]: r for r in table["rows"]}
    assert other["layer2"]["shape"] == "128x2x2" and other["maxpool"]["edge_params"] < at_trained["edge_params"]
    print("\n" + (adir / "audit.md").read_text(), file=sys.__stdout__)
    assert "| layer1 | 64x4x4 |" in audit_out
    for r in table["rows"]:
        cut_rec = json.loads((Path(table["runs"][r["cut"]]) / "metrics.json").read_text())
        assert cut_rec["audit"]["cut"] == r["cut"] and (Path(table["runs"][r["cut"]]) / "recon.png").exists()

    # the export: noise is a graph op; with it zeroed in both, onnxruntime equals eager within 1e-5
    import onnx
    import onnxruntime as ort

    from splitveil.experiments.export import eager_noise_off, onnx_without_noise
    from splitveil.experiments.trained import load_edge

    onnx_file = run_dir / "edge.onnx"
    assert "RandomNormalLike" in {n.op_type for n in onnx.load(str(onnx_file)).graph.node}
    edge = load_edge(run_dir)
    x = torch.randn(5, *edge.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), eager_noise_off():
        want = edge(x)
    off = ort.InferenceSession(onnx_without_noise(onnx_file).SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(off.run(None, {"x": x.numpy()})[0])
    assert (got - want).abs().max() < 1e-5
    noisy = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    diff = torch.from_numpy(noisy.run(None, {"x": x.numpy()})[0]) - want
    assert 0.09 < float(diff.std()) < 0.11            # the noise runs on the device, at the run's sigma 0.1
    assert "check: max |exported - eager|" in onnx_out and "check: max |exported - eager| = 0 " in pt2_out

    for body in pys:                                  # the guide's Python examples
        exec(compile(body, str(GUIDE), "exec"), {})


# -- export of an undefended and a PATROL-pruned edge; MLflow; audit of a module:function + state dict ----------
def _digits_cfg(**over):
    from splitveil import config_from_dict

    tree = {"name": "t27", "seed": 0, "device": "cpu", "progress": False, "threads": 1,
            "data": {"name": "digits", "train_size": 256, "test_size": 64, "aux_size": 128},
            "model": {"name": "vgg11_bn", "width": 0.125, "cut": 2},
            "train": {"epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0},
            "defense": {"name": "none"},
            "attacks": {"inverse_network": {"epochs": 1, "batch_size": 32, "channels": 16, "blocks": 1}},
            "eval": {"latency_repeats": 1, "latency_batch": 4, "recon_images": 4}}
    return config_from_dict(tree, [f"{k}={v}" for k, v in over.items()])


def test_undefended_export_parity_and_mlflow_tracking(tmp_path):
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    from splitveil import run_experiment
    from splitveil.experiments.export import export_edge
    from splitveil.experiments.trained import load_edge

    store = tmp_path / "mlruns"
    rec = run_experiment(_digits_cfg(**{"tracking": f"{{mlflow: {store}}}"}), tmp_path / "runs")
    run_dir = tmp_path / "runs" / rec["run_id"]
    meta = export_edge(run_dir, "onnx")
    edge = load_edge(run_dir)
    x = torch.randn(6, *edge.input_shape, generator=torch.Generator().manual_seed(2))
    sess = ort.InferenceSession(meta["path"], providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = edge(x)
    assert meta["random_ops"] == []
    assert (torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]) - want).abs().max() < 1e-5

    client = MlflowClient(store.resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("t27").experiment_id])
    assert run.data.tags["mlflow.runName"] == rec["run_id"] and run.info.status == "FINISHED"
    assert run.data.metrics["final.accuracy"] == pytest.approx(rec["accuracy"])
    hist = client.get_metric_history(run.info.run_id, "train.loss.task")
    assert [m.step for m in hist] == [1, 2]
    assert [m.value for m in hist] == pytest.approx([h["loss.task"] for h in rec["history"]])
    assert run.data.metrics["attack.inverse_network.mse"] == pytest.approx(rec["attacks"]["inverse_network"]["mse"])


def test_patrol_pruned_edge_loads_with_its_pruned_shapes(tmp_path):
    from splitveil import run_experiment
    from splitveil.experiments.trained import load_edge

    cfg = _digits_cfg(**{"defense": "{name: patrol, amount: 0.5, prune_epoch: 1}", "train.epochs": 2,
                         "attacks": "{inverse_network: {epochs: 1, batch_size: 32, channels: 16, blocks: 1}}"})
    rec = run_experiment(cfg, tmp_path / "runs")
    info = rec["defense_info"]["patrol"]
    assert info["pruned"] and info["channels_after"] != info["channels_before"]
    edge = load_edge(tmp_path / "runs" / rec["run_id"])
    convs = [m for m in edge.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:len(info["channels_after"])]] == info["channels_after"]
    with torch.no_grad():
        assert tuple(edge(torch.zeros(1, *edge.input_shape)).shape[1:]) == tuple(rec["feature_shape"])


def test_audit_of_a_user_module_and_a_state_dict(tmp_path, monkeypatch):
    from splitveil.experiments.audit import from_weights, run_audit
    from splitveil.params import ConfigError

    (tmp_path / "t27net.py").write_text(
        "from torch import nn\n"
        "def make(num_classes=10, input_shape=(1, 8, 8)):\n"
        "    c = input_shape[0]\n"
        "    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Flatten(), nn.Linear(8 * 64, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SPLITVEIL_ALLOW_PLUGINS", "1")
    import t27net

    torch.manual_seed(5)
    net = t27net.make(10, (1, 8, 8))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    cfg = _digits_cfg(**{"model.name": "t27net:make", "model.cut": "1", "model.width": 1.0, "data.image_size": 8})
    tr = from_weights(cfg, tmp_path / "w.pt")
    assert torch.equal(tr.prep.model.encoder[0].get_submodule("0").weight, net[0].weight)   # the file's weights
    s = run_audit(tr, "1,3", tmp_path / "runs")
    assert [r["cut"] for r in s["rows"]] == ["1", "3"] and s["rows"][1]["shape"] == "8x8x8"   # Sequential children
    # a pickle that is not a plain state dict is refused before it runs
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="not a readable checkpoint"):
        from_weights(cfg, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        torch.save({"0.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
        from_weights(cfg, tmp_path / "bad.pt")
