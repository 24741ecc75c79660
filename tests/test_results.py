"""The results layer: typed records read metrics.json and rows.json as written before the layer existed
(``tests/data/legacy_run``, made by ``make_fixture.py`` with the code of the day), reports still build from an
old runs folder, and the pipeline gives the same numbers for the same config and seed."""
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from conftest import golden_cpu, tiny_config

from splitveil.results import (AttackResult, EdgeCost, GPZRow, ResultsStore, RunRecord, WorstCase, is_finished,
                               open_store, results_paths, worst_case)

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_run"
sys.path.insert(0, str(LEGACY))
from make_fixture import GPZ_OVER, RUN_OVER  # noqa: E402

RUN_ID = next(p.name for p in (LEGACY / "runs").iterdir() if p.is_dir())


def legacy_metrics() -> dict:
    return json.loads((LEGACY / "runs" / RUN_ID / "metrics.json").read_text())


@pytest.fixture
def legacy_runs(tmp_path) -> Path:
    """A copy of the old runs folder (the store is opened read-write: never touch the fixture)."""
    out = tmp_path / "runs"
    shutil.copytree(LEGACY / "runs", out)
    return out


# -- records ------------------------------------------------------------------------------------------------------
def test_old_metrics_json_round_trips_through_the_record():
    m = legacy_metrics()
    rec = RunRecord.from_dict(m)
    assert rec.to_dict() == m and list(rec.to_dict()) == list(m)            # same keys, same order
    a = rec.attacks["inverse_network"]
    assert isinstance(a, AttackResult) and a.mse == m["attacks"]["inverse_network"]["mse"]
    assert a.fit["epochs"] == m["attacks"]["inverse_network"]["fit.epochs"]
    assert list(a.to_dict()) == list(m["attacks"]["inverse_network"])
    assert isinstance(rec.cost, EdgeCost) and rec.cost.payload_bytes == m["cost"]["payload_bytes"]
    assert rec.baseline_mse == m["baseline"]["mean_image"]["mse"]
    assert rec.worst_metric("mse") == ("inverse_network", m["attacks"]["inverse_network"]["mse"])
    # the legacy inverse network's held-out MSE fell 0.0264 -> 0.0153 in its last epoch: flagged when read back
    assert rec.weak_attacks() == ["inverse_network_plus"] and rec.run_flags() == ["weak_attack", "unconverged"]


def test_unknown_keys_are_kept_and_missing_ones_not_invented():
    m = {**legacy_metrics(), "from_the_future": {"x": 1}}
    m["attacks"]["gan"] = {"mse": 0.5, "ssim_cem": 0.1, "n_images": 3, "fit.k": 2}
    d = RunRecord.from_dict(m).to_dict()
    assert d["from_the_future"] == {"x": 1} and d["attacks"]["gan"] == m["attacks"]["gan"]
    old = {"attacks": {"a": {"mse": 0.02}}, "accuracy": 0.5}
    assert RunRecord.from_dict(old).to_dict() == old


def test_worst_case_computed_for_a_run_recorded_without_it():
    m = legacy_metrics()
    recorded = m.pop("worst_case")
    m.pop("weak_attack")
    m["flags"] = []
    rec = RunRecord.from_dict(m)
    assert rec.worst().to_dict() == recorded          # recomputed from attacks + baseline: what the run recorded
    assert rec.run_flags() == ["weak_attack", "unconverged"]
    # the dict form the run writes (attacks.base re-exports it) agrees with the typed one
    assert worst_case(m["attacks"], m["baseline"]["mean_image"]) == recorded
    assert worst_case({}, {"mse": 1.0}) == {}


def test_worst_case_directions_ties_and_weak_attacks():
    atk = {n: AttackResult(mse=mse, psnr=p, ssim=s, name=n) for n, mse, p, s in
           [("a", 0.02, 17.0, 0.5), ("b", 0.01, 20.0, 0.4), ("c", 0.01, 19.0, 0.6), ("d", 0.09, 9.0, 0.1)]}
    wc = WorstCase.compute(atk, baseline_mse=0.05)
    assert wc.best("mse") == ("b", 0.01)              # a tie goes to the first listed attack
    assert wc.best("psnr") == ("b", 20.0) and wc.best("ssim") == ("c", 0.6)   # highest, not lowest
    assert wc.weak_attacks == ["d"] and wc.beats_baseline is True
    assert WorstCase.compute(atk, baseline_mse=0.005).beats_baseline is False


