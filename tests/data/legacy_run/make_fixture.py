"""Writes this folder's fixture with the code of the day (run once at commit db8b1ff, before issue 15's refactor; kept to show
how the fixture was made, not run by the tests).

- ``runs/``: a runs folder as splitveil wrote it before the results layer existed: ``results.sqlite`` (one
  finished row, WAL checkpointed into the one file) and ``<run-id>/metrics.json`` + ``config.yaml`` (the
  checkpoints, attack weights, recon tensors and log are dropped to keep it tiny).
- ``gpz_rows.json``: the rows of a tiny GPZ sweep (cuts 1 and 4, attack on, bootstrap 0).

    PYTHONPATH=src python tests/data/legacy_run/make_fixture.py [run|gpz]

Each part runs in a fresh process (a run before the sweep in the same process changes its numbers slightly).
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))   # tests/ (conftest.tiny_config)

# the run: two attacks (the second one's seed is run seed + 2000) against Gaussian noise
RUN_OVER = {"defense.name": "gaussian_noise", "defense.sigma": 0.1, "threads": 1, "train.epochs": 2,
            "data.train_size": 1024, "attacks.inverse_network.epochs": 4,
            "attacks.inverse_network_plus.epochs": 1, "attacks.inverse_network_plus.channels": 16,
            "attacks.inverse_network_plus.batch_size": 32}
GPZ_OVER = {"attacks.inverse_network.epochs": 1, "attacks.inverse_network.channels": 16, "data.aux_size": 128,
            "data.test_size": 96, "eval.recon_images": 3, "threads": 1}


def main(part: str) -> None:
    import torch
    from conftest import tiny_config
    from splitveil.experiments.gpz import GPZSweep
    from splitveil.experiments.run import run_experiment

    torch.set_num_threads(1)
    if part == "gpz":
        with tempfile.TemporaryDirectory() as tmp:
            res = GPZSweep(tiny_config(**GPZ_OVER), tmp, probe_images=64, bootstrap=0).run("1,4", attack=True)
        (HERE / "gpz_rows.json").write_text(json.dumps({"over": GPZ_OVER, "accuracy": res["accuracy"],
                                                        "rows": res["rows"], "zone": res["zone"]}, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        m = run_experiment(tiny_config(**RUN_OVER), tmp / "runs")
        runs = HERE / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        (runs / m["run_id"]).mkdir(parents=True)
        for f in ("metrics.json", "config.yaml"):
            shutil.copy(tmp / "runs" / m["run_id"] / f, runs / m["run_id"] / f)
        db = sqlite3.connect(tmp / "runs" / "results.sqlite")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("PRAGMA journal_mode=DELETE")
        db.close()
        shutil.copy(tmp / "runs" / "results.sqlite", runs / "results.sqlite")
    print("run", m["run_id"], "accuracy", m["accuracy"], {k: v["mse"] for k, v in m["attacks"].items()})


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        import subprocess
        for part in ("run", "gpz"):
            subprocess.run([sys.executable, __file__, part], check=True)
