"""The report on synthetic result stores (no training): worst case over attacks (recorded or computed for old
runs), flags, the equal-utility gain and CEM control columns in the tables and figures, escaping, the narrow
per-run table, load_results."""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from splitveil.cli import main
from splitveil.experiments import ResultsStore
from splitveil.report.build import build, build_report
from splitveil.report.results import load_records, run_flags, worst_case
from splitveil.report.tables import md_escape

SIGMAS = [0.01, 0.02, 0.05, 0.1, 0.2]


def ref_log_mse(acc: float) -> float:
    """The synthetic noise frontier: log MSE falls linearly from log 0.08 at accuracy 0.5 to log 0.01 at 0.9."""
    return math.log(0.08) + (acc - 0.5) / 0.4 * (math.log(0.01) - math.log(0.08))


def add_run(store: ResultsStore, folder: Path, run_id: str, defense: dict, seed: int, acc: float, mse: float,
            name: str = "study", new_style: bool = True, diag: dict | None = None, extra_attack: float = 1.5,
            flags=None, dataset: str = "cifar10"):
    """One finished run; two attacks: inverse_network (MSE ``mse``) and gan (``extra_attack`` x worse, except
    when extra_attack < 1: then gan is the worst case)."""
    cfg = {"name": name, "seed": seed, "data": {"name": dataset, "train_size": 3000}, "model": {"name": "vgg11_bn", "cut": "conv2"},
           "train": {"epochs": 3}, "defense": defense,
           "attacks": {"inverse_network": {"epochs": 4}, "gan": {"epochs": 2}}}
    names = defense["name"] if isinstance(defense["name"], list) else [defense["name"]]
    info = {n: {k: v for k, v in defense.items() if k != "name"} for n in names if n != "none"}
    attacks = {"inverse_network": {"mse": mse, "mse_std": 0.01, "psnr": -10 * math.log10(mse), "ssim": 0.5,
                                   "n_images": 1000},
               "gan": {"mse": mse * extra_attack, "mse_std": 0.01, "psnr": -10 * math.log10(mse * extra_attack),
                       "ssim": 0.4, "n_images": 1000}}
    m = {"status": "finished", "run_id": run_id, "dataset": dataset, "model": "vgg11_bn", "cut": "conv2",
         "defense": "+".join(names), "defense_info": info, "seed": seed, "accuracy": acc, "attacks": attacks,
         "baseline": {"mean_image": {"mse": 0.06}}, "cost": {"encoder_flops": 1.0e7, "latency_ms": 0.5},
         "sizes": {"train": 3000, "test": 1000, "aux": 2000}}
    if new_style:
        worst = min(attacks, key=lambda a: attacks[a]["mse"])
        m["worst_case"] = {"mse": {"attack": worst, "value": attacks[worst]["mse"]},
                           "psnr": {"attack": worst, "value": attacks[worst]["psnr"]},
                           "ssim": {"attack": "inverse_network", "value": 0.5}}
        m["flags"] = list(flags or [])
    if diag is not None:
        # the schema the CEM defenses write (defenses/cem_common.py feature_diagnostics)
        writer = {"feature_std": "std_z", "within_var_over_tau": "within_cluster_var_over_tau"}
        m["defense_diagnostics"] = {names[-1]: {writer.get(k, k): v for k, v in diag.items()}}
    store.start(run_id, cfg, folder / run_id, m["defense"])
    store.finish(run_id, m)