def test_gpz_rows_round_trip_and_drop_the_attack():
    rows = json.loads((LEGACY / "gpz_rows.json").read_text())["rows"]
    for r in rows:
        row = GPZRow.from_dict(r)
        assert row.to_dict() == r and list(row.to_dict()) == list(r) and row.attacked
        probe_only = row.to_dict(with_attack=False)
        assert "mse" not in probe_only and "fit_seconds" not in probe_only and probe_only["rc2_mean"] == r["rc2_mean"]


# -- the store and the old runs folder ------------------------------------------------------------------------------
def test_store_paths_and_finished_are_decided_once(legacy_runs, tmp_path):
    assert results_paths(legacy_runs) == (legacy_runs, legacy_runs / "results.sqlite")
    assert results_paths(legacy_runs / "results.sqlite") == (legacy_runs, legacy_runs / "results.sqlite")
    row = open_store(legacy_runs).get(RUN_ID)
    assert is_finished(row, legacy_runs / RUN_ID)
    assert not is_finished(row, tmp_path)                                    # no metrics.json: run again
    assert not is_finished({**row, "status": "interrupted"}, legacy_runs / RUN_ID)
    assert not is_finished(None, legacy_runs / RUN_ID)
    with pytest.raises(FileNotFoundError, match="no results store"):
        open_store(tmp_path / "nothing")
    # the old path still imports
    from splitveil.experiments.store import ResultsStore as Old
    assert Old is ResultsStore


def test_an_old_runs_folder_still_reports(legacy_runs):
    from splitveil.cli import main
    from splitveil.report.aggregate import load_runs
    from splitveil.report.build import build_report
    from splitveil.report.results import load_records

    con = sqlite3.connect(legacy_runs / "results.sqlite")
    assert [r[0] for r in con.execute("SELECT status FROM runs")] == ["finished"]   # the old schema, as written
    con.close()
    m = legacy_metrics()
    (rec,) = load_records(legacy_runs)
    assert rec["run_id"] == RUN_ID and rec["accuracy"] == m["accuracy"]
    assert rec["inverse_network.mse"] == m["attacks"]["inverse_network"]["mse"]
    assert rec["worst.mse"] == m["worst_case"]["mse"]["value"] and rec["worst.mse.attack"] == "inverse_network"
    assert rec["flags"] == "weak attack, unconverged attack" and rec["weak_attacks"] == "inverse_network_plus"
    assert rec["encoder_flops"] == m["cost"]["encoder_flops"] and rec["defense_desc"] == "gaussian_noise(sigma=0.1)"
    (run,) = load_runs(legacy_runs)
    assert run.record.to_dict() == m and run.flags == ["weak_attack", "unconverged"] and run.worst_attack["mse"] == "inverse_network"
    assert run.run_dir == legacy_runs / RUN_ID

    assert main(["report", str(legacy_runs)]) == 0
    md = (legacy_runs / "report.md").read_text()
    assert RUN_ID in md and "weak attack" in md and f"{m['worst_case']['mse']['value']:.4f}" in md
    files = build_report(legacy_runs, formats=("md",), out=legacy_runs / "full", n_boot=20)
    text = Path(files["md"]).read_text()
    assert "gaussian_noise" in text and "inverse_network" in text


def test_run_summary_table_reads_the_record():
    from splitveil.commands.run import summary_table

    m = legacy_metrics()
    text = summary_table(m)
    assert text == summary_table(RunRecord.from_dict(m))
    assert f"| inverse_network MSE | {m['attacks']['inverse_network']['mse']:.5f} +-" in text
    assert f"| mean-image baseline MSE | {m['baseline']['mean_image']['mse']:.5f} |" in text
    assert f"| payload / image (bytes) | {m['cost']['payload_bytes']:,} |" in text


# -- same config, same seed, same numbers -------------------------------------------------------------------------
def test_seeds_are_the_ones_runs_always_used():
    from splitveil.experiments.pipeline import Seeds

    s = Seeds(5)
    assert (s.global_, s.data, s.train, s.test_split) == (5, 5, 5, 5)
    assert [s.attack(i) for i in range(3)] == [1005, 2005, 3005]
    assert s.transmit == 12 and s.bootstrap == 16


def _same_precision(recorded: dict) -> bool:
    from splitveil.precision import MixedPrecision

    cfg = tiny_config(**RUN_OVER)
    amp = MixedPrecision.create(cfg.train.precision, cfg.train.channels_last, torch.device("cpu"), field="train")
    return amp.info() == recorded


# where the fixture's data folder resolved on the machine that wrote it: the run id hashes the resolved data folder,
# so a clone elsewhere (CI checks out under another path) would get another id for the same run
FIXTURE_DATA_ROOT = "/work/shared/data/MNIST"


