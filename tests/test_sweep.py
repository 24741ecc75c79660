"""Sweeps (local processes and Ray), resume after a killed worker, and the grouped report (md / CSV / LaTeX /
HTML checked in headless Chromium)."""
import csv
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_config
from splitveil.cli import main
from splitveil.experiments import ResultsStore
from splitveil.experiments.sweep import expand, load_sweep, run_sweep, sweep_from_dict
from splitveil.params import ConfigError
from splitveil.report.aggregate import pareto_front
from splitveil.report.build import build_report

# a tiny MNIST base (a few seconds per run); the attack is shortened further than tiny_config's
BASE_OVERRIDES = {"data.train_size": 384, "data.test_size": 64, "data.aux_size": 192,
                  "attacks.inverse_network.epochs": 2, "attacks.inverse_network.channels": 16}


def tiny_sweep(tmp_path: Path, name: str, points=None, grid=None, **over) -> Path:
    base = tiny_config(**{**BASE_OVERRIDES, **over}).to_dict()
    tree = {"name": name, "config": base, "grid": grid or {"seed": [0, 1]}}
    if points is not None:
        tree["points"] = points
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def store_rows(out: Path) -> dict[str, dict]:
    return {r["run_id"]: r for r in ResultsStore(out / "results.sqlite").runs()}


def test_sweep_file_expansion_and_errors(tmp_path):
    tree = {"points": [{"defense.name": "none"}, {"defense.name": "gaussian_noise", "defense.sigma": 0.5}],
            "grid": {"seed": [0, 1, 2], "train.lr": [0.01, 0.003]}}
    combos = expand(tree)
    assert len(combos) == 2 * 3 * 2
    assert combos[0] == {"defense.name": "none", "seed": 0, "train.lr": 0.01}
    assert combos[-1] == {"defense.name": "gaussian_noise", "defense.sigma": 0.5, "seed": 2, "train.lr": 0.003}
    base = tiny_config().to_dict()
    sw = sweep_from_dict({"name": "x", "config": base, **tree}, out=tmp_path)
    assert len(sw.points) == 12 and len({p.run_id for p in sw.points}) == 12
    assert all(p.config.progress is False for p in sw.points)
    p6 = sw.points[6].config
    assert p6.defense == {"name": "gaussian_noise", "sigma": 0.5} and p6.seed == 0 and p6.train.lr == 0.01
    # two override sets that resolve to the same config are one run
    dup = sweep_from_dict({"config": base, "points": [{"seed": 1}, {"seed": 1}]}, out=tmp_path)
    assert len(dup.points) == 1
    with pytest.raises(ConfigError, match="unknown sweep field 'grids'"):
        sweep_from_dict({"config": base, "grids": {}})
    with pytest.raises(ConfigError, match="grid.seed: expected a non-empty list"):
        sweep_from_dict({"config": base, "grid": {"seed": 3}})
    with pytest.raises(ConfigError, match=r"point 0 \(train.epoch=2\).*unknown field 'train.epoch'"):
        sweep_from_dict({"config": base, "points": [{"train.epoch": 2}]})


def test_shipped_sweep_files_resolve_against_the_registries():
    files = sorted((ROOT / "sweeps").glob("*.yaml"))
    names = {f.stem for f in files}
    for stem in ("cifar10_defenses", "cem_tradeoff", "slot_ablation", "gpz_layers"):
        assert {stem, f"{stem}-cpu"} <= names
    for f in files:
        sw = load_sweep(f)   # every point builds a valid config: defenses, params, attacks exist
        assert len(sw.points) >= 4, f.name
        assert sw.resources["cpus"] >= 1
    table1 = load_sweep(ROOT / "sweeps" / "cifar10_defenses-cpu.yaml")
    labels = {p.config.defense_label() for p in table1.points}
    for d in ("none", "gaussian_noise", "dropout", "nopeek", "label_smoothing", "patrol", "noise_arl", "topk_prune"):
        assert any(lab == d or lab.startswith(d + "+") for lab in labels), d
        assert any(lab.startswith(d) and "cem_gmm" in lab or (d == "none" and lab == "cem_gmm") for lab in labels), d