def synthetic_study(folder: Path, gain: float = 0.3, seeds=(0, 1, 2)) -> Path:
    """Noise swept over 5 sigmas on the frontier; cem_gmm at 3 lambdas with MSE exp(gain) x the frontier at
    its accuracy, and one lambda more accurate than any noise point (outside the range)."""
    store = ResultsStore(folder / "results.sqlite")
    rng = np.random.default_rng(0)
    for i, s in enumerate(SIGMAS):
        acc = 0.88 - 0.08 * i
        for seed in seeds:
            add_run(store, folder, f"n{i}-{seed}", {"name": "gaussian_noise", "sigma": s}, seed, acc,
                    math.exp(ref_log_mse(acc)))
    for j, lam in enumerate([1.0, 4.0, 16.0]):
        acc = 0.84 - 0.1 * j
        for seed in seeds:
            a = acc + rng.normal(0, 0.005)
            add_run(store, folder, f"c{j}-{seed}", {"name": ["gaussian_noise", "cem_gmm"], "sigma": 0.025, "lambda": lam},
                    seed, a, math.exp(ref_log_mse(a) + gain),
                    diag={"feature_std": 0.3, "snr": 12.0 - j, "within_var_over_tau": 0.5, "between_within_ratio": 2.0 + j})
    for seed in seeds:   # more accurate than every noise setting: no gain, a flag
        add_run(store, folder, f"c_hi-{seed}", {"name": ["gaussian_noise", "cem_gmm"], "sigma": 0.025, "lambda": 0.5},
                seed, 0.95, 0.02)
    add_run(store, folder, "none-0", {"name": "none"}, 0, 0.93, 0.004)
    return folder


def test_worst_case_recorded_or_computed_for_old_runs():
    old = {"attacks": {"inverse_network": {"mse": 0.02, "psnr": 17.0, "ssim": 0.6},
                       "rmle": {"mse": 0.01, "psnr": 20.0, "ssim": 0.5}, "gan": {"mse": float("nan")}},
           "baseline": {"mean_image": {"mse": 0.05}}}
    assert worst_case(old, "mse") == ("rmle", 0.01)
    assert worst_case(old, "psnr") == ("rmle", 20.0)
    assert worst_case(old, "ssim") == ("inverse_network", 0.6)     # highest SSIM, not lowest
    assert run_flags(old) == []
    weak = {"attacks": {"inverse_network": {"mse": 0.07}}, "baseline": {"mean_image": {"mse": 0.05}}}
    assert run_flags(weak) == ["weak_attack"]                       # derived for runs without metrics["flags"]
    new = {**old, "worst_case": {"mse": {"attack": "inverse_network", "value": 0.02}}, "flags": ["chance_accuracy"]}
    assert worst_case(new, "mse") == ("inverse_network", 0.02)     # the recorded worst case wins
    assert run_flags(new) == ["chance_accuracy"]
    with pytest.raises(ValueError, match="lpips"):
        worst_case(old, "lpips")
    # the attack suite's own record (worst_case.weak_attacks / weak_attack) and the run's flags are merged
    suite = {**old, "worst_case": {"mse": {"attack": "rmle", "value": 0.01}, "weak_attacks": ["gan"]},
             "weak_attack": True, "flags": ["chance_accuracy"]}
    assert run_flags(suite) == ["chance_accuracy", "weak_attack"]
    assert run_flags({**old, "flags": []}) == []


def test_cem_diagnostics_from_either_key():
    from splitveil.report.results import cem_diagnostics

    a = {"cem_diagnostics": {"feature_std": 0.3, "snr": 12.0, "within_var_over_tau": 0.5, "between_within_ratio": 2.0}}
    b = {"defense_diagnostics": {"cem_slot_cross": {"std_z": 0.3, "snr": 12.0, "within_cluster_var_over_tau": 0.5,
                                                    "between_within_ratio": 2.0, "within_class_var": 9.0}}}
    assert cem_diagnostics(a) == cem_diagnostics(b) == {"feature_std": 0.3, "snr": 12.0, "within_var_over_tau": 0.5,
                                                        "between_within_ratio": 2.0}
    assert cem_diagnostics({}) == dict.fromkeys(["feature_std", "snr", "within_var_over_tau", "between_within_ratio"])