@golden_cpu
def test_the_pipeline_reproduces_the_old_run(tmp_path, data_root, monkeypatch):
    """The fixture's config through today's pipeline: every number the old code recorded comes out again (the
    seeds, the stage order and what each stage draws from the RNG are unchanged)."""
    from splitveil.experiments import config as config_mod
    from splitveil.experiments.run import run_experiment

    monkeypatch.setattr(config_mod, "canonical_data_root", lambda data: FIXTURE_DATA_ROOT)

    old = legacy_metrics()
    if not _same_precision(old["precision"]):
        pytest.skip("this CPU resolves train.precision differently from the one that wrote the fixture")
    m = run_experiment(tiny_config(**RUN_OVER), tmp_path)
    assert m["run_id"] == old["run_id"] and list(m) == list(old)
    assert m["accuracy"] == pytest.approx(old["accuracy"], rel=1e-6)
    assert [pytest.approx(h, rel=1e-6) for h in old["history"]] == m["history"]
    for name, a in old["attacks"].items():
        for k in ("mse", "psnr", "ssim", "n_images", "fit.steps", "fit.val_mse"):
            assert m["attacks"][name][k] == pytest.approx(a[k], rel=1e-5), (name, k)
    assert m["baseline"]["mean_image"]["mse"] == pytest.approx(old["baseline"]["mean_image"]["mse"], rel=1e-9)
    assert m["worst_case"]["mse"] == {"attack": "inverse_network", "value": pytest.approx(old["worst_case"]["mse"]["value"], rel=1e-5)}
    assert m["worst_case"]["weak_attacks"] == old["worst_case"]["weak_attacks"] and m["flags"] == old["flags"]
    assert {k: v for k, v in m["cost"].items() if k != "latency_ms"} == \
        {k: v for k, v in old["cost"].items() if k != "latency_ms"}


@golden_cpu
def test_the_gpz_sweep_reproduces_the_old_rows(tmp_path, data_root):
    from splitveil.experiments.gpz import GPZSweep

    old = json.loads((LEGACY / "gpz_rows.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # as the fixture was written (the sweep does not set threads itself)
    try:
        res = GPZSweep(tiny_config(**GPZ_OVER), tmp_path, probe_images=64, bootstrap=0).run("1,4", attack=True)
    finally:
        torch.set_num_threads(threads)
    assert res["accuracy"] == pytest.approx(old["accuracy"], rel=1e-6)
    for new, was in zip(res["rows"], old["rows"]):
        assert [k for k in new if k in was] == list(was)     # the old keys in the old order (new probes may add keys)
        for k in ("rc2_mean", "sigma2", "within_fraction", "edge_flops", "payload_bytes", "mse", "psnr", "ssim"):
            assert new[k] == pytest.approx(was[k], rel=1e-5), (new["cut"], k)
    assert res["zone"]["zone_cuts"] == old["zone"]["zone_cuts"]


def test_unconverged_flag_from_the_held_out_curve():
    """An attack whose held-out MSE still fell by > 2% over the last fifth of its budget is flagged; a flat tail,
    a tail that got worse, or a curve too short to judge is not."""
    from splitveil.results.records import AttackResult, RunRecord, still_improving

    assert still_improving([1.0, 0.5, 0.4, 0.3, 0.2]) is True            # last fifth (1 of 5): 0.3 -> 0.2
    assert still_improving([1.0, 0.5, 0.4, 0.3, 0.297]) is False         # 1% better: within tolerance
    assert still_improving([1.0, 0.5, 0.4, 0.3, 0.35]) is False          # got worse
    assert still_improving([1.0, 0.5, 0.4, 0.3, 0.29, 0.29, 0.29, 0.29, 0.29, 0.2]) is True   # 2 of 10: 0.29 -> 0.2
    assert still_improving([1.0, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.197]) is False    # 1.5% below the best before
    assert still_improving([0.5]) is None and still_improving(None) is None
    rec = RunRecord.from_dict({"status": "finished", "flags": [], "attacks": {
        "a": {"mse": 0.01, "fit.val_curve": [0.05, 0.04, 0.03, 0.02, 0.01]},
        "b": {"mse": 0.02, "fit.val_curve": [0.05, 0.03, 0.02, 0.02, 0.02]},
        "c": {"mse": 0.03}}})
    assert rec.unconverged_attacks() == ["a"]
    assert "unconverged" in rec.run_flags() and rec.excluded() == ["unconverged"]
    assert AttackResult.from_dict({"mse": 0.03}, "c").unconverged() is None