def test_pareto_front():
    pts = [(0.01, 0.9), (0.02, 0.85), (0.015, 0.8), (0.03, 0.5), (0.02, 0.85), (0.005, 0.95)]
    # (0.015, 0.8) is dominated by (0.02, 0.85); equal points are both kept; sorted by the first coordinate
    assert pareto_front(pts) == [5, 0, 1, 4, 3]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("local")
    path = tiny_sweep(tmp, "tiny", points=[{"defense.name": "none"},
                                           {"defense.name": "gaussian_noise", "defense.sigma": 1.0}])
    sweep = load_sweep(path, out=tmp / "out")
    res = run_sweep(sweep, backend="local", workers=2, progress=False)
    return sweep, res


def test_local_sweep_one_finished_row_per_point_and_rerun_skips(local_sweep):
    sweep, res = local_sweep
    ids = [p.run_id for p in sweep.points]
    assert len(ids) == 4 and res.complete and sorted(res.finished) == sorted(ids) and res.skipped == []
    rows = store_rows(sweep.out)
    assert sorted(rows) == sorted(ids)
    assert all(r["status"] == "finished" and r["metrics"]["run_id"] == r["run_id"] for r in rows.values())
    assert res.slots == 2 and all(s > 0 for s in res.run_seconds.values())
    before = {rid: r["updated"] for rid, r in rows.items()}
    again = run_sweep(load_sweep(sweep.source, out=sweep.out), workers=2, progress=False)
    assert sorted(again.skipped) == sorted(ids) and again.ran == [] and again.complete
    assert {rid: r["updated"] for rid, r in store_rows(sweep.out).items()} == before