def test_report_on_old_style_runs_uses_the_computed_worst_case(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    for seed in (0, 1):
        # gan is the stronger attack here (0.5 x the inverse network's MSE); nothing records worst_case
        add_run(store, tmp_path, f"r{seed}", {"name": "gaussian_noise", "sigma": 0.1}, seed, 0.8, 0.02 + 0.002 * seed,
                new_style=False, extra_attack=0.5)
    rep = build(tmp_path, figures=False, n_boot=0)
    assert rep.attack == "worst"
    g = rep.sections[0].groups[0]
    assert g.stat("worst.mse")[0] == pytest.approx(0.5 * 0.021) and g.worst_attacks() == ["gan"]
    rec = load_records(tmp_path)
    assert {r["worst.mse.attack"] for r in rec} == {"gan"}


def test_equal_utility_report_tables_figures_and_controls(tmp_path):
    synthetic_study(tmp_path, gain=0.3)
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path), "--reference", "gaussian_noise", "--format", "md,csv,latex", "--out", str(out),
                 "--bootstrap", "300"]) == 0
    rows = {(r["label"]): r for r in csv.DictReader((out / "gains.csv").open())}
    noise = [r for k, r in rows.items() if r["defense"] == "gaussian_noise"]
    assert len(noise) == 5 and all(abs(float(r["gain"])) < 1e-9 for r in noise)       # its own points: 0
    assert all(abs(float(r["ci_low"])) < 1e-9 and abs(float(r["ci_high"])) < 1e-9 for r in noise if r["ci_low"])
    cem = [r for r in rows.values() if r["defense"] == "gaussian_noise+cem_gmm" and r["where"] == "inside"]
    assert len(cem) == 3
    for r in cem:
        # exact up to averaging MSE over seeds of slightly different accuracy (log of a mean, not a mean of logs)
        assert float(r["gain"]) == pytest.approx(0.3, abs=1e-3)
        assert float(r["ci_low"]) <= 0.3 <= float(r["ci_high"])
        assert r["ci_method"].startswith("t, ") and r["ci_kept"] == ""      # t over seeds: nothing dropped
        assert float(r["cem.snr"]) in (12.0, 11.0, 10.0)
    hi = [r for r in rows.values() if r["where"] == "above"]
    assert sorted(r["defense"] for r in hi) == ["gaussian_noise+cem_gmm", "none"]
    hi = [r for r in hi if r["defense"] != "none"]
    assert len(hi) == 1 and hi[0]["gain"] == "" and hi[0]["ci_low"] == ""            # flagged, not extrapolated
    md = (out / "report.md").read_text()
    assert "### Equal-utility gain over gaussian_noise" in md
    assert "| reference | defense | params | n | accuracy | MSE | gain log(MSE/MSE_ref) | 95% CI |" in md
    assert "std(z)/sigma" in md and "between/within" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| gaussian_noise | gaussian_noise+cem_gmm | sigma=0.025 lambda=4 "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[6] == "+0.300" and cells[9] == "yes" and cells[11].startswith("11.000")   # gain, range, std(z)/sigma
    assert cells[7].startswith("[") and "no: above (not extrapolated)" in md
    # the main table: worst case with the attack that achieved it, the fixed settings and the attack budget
    assert "| defense | params | n | accuracy | worst MSE | worst PSNR | worst SSIM | inverse_network mse | gan mse |" in md
    assert "| inverse_network |" in md
    assert "Fixed settings:" in md and "data.train_size=3000" in md and "train.epochs=3" in md
    assert "Attack budget: gan: epochs=2; inverse_network: epochs=4" in md
    tex = (out / "report.tex").read_text()
    assert "equal-utility privacy gain" in tex and "+0.300" in tex and "std(z)/sigma" in tex
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert {"cem.snr_mean", "worst_attacks", "flags"} <= set(summary[0])


