"""``splitveil sweep --dry-run``: an estimated run time per point from a short measured calibration (issue 24, 5)."""
import math

import yaml

from conftest import DATA_ROOT
from splitveil.cli import main
from splitveil.experiments.sweep import load_sweep
from splitveil.experiments.sweep.estimate import Calibration, estimate_point


def _sweep(tmp_path, epochs=(1, 4)):
    tree = {"name": "est", "config": {
        "name": "est", "seed": 0, "device": "cpu", "progress": False,
        "data": {"name": "mnist", "root": str(DATA_ROOT), "train_size": 256, "test_size": 64, "aux_size": 128},
        "model": {"name": "vgg11_bn", "width": 0.125, "cut": 1},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003},
        "defense": {"name": "none"},
        "attacks": {"inverse_network": {"epochs": 2, "batch_size": 32, "channels": 16}, "rmle": {"steps": 5}}},
        "grid": {"train.epochs": list(epochs)}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(tree))
    return f


def test_estimate_scales_with_epochs_and_names_what_it_leaves_out(tmp_path):
    sweep = load_sweep(_sweep(tmp_path))
    calib = Calibration(steps=2)
    import torch
    e1, e4 = (estimate_point(p.config, calib, torch.device("cpu")) for p in sweep.points)
    assert e1.train_s > 0 and e1.attack_s > 0 and e1.not_estimated == ["rmle"]
    step_s, fwd_s, _, _ = calib.model(sweep.points[0].config, torch.device("cpu"))
    # 4 epochs = 4 x the steps of one (256 / 64 = 4 per epoch) plus one more test pass per extra epoch
    assert e4.train_s - e1.train_s == 3 * math.ceil(256 / 64) * step_s + 3 * 64 * fwd_s
    assert e4.attack_s == e1.attack_s                     # the attack does not depend on training epochs
    assert len(calib._model) == 1 and len(calib._data) == 1   # one calibration for both points


def test_dry_run_prints_the_estimate_per_point_and_the_total(tmp_path, capsys):
    assert main(["sweep", str(_sweep(tmp_path)), "--out", str(tmp_path / "out"), "--dry-run",
                 "--calibration-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED run time per point" in out and "ESTIMATED total" in out
    assert out.count("not estimated: rmle") == 2 and "train.epochs=4: ~" in out
    assert main(["sweep", str(_sweep(tmp_path)), "--out", str(tmp_path / "out"), "--dry-run", "--no-estimate"]) == 0
    assert "ESTIMATED" not in capsys.readouterr().out
