"""Runs: resume after an interruption, the results store, the report and the end-to-end privacy checks."""
import json

import pytest

from conftest import tiny_config
from splitveil import run_experiment
from splitveil.cli import main
from splitveil.experiments import ResultsStore
from splitveil.training import Trainer


def test_interrupted_run_is_never_finished_and_resume_matches_uninterrupted(tmp_path, monkeypatch, data_root):
    cfg = tiny_config(**{"train.epochs": 3, "defense.name": "gaussian_noise", "defense.sigma": 0.2})
    full = run_experiment(cfg, tmp_path / "a")

    real = Trainer.train_epoch

    def interrupt_third(self):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "b")
    store = ResultsStore(tmp_path / "b" / "results.sqlite")
    assert store.runs("finished") == []
    assert [r["status"] for r in store.runs()] == ["interrupted"]
    assert not (tmp_path / "b" / cfg.run_id() / "metrics.json").exists()

    monkeypatch.setattr(Trainer, "train_epoch", real)
    resumed = run_experiment(cfg, tmp_path / "b", resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["attacks"]["inverse_network"]["mse"] == pytest.approx(full["attacks"]["inverse_network"]["mse"], rel=1e-6)
    assert [r["status"] for r in store.runs()] == ["finished"]


def test_same_config_same_metrics_and_failed_runs_are_marked(tmp_path, monkeypatch, data_root):
    cfg = tiny_config()
    a = run_experiment(cfg, tmp_path / "a")
    b = run_experiment(cfg, tmp_path / "b")
    assert a["accuracy"] == b["accuracy"]
    assert a["attacks"]["inverse_network"]["mse"] == b["attacks"]["inverse_network"]["mse"]
    # a run that crashes is stored as failed, with the error, and never as finished
    from splitveil.attacks import inverse_network

    def boom(self, edge, data):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(inverse_network.InverseNetworkAttack, "fit", boom)
    crashing = tiny_config(**{"seed": 5})
    with pytest.raises(RuntimeError, match="exploded"):
        run_experiment(crashing, tmp_path / "a")
    row = ResultsStore(tmp_path / "a" / "results.sqlite").get(crashing.run_id())
    assert row["status"] == "failed" and "decoder exploded" in row["error"] and row["metrics"] is None
    assert [r["run_id"] for r in ResultsStore(tmp_path / "a" / "results.sqlite").runs("finished")] == [cfg.run_id()]


def test_end_to_end_privacy_signal_and_records(tmp_path, data_root):
    """Undefended: the inverse network reconstructs far better than the mean image; a large sigma hurts it."""
    base = {"train.epochs": 2, "data.train_size": 1024, "attacks.inverse_network.epochs": 6}
    clean = run_experiment(tiny_config(**base), tmp_path)
    noisy = run_experiment(tiny_config(**base, **{"defense.name": "gaussian_noise", "defense.sigma": 3.0}), tmp_path)
    c, n = clean["attacks"]["inverse_network"], noisy["attacks"]["inverse_network"]
    assert clean["accuracy"] > 0.6 and "chance_accuracy" not in clean["flags"]   # (its 6-epoch attack may be unconverged)
    assert c["mse"] < 0.35 * clean["baseline"]["mean_image"]["mse"]
    assert n["mse"] > 2 * c["mse"]
    for m in (clean, noisy):
        d = tmp_path / m["run_id"]
        assert json.loads((d / "metrics.json").read_text())["status"] == "finished"
        assert (d / "config.yaml").exists() and (d / "recon.png").stat().st_size > 1000 and (d / "checkpoint.pt").exists()
        assert set(m["cost"]) == {"encoder_params", "encoder_flops", "latency_ms", "payload_bytes"}
        assert m["cost"]["payload_bytes"] == 4 * m["feature_shape"][0] * m["feature_shape"][1] * m["feature_shape"][2]
    assert len(ResultsStore(tmp_path / "results.sqlite").runs("finished")) == 2

    # the report lists both runs
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert clean["run_id"] in md and noisy["run_id"] in md
    csv_lines = (tmp_path / "report.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and "inverse_network.mse" in csv_lines[0]


def test_train_init_from_warm_starts_from_a_checkpoint(tmp_path, data_root):
    """train.init_from loads a finished run's weights before the first epoch: with 0 epochs the warm-started run
    is the same model (same accuracy), the file's SHA-256 is recorded; a checkpoint of another model is refused
    naming the field."""
    import hashlib

    from splitveil.experiments.run import run_experiment
    from splitveil.params import ConfigError

    small = {"attacks.inverse_network.epochs": 1, "train.epochs": 2}
    first = run_experiment(tiny_config(**small), tmp_path / "a")
    ckpt = tmp_path / "a" / first["run_id"] / "checkpoint.pt"
    cold = run_experiment(tiny_config(**{**small, "train.epochs": 0}), tmp_path / "b")
    warm = run_experiment(tiny_config(**{**small, "train.epochs": 0, "train.init_from": str(ckpt)}), tmp_path / "c")
    assert warm["accuracy"] == pytest.approx(first["accuracy"], abs=1e-9)
    assert cold["accuracy"] != pytest.approx(first["accuracy"], abs=1e-9)      # an untrained model differs
    assert warm["init_from"] == {"path": str(ckpt), "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert "init_from" not in cold
    with pytest.raises(ConfigError, match="train.init_from"):
        run_experiment(tiny_config(**{**small, "model.width": 0.25, "train.init_from": str(ckpt)}), tmp_path / "d")
    with pytest.raises(ConfigError, match="train.init_from: no checkpoint"):
        run_experiment(tiny_config(**{**small, "train.init_from": str(tmp_path / "none.pt")}), tmp_path / "e")