def _chromium_dom(html_path: Path, tmp: Path) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
           html_path.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_formats_and_html_in_headless_chromium(local_sweep, tmp_path):
    sweep, _ = local_sweep
    assert main(["report", str(sweep.out), "--format", "md,csv", "--format", "latex", "--format", "html",
                 "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## mnist" in md and "| defense | params | n | accuracy |" in md and "| gaussian_noise | sigma=1 | 2 |" in md and " ± " in md
    tradeoff = "report_files/tradeoff_mnist.png" in md
    if tradeoff:
        assert (tmp_path / "report_files" / "tradeoff_mnist.png").stat().st_size > 5000
    else:   # this tiny sweep's runs are flagged (chance accuracy, unconverged attack): kept out, and said so
        assert "Excluded" in md and "chance accuracy" in md
    assert (tmp_path / "report_files" / "recon_mnist.png").stat().st_size > 5000
    assert len((tmp_path / "report.csv").read_text().strip().splitlines()) == 1 + 4
    tex = (tmp_path / "report.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\toprule" in tex and "gaussian\\_noise" in tex and "\\pm" in tex

    html = tmp_path / "report.html"
    text = html.read_text()
    assert "src=\"http" not in text and "<link" not in text        # self-contained: nothing to fetch
    dom = _chromium_dom(html, tmp_path)
    assert 'data-tables="2"' in dom                                 # the summary table and the all-runs table
    images = int(dom.split('data-images="')[1].split('"')[0])
    # the reconstruction grid, and the trade-off figure unless every run is excluded; each decoded in the browser
    assert images >= (2 if tradeoff else 1) and f'data-images-loaded="{images}"' in dom
    assert dom.count("<tr") >= 1 + 2 + 1 + 4 and "gaussian_noise" in dom and "±" in dom

    # the default behaviour is unchanged: the per-run table printed, report.md / report.csv beside the store
    assert main(["report", str(sweep.out)]) == 0
    assert (sweep.out / "report.md").read_text().startswith("| run_id | status |")


def test_mean_and_std_match_a_direct_computation_from_the_store(local_sweep, tmp_path):
    sweep, _ = local_sweep
    build_report(sweep.out, ["csv"], tmp_path)
    db = sqlite3.connect(sweep.out / "results.sqlite")
    direct: dict[str, dict[str, list[float]]] = {}
    import json

    for defense, acc, metrics in db.execute("SELECT defense, accuracy, metrics FROM runs WHERE status='finished'"):
        m = json.loads(metrics)
        d = direct.setdefault(defense, {"accuracy": [], "mse": []})
        d["accuracy"].append(acc)
        d["mse"].append(m["attacks"]["inverse_network"]["mse"])
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert sorted(r["defense"] for r in rows) == sorted(direct) == ["gaussian_noise", "none"]
    for r in rows:
        d = direct[r["defense"]]
        assert int(r["n"]) == 2 and r["seeds"] == "0 1"
        assert float(r["accuracy_mean"]) == pytest.approx(statistics.mean(d["accuracy"]), abs=1e-12)
        assert float(r["accuracy_std"]) == pytest.approx(statistics.stdev(d["accuracy"]), abs=1e-12)
        assert float(r["inverse_network.mse_mean"]) == pytest.approx(statistics.mean(d["mse"]), rel=1e-12)
        assert float(r["inverse_network.mse_std"]) == pytest.approx(statistics.stdev(d["mse"]), rel=1e-9)
        assert not math.isnan(float(r["inverse_network.mse_std"]))


def _default_sigint() -> None:
    # a test suite started in the background by a shell without job control (`cmd &` in a script) inherits
    # SIGINT ignored, and Python keeps it ignored: the sweep must see the SIGINT the tests send
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_sweep(path: Path, out: Path, workers: int = 2) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "splitveil", "sweep", str(path), "--workers", str(workers),
                             "--out", str(out), "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint)


def _running_point(out: Path, parent: int, after_one_finished: bool) -> tuple[str, int] | None:
    """(run id, worker pid) of a point being run right now (its lock file names the worker)."""
    if not (out / "results.sqlite").exists():
        return None
    rows = store_rows(out)
    if after_one_finished and not any(r["status"] == "finished" for r in rows.values()):
        return None
    for rid, r in rows.items():
        lock = out / ".locks" / f"{rid}.lock"
        parts = lock.read_text().split() if lock.exists() else []
        if r["status"] == "running" and len(parts) == 3 and int(parts[0]) != parent:
            return rid, int(parts[0])
    return None


# generous limits: the tests wait on events (a point running, the sweep ending), and these bound only a hang; a slow,
# loaded machine (load average 10 on 2 cores) must not fail them
EVENT_LIMIT_S = 900


def _load() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def _wait_for_running_point(out: Path, proc: subprocess.Popen, after_one_finished: bool,
                            timeout: float = EVENT_LIMIT_S) -> tuple[str, int] | None:
    """Poll until a point is running in a worker of ``proc`` (or the sweep ends / ``timeout`` passes)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        hit = _running_point(out, proc.pid, after_one_finished)
        if hit:
            return hit
    return None


def _finish(proc: subprocess.Popen, timeout: float = EVENT_LIMIT_S) -> str:
    """The sweep's output once it has ended; a failure that says why when it has not ended after ``timeout``."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        log = proc.communicate()[0]
        pytest.fail(f"the sweep did not end within {timeout:.0f} s ({_load()}); its output:\n{log[-3000:]}")


def _slack() -> float:
    """How many times slower than an idle machine this one is now: the 1-minute load average per core (>= 1).
    Time limits that a quiet machine meets are multiplied by it, so a loaded machine does not fail them."""
    try:
        load = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def _children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has exited


def _wait_gone(pids: list[int], limit: float) -> float | None:
    """Seconds until every one of ``pids`` has exited; None if some are still alive after ``limit``."""
    t = time.time()
    while time.time() - t < limit:
        if not any(_alive(p) for p in pids):
            return time.time() - t
        time.sleep(0.1)
    return None


def test_killed_worker_is_replaced_and_the_sweep_finishes_without_rerunning_anything(tmp_path, data_root):
    path = tiny_sweep(tmp_path, "killme", grid={"seed": [0, 1, 2, 3]}, **{"train.epochs": 2})
    out = tmp_path / "out"
    ids = [p.run_id for p in load_sweep(path, out=out).points]
    proc = _start_sweep(path, out)
    killed = None
    try:
        hit = _wait_for_running_point(out, proc, after_one_finished=True)
        if hit:
            os.kill(hit[1], signal.SIGKILL)
            killed = hit[0]
        log = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, f"no running point to kill was seen within {EVENT_LIMIT_S} s ({_load()})"
    assert proc.returncode == 0 and "1 worker process(es) died" in log and "4/4 finished" in log, log
    rows = store_rows(out)
    assert sorted(rows) == sorted(ids) and all(r["status"] == "finished" for r in rows.values())
    # no finished point ran again; the point the worker was on when killed (usually `killed`; on a fast machine
    # the worker may already have moved to the next point, or be between points) was started at most twice
    starts = {rid: (out / rid / "run.log").read_text().count(" data mnist: ") for rid in ids}
    assert set(starts.values()) <= {1, 2} and sum(v == 2 for v in starts.values()) <= 1, starts
    again = run_sweep(load_sweep(path, out=out), workers=2, progress=False)
    assert sorted(again.skipped) == sorted(ids) and again.ran == []


def test_sigint_to_the_sweep_parent_stops_running_and_queued_points(tmp_path, data_root):
    path = tiny_sweep(tmp_path, "stopme", grid={"seed": [0, 1, 2, 3, 4, 5]}, **{"train.epochs": 6})
    out = tmp_path / "out"
    proc = _start_sweep(path, out)
    try:
        hit = _wait_for_running_point(out, proc, after_one_finished=False)
        assert hit is not None, "no running point was seen"
        os.kill(proc.pid, signal.SIGINT)          # the parent alone, as `kill -INT`
        t = time.time()
        log = proc.communicate(timeout=90)[0]
        stopped_in = time.time() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, log
    assert "--resume" not in log and "run the same command again" in log
    assert stopped_in < 60
    rows = store_rows(out)
    assert len(rows) < 6 and not any(r["status"] == "running" for r in rows.values()), rows
    assert rows[hit[0]]["status"] in ("interrupted", "finished")
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):   # the worker is gone (no queued point keeps running)
        os.kill(hit[1], 0)


def test_ray_backend_local_cluster(tmp_path, data_root):
    pytest.importorskip("ray")
    path = tiny_sweep(tmp_path, "ray", points=[{"defense.name": "none"}, {"defense.name": "dropout"}])
    out = tmp_path / "out"
    sweep = load_sweep(path, out=out)
    res = run_sweep(sweep, backend="ray", num_cpus=2, cpus_per_run=1, progress=False)
    ids = sorted(p.run_id for p in sweep.points)
    assert res.complete and sorted(res.finished) == ids and res.slots == 2
    rows = store_rows(out)
    assert sorted(rows) == ids and all(r["status"] == "finished" for r in rows.values())
    assert all((out / rid / "metrics.json").exists() for rid in ids)


def test_grouping_ablation_fields_and_plots_on_synthetic_runs():
    from splitveil.report.aggregate import GroupedRun, group_runs, varying_fields
    from splitveil.report.plots import ablation_fields, ablation_plot, tradeoff_plot

    runs = []
    for sigma, acc, mse in [(0.1, 0.9, 0.01), (0.2, 0.85, 0.02), (0.4, 0.6, 0.015)]:
        for seed, d in [(0, -0.01), (1, 0.01)]:
            cfg = {"name": "x", "seed": seed, "data.name": "mnist", "defense.name": "gaussian_noise", "defense.sigma": sigma}
            runs.append(GroupedRun(f"r{sigma}-{seed}", "mnist", "vgg11_bn", "conv1", "gaussian_noise", seed, {}, cfg,
                                  None, {"accuracy": acc + d, "inverse_network.mse": mse}))
    assert varying_fields(runs) == ["defense.sigma"]
    groups = group_runs(runs)
    assert [g.params["defense.sigma"] for g in groups] == [0.1, 0.2, 0.4] and all(g.n == 2 for g in groups)
    mean, std = groups[0].stat("accuracy")
    assert mean == pytest.approx(0.9) and std == pytest.approx(statistics.stdev([0.89, 0.91]))
    assert groups[0].label == "gaussian_noise sigma=0.1"
    assert ablation_fields(groups) == ["defense.sigma"]
    png = ablation_plot(groups, "defense.sigma", "inverse_network")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    png, front = tradeoff_plot(groups, "inverse_network")
    assert png[:4] == b"\x89PNG" and front == [0, 1]   # sigma 0.4 is beaten by sigma 0.2 in both accuracy and MSE


def _synthetic_run(defense, sigma, seed, acc, mse, flags=()):
    from splitveil.report.aggregate import GroupedRun

    cfg = {"name": "x", "seed": seed, "data.name": "mnist", "defense.name": defense, "defense.sigma": sigma}
    metrics = {"accuracy": acc, "seed": seed, "flags": list(flags), "attacks": {"inverse_network": {"mse": mse}}}
    return GroupedRun(f"{defense}-{sigma}-{seed}", "mnist", "vgg11_bn", "conv1", defense, seed, metrics, cfg, None,
                      {"accuracy": acc, "inverse_network.mse": mse}, list(flags), {})


@pytest.mark.parametrize("flag", ["chance_accuracy", "unconverged", "diverged"])
def test_flagged_runs_stay_out_of_fronts_frontiers_and_gains_and_are_shown_excluded(flag):
    """A run flagged chance accuracy or unconverged (any flag in EXCLUDING_FLAGS) measures no defense: it enters no
    Pareto front, no reference frontier and no gain, and the report names it with the reason."""
    from splitveil.report.aggregate import group_runs
    from splitveil.report.build import DatasetSection, _exclusion_lines
    from splitveil.report.equal_utility import analyse_groups
    from splitveil.report.plots import tradeoff_figure
    from splitveil.results.records import EXCLUDING_FLAGS, FLAG_TEXT

    assert {"chance_accuracy", "unconverged", "diverged"} <= EXCLUDING_FLAGS
    runs = []
    for sigma, acc, mse in [(0.1, 0.9, 0.01), (0.2, 0.8, 0.02), (0.4, 0.7, 0.04)]:
        for seed in (0, 1):
            runs.append(_synthetic_run("gaussian_noise", sigma, seed, acc + 0.01 * seed, mse * (1 + 0.05 * seed)))
    # a flagged reference run far off the frontier: left out, the level keeps its other seed
    runs.append(_synthetic_run("gaussian_noise", 0.4, 2, 0.1, 0.5, [flag]))
    # one good seed, one flagged seed with a huge MSE at high accuracy (it would dominate every point)
    runs += [_synthetic_run("cem", 0.3, 0, 0.85, 0.03), _synthetic_run("cem", 0.3, 1, 0.95, 0.9, [flag])]
    # every seed flagged: the group would be alone on the front
    runs += [_synthetic_run("dropout", 0.5, s, 0.99, 1.0, ["weak_attack", flag]) for s in (0, 1)]
    groups = group_runs(runs)
    by = {(g.defense, g.params["defense.sigma"]): g for g in groups}
    cem, drop, ref4 = by[("cem", 0.3)], by[("dropout", 0.5)], by[("gaussian_noise", 0.4)]

    fig, front = tradeoff_figure(groups, "inverse_network")
    assert fig is not None
    # sorted by MSE; the flagged dropout runs (highest accuracy and MSE) would be the whole front if counted
    assert [groups[i] for i in front] == [by[("gaussian_noise", 0.1)], cem, ref4], [groups[i].label for i in front]
    assert drop.kept() is None and cem.kept().n == 1 and cem.kept().stat("inverse_network.mse") == (0.03, None)

    an = analyse_groups(groups, "gaussian_noise", metric="inverse_network")
    (an,) = an.values()
    assert an.for_key(id(drop)) is None                                       # no gain for an excluded group
    g = an.for_key(id(cem))
    assert g.n == 1 and g.mse == pytest.approx(0.03) and g.accuracy == pytest.approx(0.85)
    level = next(lv for lv in an.reference_levels if lv.key == id(ref4))
    assert len(level.runs) == 2 and max(r.accuracy for r in level.runs) == pytest.approx(0.71)   # flagged seed 2 out
    gref = an.for_key(id(ref4))
    assert gref.accuracy == pytest.approx(0.705)

    sec = DatasetSection("mnist", groups, ["accuracy", "inverse_network.mse"], ["defense.sigma"])
    (line,) = _exclusion_lines(sec)
    text = FLAG_TEXT.get(flag, flag.replace("_", " "))
    assert f"dropout sigma=0.5: seed 0 ({text}); seed 1 ({text})" in line and f"cem sigma=0.3: seed 1 ({text})" in line
    assert f"gaussian_noise sigma=0.4: seed 2 ({text})" in line and "weak attack" not in line
    assert _exclusion_lines(DatasetSection("mnist", [by[("gaussian_noise", 0.1)]], [], [])) == []


# -- issue 22: processes and signals --------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_workers_stop_within_seconds_when_the_sweep_is_killed_9(tmp_path, data_root):
    """kill -9 leaves the parent no chance to stop its workers: they notice themselves (PR_SET_PDEATHSIG, and a
    watchdog on the parent pid), record their point interrupted and exit."""
    path = tiny_sweep(tmp_path, "orphans", grid={"seed": [0, 1, 2, 3]}, **{"train.epochs": 20})
    out = tmp_path / "out"
    proc = _start_sweep(path, out)
    try:
        hit = _wait_for_running_point(out, proc, after_one_finished=False)
        assert hit is not None, f"no running point was seen within {EVENT_LIMIT_S} s ({_load()})"
        workers = [p for p in _children(proc.pid)]
        assert hit[1] in workers, (hit, workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        limit = 10 * _slack()   # 10 s on a quiet machine
        gone = _wait_gone(workers, limit)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert gone is not None, (f"workers {[w for w in workers if _alive(w)]} outlived the killed sweep by "
                              f"{limit:.0f} s ({_load()})")
    rows = store_rows(out)
    assert rows[hit[0]]["status"] == "interrupted", rows[hit[0]]   # recorded by the worker itself
    assert not any(r["status"] == "running" for r in rows.values())


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_stops_the_sweep_within_seconds_and_marks_points_interrupted(tmp_path, data_root, sig):
    path = tiny_sweep(tmp_path, "term", grid={"seed": [0, 1, 2, 3]}, **{"train.epochs": 20})
    out = tmp_path / "out"
    proc = _start_sweep(path, out)
    try:
        hit = _wait_for_running_point(out, proc, after_one_finished=False)
        assert hit is not None, f"no running point was seen within {EVENT_LIMIT_S} s ({_load()})"
        workers = _children(proc.pid)
        t = time.time()
        limit = 5 * _slack()   # 5 s on a quiet machine
        os.kill(proc.pid, getattr(signal, sig))
        log = _finish(proc)
        stopped_in = time.time() - t
        gone = _wait_gone(workers, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "run the same command again" in log, log
    assert stopped_in < limit, f"the sweep took {stopped_in:.1f} s to stop after {sig} ({_load()}); output:\n{log}"
    assert gone is not None, f"workers still alive 5 s after the sweep stopped ({_load()})"
    rows = store_rows(out)
    assert rows[hit[0]]["status"] == "interrupted" and not any(r["status"] == "running" for r in rows.values()), rows
    again = subprocess.run([sys.executable, "-m", "splitveil", "sweep", str(path), "--out", str(out), "--dry-run"],
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    assert "| interrupted |" in again.stdout, again.stdout


def test_two_sweeps_on_one_out_both_exit_0_when_every_point_finished(tmp_path, data_root):
    """The second sweep finds points the first one runs (busy): it waits for them instead of giving up, and both
    exit 0; no point runs twice."""
    path = tiny_sweep(tmp_path, "twice", grid={"seed": [0, 1, 2]})
    out = tmp_path / "out"
    ids = [p.run_id for p in load_sweep(path, out=out).points]
    a = _start_sweep(path, out, workers=1)
    hit = _wait_for_running_point(out, a, after_one_finished=False)
    b = _start_sweep(path, out, workers=1)
    try:
        log_a, log_b = _finish(a), _finish(b)
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert hit is not None
    assert a.returncode == 0 and "3/3 finished" in log_a, log_a
    assert b.returncode == 0 and "3/3 finished" in log_b, log_b
    rows = store_rows(out)
    assert sorted(rows) == sorted(ids) and all(r["status"] == "finished" for r in rows.values())
    starts = {rid: (out / rid / "run.log").read_text().count(" data mnist: ") for rid in ids}
    assert set(starts.values()) == {1}, starts


def test_gpz_and_probe_take_the_run_lock(tmp_path, data_root, capsys):
    import fcntl

    from splitveil.experiments.config import load_config
    from splitveil.results.store import lock_path

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config().to_dict(), sort_keys=False))
    lp = lock_path(tmp_path / "out", f"gpz-{load_config(cfg_path).run_id()}")
    lp.parent.mkdir(parents=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # as another process running this gpz would
        for cmd in (["gpz", str(cfg_path), "--cuts", "1", "--no-attack"], ["probe", str(cfg_path), "--cut", "1"]):
            assert main(cmd + ["--out", str(tmp_path / "out"), "--probe-images", "16", "--bootstrap", "0"]) == 1
            err = capsys.readouterr().err
            assert "running in another process" in err, err
        assert not list((tmp_path / "out").glob("gpz-*"))   # nothing trained or written
    finally:
        os.close(fd)
