"""Issue 13: results that are never silently wrong, work that is never lost, clear errors on bad input."""
import json

import pytest
import torch

from splitveil import config_from_dict, run_experiment
from splitveil.training import Trainer
from splitveil.training.trainer import NonFiniteLossError


def digits_config(**over):
    """A ~1 s run config on the bundled digits (no data root), 16x16 images, tiny VGG."""
    tree = {
        "name": "r", "seed": 0, "device": "cpu", "progress": False,
        "data": {"name": "digits", "train_size": 256, "test_size": 128, "aux_size": 64, "image_size": 16},
        "model": {"name": "vgg11_bn", "width": 0.125, "cut": 1},
        "train": {"epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0},
        "attacks": {"inverse_network": {"epochs": 1, "batch_size": 32, "channels": 8}},
        "eval": {"latency_repeats": 1, "latency_batch": 2, "recon_images": 2},
    }
    return config_from_dict(tree, [f"{k}={v}" for k, v in over.items()])


# -- results that are silently wrong ---------------------------------------------------------------------

def test_infinite_weights_or_bn_statistics_fail_the_run_naming_train_lr(tmp_path, monkeypatch):
    real = Trainer.train_epoch

    def overflow_bn(self):
        stats = real(self)
        bn = next(m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(float("inf"))   # finite losses, overflowed statistics (as with SGD at lr=1e6)
        return stats

    monkeypatch.setattr(Trainer, "train_epoch", overflow_bn)
    cfg = digits_config()
    with pytest.raises(NonFiniteLossError, match="train.lr") as e:
        run_experiment(cfg, tmp_path)
    assert "running_var" in str(e.value)
    from splitveil.experiments import ResultsStore
    assert ResultsStore(tmp_path / "results.sqlite").get(cfg.run_id())["status"] == "failed"
    assert not (tmp_path / cfg.run_id() / "metrics.json").exists()


def test_chance_accuracy_is_flagged_in_metrics(tmp_path):
    from splitveil.experiments.run import chance_accuracy, quality_flags

    labels = torch.arange(10).repeat(20)            # balanced, 200 images: chance 0.1 + 2 * 0.0212
    assert chance_accuracy(labels, 10) == pytest.approx(0.1 + 2 * (0.09 / 200) ** 0.5)

    class D:
        num_classes = 10
        test = type("S", (), {"labels": labels})()
    assert quality_flags(0.12, D) == ["chance_accuracy"] and quality_flags(0.5, D) == []
    # Adam at lr=1e6 keeps finite weights but learns nothing: stored with the flag
    m = run_experiment(digits_config(**{"train.lr": 1e6}), tmp_path)
    assert m["accuracy"] < 0.3 and "chance_accuracy" in m["flags"]
    assert json.loads((tmp_path / m["run_id"] / "metrics.json").read_text())["flags"] == ["chance_accuracy"]