def test_tradeoff_figure_has_frontier_band_markers_and_reference_lines(tmp_path):
    from splitveil.report.equal_utility import analyse_groups
    from splitveil.report.plots import tradeoff_figure

    synthetic_study(tmp_path, gain=0.3)
    rep = build(tmp_path, figures=False, references=["gaussian_noise"], n_boot=200)
    sec = rep.sections[0]
    fig, _ = tradeoff_figure(sec.groups, "worst", analyses=sec.analyses, baseline_mse=0.06, undefended_acc=0.93)
    ax = fig.axes[0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]     # the compact key above the axes
    assert "reference frontier, 95% t band" in labels and "Pareto front" in labels
    assert "mean-image baseline MSE" in labels and "undefended accuracy" in labels
    assert [l.get_label() for l in ax.get_lines()].count("gaussian_noise frontier (monotone fit)") == 1
    # one marker per parameter value within a defense (colour is not the only cue)
    cem_markers = {line.get_marker() for c in ax.containers for line in [c.lines[0]]
                   if c.get_label().startswith("gaussian_noise+cem_gmm")}
    assert len(cem_markers) == 4
    assert ax.get_xscale() == "log" and ax.xaxis.label.get_fontsize() >= 8
    # each CEM point inside the noise range carries its gain (+0.30) beside its lambda, the out-of-range one none
    gains = sorted(t.get_text() for t in ax.texts if t.get_text().startswith("λ="))
    assert gains == ["λ=0.5", "λ=1 +0.30", "λ=16 +0.30", "λ=4 +0.30"]
    frontier = next(l for l in ax.get_lines() if l.get_label().endswith("frontier (monotone fit)"))
    assert np.allclose(np.log(frontier.get_xdata()), [ref_log_mse(a) for a in frontier.get_ydata()])
    from splitveil.report.figures import pyplot
    pyplot().close(fig)

    out = tmp_path / "rep"
    written = build_report(tmp_path, ["md"], out, references=["gaussian_noise"], n_boot=50)
    png = (out / "report_files" / "tradeoff_cifar10.png").read_bytes()
    pdf = (out / "report_files" / "tradeoff_cifar10.pdf").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and pdf[:5] == b"%PDF-"
    from PIL import Image
    with Image.open(out / "report_files" / "tradeoff_cifar10.png") as im:
        assert round(im.info["dpi"][0]) == 300
    # every run has the same encoder FLOPs and payload (as CEM and noise in practice): no cost figure
    assert not (out / "report_files" / "cost_cifar10.png").exists() and "cost_cifar10.png" not in written


def test_per_run_table_is_narrow_escapes_names_and_shows_sigma(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    add_run(store, tmp_path, "a", {"name": "gaussian_noise", "sigma": 0.1}, 0, 0.8, 0.02, name="x|<b>evil</b>\n*y*",
            flags=["weak_attack", "chance_accuracy"])
    add_run(store, tmp_path, "b", {"name": "gaussian_noise", "sigma": 0.2}, 0, 0.7, 0.03)
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    header = md.splitlines()[0]
    assert header.startswith("| run_id | status |") and header.count("|") - 1 <= 13
    assert "<b>" not in md and "&lt;b&gt;evil&lt;/b&gt;" in md and "x\\|" in md and "\\*y\\*" in md
    assert md_escape("[a](javascript:x)") == "[a]\\(javascript:x)"
    rows = md.splitlines()[2:4]
    cells = lambda line: len(re.findall(r"(?<!\\)\|", line))          # unescaped cell separators
    assert all(cells(r) == cells(header) for r in rows)                 # the name did not break the table
    assert "gaussian_noise(sigma=0.1)" in md and "gaussian_noise(sigma=0.2)" in md
    assert "weak attack, chance accuracy" in md
    # report.csv keeps every column
    cols = (tmp_path / "report.csv").read_text().splitlines()[0].split(",")
    assert "inverse_network.psnr" in cols and "worst.mse.attack" in cols and "cem.snr" in cols


def test_load_results_dataframe(tmp_path):
    pd = pytest.importorskip("pandas")
    synthetic_study(tmp_path, seeds=(0,))
    df = load_results = __import__("splitveil.report", fromlist=["load_results"]).load_results(tmp_path)
    assert isinstance(df, pd.DataFrame) and len(df) == 5 + 3 + 1 + 1
    assert {"defense", "seed", "accuracy", "worst.mse", "worst.mse.attack", "inverse_network.mse"} <= set(df.columns)
    # the config as columns (sigma and lambda per defense, not buried in a JSON string), flags as lists, std
    assert {"defense.gaussian_noise.sigma", "defense.cem_gmm.lambda", "train.epochs", "data.train_size",
            "attacks.inverse_network.epochs", "inverse_network.mse_std", "history"} <= set(df.columns)
    noise = df[df.defense == "gaussian_noise"].sort_values("accuracy", ascending=False)
    assert list(noise["defense.gaussian_noise.sigma"]) == SIGMAS
    cem = df[df.defense == "gaussian_noise+cem_gmm"]
    assert sorted(cem["defense.cem_gmm.lambda"]) == [0.5, 1.0, 4.0, 16.0]
    assert df.groupby("defense.cem_gmm.lambda")["worst.mse"].mean().index.tolist() == [0.5, 1.0, 4.0, 16.0]
    assert all(isinstance(f, list) for f in df["flags"]) and df["inverse_network.mse_std"].iloc[0] == 0.01


def test_load_results_history_curves_and_flags_lists(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    add_run(store, tmp_path, "a", {"name": "gaussian_noise", "sigma": 0.1}, 0, 0.8, 0.07)     # weak: baseline 0.06
    row = store.get("a")
    m = dict(row["metrics"])
    m["history"] = [{"epoch": 1, "loss.task": 2.0, "test_accuracy": 0.5}, {"epoch": 2, "loss.task": 1.5, "test_accuracy": 0.6}]
    m["attacks"]["inverse_network"]["fit.val_curve"] = [0.1, 0.08, 0.06, 0.05, 0.03]
    m["timings"] = {"train_s": 10.0, "total_s": 30.0, "sessions": 2}
    store.finish("a", m)
    from splitveil.report import load_results
    rec = load_results(tmp_path).iloc[0]
    assert rec["history.test_accuracy"] == [0.5, 0.6] and rec["history.loss.task"] == [2.0, 1.5]
    assert rec["inverse_network.val_curve"] == [0.1, 0.08, 0.06, 0.05, 0.03]
    assert rec["flags"] == ["weak_attack", "unconverged"] and rec["unconverged_attacks"] == ["inverse_network"]
    assert "inverse_network" in rec["weak_attacks"] and rec["time.total_s"] == 30.0


def test_report_on_a_missing_store_names_that_folder(tmp_path, capsys):
    missing = tmp_path / "runs"
    assert main(["report", str(missing) + "/"]) == 2
    err = capsys.readouterr().err
    assert f"{missing}/results.sqlite" in err and f"--out {missing}" in err


def test_proposal_study_export_is_merged_and_idempotent(tmp_path):
    """benchmarks/proposal_study.py: export + report; a re-run without the runs folder keeps every exported run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("proposal_study", Path(__file__).parents[1] / "benchmarks" / "proposal_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "runs").mkdir()
    runs, dest = synthetic_study(tmp_path / "runs", seeds=(0, 1)), tmp_path / "dest"
    assert mod.main([str(runs), "--dest", str(dest), "--bootstrap", "50"]) == 0
    rows = list(csv.DictReader((dest / "results.csv").open()))
    assert len(rows) == 2 * 5 + 2 * 3 + 2 + 1
    assert {"defense", "seed", "accuracy", "inverse_network.mse", "gan.mse", "worst.mse", "worst.mse.attack", "cem.snr"} <= set(rows[0])
    gains = list(csv.DictReader((dest / "gains.csv").open()))
    assert {g["reference"] for g in gains} == {"gaussian_noise", "gaussian_noise+cem_gmm"}   # noise and each CEM variant
    first = (dest / "gains.csv").read_text()
    assert mod.main([str(tmp_path / "gone"), "--dest", str(dest), "--bootstrap", "50"]) == 0
    assert len(json.loads((dest / "results.json").read_text())["runs"]) == len(rows)
    assert (dest / "gains.csv").read_text() == first
