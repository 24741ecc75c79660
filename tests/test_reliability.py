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
    flags = json.loads((tmp_path / m["run_id"] / "metrics.json").read_text())["flags"]
    # a model that learned nothing is flagged first; its attack may also fail to beat the mean image
    assert flags[0] == "chance_accuracy" and set(flags) <= {"chance_accuracy", "weak_attack"}


def _tree(root, classes, n=4, size=(12, 12), mode="RGB", seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = size + ((3,) if mode == "RGB" else ())
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def test_wrong_data_under_a_registered_name_is_rejected(tmp_path):
    from splitveil.data import DataConfig, build_data
    from splitveil.params import ConfigError

    faces = _tree(tmp_path / "faces", [f"s{i}" for i in range(1, 6)], mode="L")        # 5 grey identities
    with pytest.raises(ConfigError, match=r"5 classes, 'cifar10' has 10"):
        build_data(DataConfig(name="cifar10", root=str(faces), image_size=8, aux_size=2))
    wrong_names = _tree(tmp_path / "ten", [f"c{i}" for i in range(10)])
    with pytest.raises(ConfigError, match="class names differ"):
        build_data(DataConfig(name="cifar10", root=str(wrong_names), image_size=8, aux_size=2))
    grey_cifar = _tree(tmp_path / "grey", ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                           "ship", "truck"], n=2, mode="L")
    with pytest.raises(ConfigError, match="1 channel"):
        build_data(DataConfig(name="cifar10", root=str(grey_cifar), image_size=8, aux_size=2))
    one = _tree(tmp_path / "one", ["only"], n=6)
    with pytest.raises(ConfigError, match="at least 2"):
        build_data(DataConfig(name="imagefolder", root=str(one), image_size=8, aux_size=1))


def test_decode_cache_sees_changed_images_inside_class_folders(tmp_path, monkeypatch):
    import os

    import numpy as np
    from PIL import Image

    from splitveil.data import DataConfig, build_data

    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    root = _tree(tmp_path / "tree", ["a", "b"], n=4)
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=12, aux_size=1, test_fraction=0.25)
    before = build_data(cfg).train.images.clone()
    st = os.stat(root)
    for f in sorted((root / "a").iterdir()) + sorted((root / "b").iterdir()):   # same names, new pixels
        Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(f)
        os.utime(f, ns=(st.st_atime_ns, os.stat(f).st_mtime_ns + 10**9))
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))   # the root folder's mtime is unchanged
    after = build_data(cfg).train.images
    assert not torch.equal(before, after) and int(after.max()) == 7


def test_run_uses_a_fixed_thread_count_whatever_the_caller_set_and_records_it(tmp_path, monkeypatch):
    from splitveil.experiments.config import resolve_threads

    seen = []
    real = Trainer.fit

    def spy(self, resume=False):
        seen.append(torch.get_num_threads())
        return real(self, resume)

    monkeypatch.setattr(Trainer, "fit", spy)
    before = torch.get_num_threads()
    try:
        metrics = []
        for outer in (1, 3):     # e.g. a sweep worker with cores // workers threads
            torch.set_num_threads(outer)
            metrics.append(run_experiment(digits_config(), tmp_path / str(outer)))
            assert torch.get_num_threads() == outer       # restored after the run
    finally:
        torch.set_num_threads(before)
    assert seen == [resolve_threads(None)] * 2
    assert metrics[0]["threads"] == metrics[1]["threads"] == resolve_threads(None)
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"]
    m = run_experiment(digits_config(threads=2), tmp_path / "x")
    assert m["threads"] == 2 and seen[-1] == 2


def test_run_id_ignores_how_the_data_root_and_device_are_spelled(tmp_path, monkeypatch):
    import os

    (tmp_path / "data" / "MNIST" / "raw").mkdir(parents=True)
    base = {"name": "x", "data": {"name": "mnist"}}
    ids = set()
    monkeypatch.chdir(tmp_path)
    for root in (str(tmp_path / "data"), "data", "./data/", "data/../data", str(tmp_path / "data" / "MNIST")):
        ids.add(config_from_dict(base, [f"data.root={root}"]).run_id())
    assert len(ids) == 1
    monkeypatch.setenv("SPLITVEIL_DATA", str(tmp_path / "data"))
    ids.add(config_from_dict(base).run_id())                       # root from $SPLITVEIL_DATA
    assert len(ids) == 1
    assert config_from_dict(base, ["data.root=elsewhere"]).run_id() not in ids
    if not torch.cuda.is_available():
        assert config_from_dict(base, ["device=auto"]).run_id() == config_from_dict(base, ["device=cpu"]).run_id()
    assert os.getcwd() == str(tmp_path)


def test_relative_data_root_in_a_config_file_is_relative_to_the_file(tmp_path, monkeypatch):
    from splitveil import load_config

    (tmp_path / "proj" / "cfg").mkdir(parents=True)
    (tmp_path / "proj" / "cfg" / "c.yaml").write_text("data:\n  name: mnist\n  root: ../data\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/cfg/c.yaml")
    assert cfg.data.root == str(tmp_path / "proj" / "data")
    cfg = load_config("proj/cfg/c.yaml", ["data.root=here"])       # the command line: the current directory
    assert cfg.data.root == str(tmp_path / "here")


# -- work that cannot be recovered -----------------------------------------------------------------------

def _interrupt_at_epoch(monkeypatch, epoch):
    real = Trainer.train_epoch

    def interrupt(self):
        if self.epoch == epoch:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupt)
    return real


def test_rerun_without_resume_continues_an_interrupted_run(tmp_path, monkeypatch):
    from splitveil.experiments import ResultsStore

    cfg = digits_config(**{"train.epochs": 3})
    full = run_experiment(cfg, tmp_path / "a")
    real = _interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "b")
    monkeypatch.setattr(Trainer, "train_epoch", real)
    loads = []
    real_load = Trainer.load
    monkeypatch.setattr(Trainer, "load", lambda self, p: (loads.append(p), real_load(self, p)))
    again = run_experiment(cfg, tmp_path / "b")          # no resume=True: the checkpoints are kept and used
    assert len(loads) == 1 and [h["epoch"] for h in again["history"]] == [1, 2, 3]
    assert again["accuracy"] == full["accuracy"]
    assert ResultsStore(tmp_path / "b" / "results.sqlite").get(cfg.run_id())["status"] == "finished"


def test_unreadable_recon_file_redoes_that_attack_and_tmp_files_are_cleared(tmp_path, caplog):
    cfg = digits_config()
    first = run_experiment(cfg, tmp_path)
    run_dir = tmp_path / cfg.run_id()
    assert not list(run_dir.glob(".*tmp*"))
    (run_dir / "recon_inverse_network.pt").write_bytes(b"half a file")       # killed while writing
    (run_dir / ".checkpoint.pt.tmp999").write_bytes(b"left by a kill")
    (run_dir / "metrics.json").unlink()
    import sqlite3
    with sqlite3.connect(tmp_path / "results.sqlite") as db:   # as left by a kill: still 'running'
        db.execute("UPDATE runs SET status='running' WHERE run_id=?", (cfg.run_id(),))
    with caplog.at_level("WARNING"):
        again = run_experiment(cfg, tmp_path)
    assert "recon_inverse_network.pt cannot be read" in caplog.text
    assert again["attacks"]["inverse_network"]["mse"] == first["attacks"]["inverse_network"]["mse"]
    assert torch.load(run_dir / "recon_inverse_network.pt", weights_only=True)["recon"].shape[0] == 2
    assert not (run_dir / ".checkpoint.pt.tmp999").exists()


def test_recon_rows_are_written_before_attacks_json_marks_the_attack_done(tmp_path, monkeypatch):
    import splitveil.experiments.pipeline as run_mod  # the stages live in the pipeline

    cfg = digits_config()
    real = run_mod.atomic_torch_save

    def die_on_recon(obj, path):
        if "recon_" in str(path):
            raise KeyboardInterrupt   # killed while the rows are written
        return real(obj, path)

    monkeypatch.setattr(run_mod, "atomic_torch_save", die_on_recon)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path)
    attacks_json = tmp_path / cfg.run_id() / "attacks.json"
    assert not attacks_json.exists() or "inverse_network" not in json.loads(attacks_json.read_text())


def test_a_run_is_locked_and_a_finished_row_is_never_downgraded(tmp_path, caplog):
    import fcntl
    import os

    from splitveil.experiments import ResultsStore
    from splitveil.experiments.store import RunBusyError, lock_path

    cfg = digits_config()
    lp = lock_path(tmp_path, cfg.run_id())
    lp.parent.mkdir(parents=True)
    fd = os.open(lp, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)            # another process runs it
    os.write(fd, b"4242 otherhost 0\n")
    try:
        with pytest.raises(RunBusyError, match="pid 4242 on otherhost"):
            run_experiment(cfg, tmp_path)
    finally:
        os.close(fd)
    store = ResultsStore(tmp_path / "results.sqlite")
    assert store.get(cfg.run_id()) is None                    # nothing recorded, nothing deleted
    m = run_experiment(cfg, tmp_path)
    assert not store.set_status(cfg.run_id(), "interrupted", "late Ctrl-C of a second process")
    assert store.get(cfg.run_id())["status"] == "finished"
    store.start("other", {"name": "o", "data": {"name": "d"}, "model": {"name": "m", "cut": 1}, "seed": 0}, tmp_path,
                "none", owner="1@a")
    assert not store.set_status("other", "failed", owner="2@b") and store.get("other")["status"] == "running"
    assert store.set_status("other", "failed", owner="1@a") and store.get("other")["status"] == "failed"
    with caplog.at_level("WARNING"):
        assert run_experiment(cfg, tmp_path)["accuracy"] == m["accuracy"]
    assert "already finished" in caplog.text and "--force" in caplog.text


def test_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    import shutil

    from splitveil.experiments import ResultsStore
    from splitveil.params import CorruptFileError

    a, b = digits_config(**{"train.epochs": 2}), digits_config(**{"train.epochs": 2, "seed": 1})
    real = _interrupt_at_epoch(monkeypatch, 1)
    for cfg in (a, b):
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, tmp_path)
    shutil.copy(tmp_path / a.run_id() / "checkpoint.pt", tmp_path / b.run_id() / "checkpoint.pt")
    monkeypatch.setattr(Trainer, "train_epoch", real)
    with pytest.raises(CorruptFileError, match=f"checkpoint of run {a.run_id()}, not of {b.run_id()}"):
        run_experiment(b, tmp_path)
    (tmp_path / a.run_id() / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="checkpoint.pt: not a readable checkpoint"):
        run_experiment(a, tmp_path)
    assert ResultsStore(tmp_path / "results.sqlite").get(a.run_id())["status"] == "failed"


def test_bad_cut_or_data_root_fail_before_anything_is_recorded(tmp_path):
    from splitveil.params import ConfigError

    for over, field in (({"model.cut": 99}, "model.cut"), ({"model.cut": "conv9"}, "model.cut"),
                        ({"data.name": "mnist", "data.root": str(tmp_path / "nowhere")}, "data.root")):
        with pytest.raises(ConfigError, match=field):
            run_experiment(digits_config(**over), tmp_path / "out")
    assert not (tmp_path / "out" / "results.sqlite").exists() or \
        __import__("splitveil").experiments.ResultsStore(tmp_path / "out" / "results.sqlite").runs() == []


# -- security --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", "..", ""])
def test_run_name_cannot_leave_the_out_folder(name):
    from splitveil.params import ConfigError

    with pytest.raises(ConfigError, match="name"):
        digits_config(name=name if name else "''")


def test_corrupt_results_store_is_one_clear_error(tmp_path):
    from splitveil.experiments import ResultsStore
    from splitveil.params import CorruptFileError

    (tmp_path / "results.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptFileError, match="results.sqlite: not a readable results store"):
        ResultsStore(tmp_path / "results.sqlite")


# -- a newcomer's first hour -----------------------------------------------------------------------------

def _env():
    import os
    from pathlib import Path

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def test_cli_parser_imports_no_torch_and_python_m_works():
    import subprocess
    import sys

    code = ("import sys, splitveil.cli; splitveil.cli.build_parser(); import splitveil; "
            "print(sorted(m for m in ('torch', 'numpy', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    out = subprocess.run([sys.executable, "-m", "splitveil", "--version"], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("splitveil ")


def test_unknown_names_suggest_a_close_one_and_broken_pipe_is_quiet(capsys):
    import subprocess
    import sys

    from splitveil.cli import main

    assert main(["blocks", "vgg11"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'vgg11_bn'" in err and "Traceback" not in err
    with pytest.raises(Exception, match="did you mean 'inverse_network'"):
        digits_config(**{"attacks": "{inverse_netwrok: {}}"})
    p = subprocess.Popen([sys.executable, "-m", "splitveil", "list", "defenses"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env())
    p.stdout.close()              # the reader went away (`| head`)
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_factories_build_attacks_and_defenses_with_validated_params():
    from splitveil import create_attack, create_defense
    from splitveil.params import ConfigError

    a = create_attack("inverse_network", epochs=2)
    assert a.params.epochs == 2 and a.params.lr == 1e-3
    d = create_defense("gaussian_noise", sigma=0.3)
    assert d.label == "gaussian_noise" and d.get("gaussian_noise").params.sigma == 0.3
    with pytest.raises(ConfigError, match="epochs"):
        create_attack("inverse_network", epochs="two")
    with pytest.raises(ConfigError, match="did you mean"):
        create_attack("inverse_netwrk")


def test_sigterm_marks_the_run_interrupted(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from splitveil.experiments import ResultsStore

    cfg = digits_config(**{"train.epochs": 400})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    p = subprocess.Popen([sys.executable, "-m", "splitveil", "run", str(tmp_path / "c.yaml"), "--out",
                          str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.time() + 90
    while time.time() < deadline and not (tmp_path / "out" / cfg.run_id() / "checkpoint.pt").exists():
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()[-2000:]
    assert ResultsStore(tmp_path / "out" / "results.sqlite").get(cfg.run_id())["status"] == "interrupted"


def test_sweep_dry_run_and_start_reject_a_bad_cut_before_recording(tmp_path, capsys):
    import yaml

    from splitveil.cli import main
    from splitveil.experiments.sweep import load_sweep, run_sweep
    from splitveil.params import ConfigError

    tree = {"name": "s", "config": digits_config().to_dict(), "points": [{"model.cut": 1}, {"model.cut": 42}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tree))
    assert main(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    out = capsys.readouterr()
    assert "invalid: model.cut: 42 is out of range" in out.out and "1 point(s) invalid" in out.err
    with pytest.raises(ConfigError, match=r"point 1 \(model.cut=42\): model.cut"):
        run_sweep(load_sweep(tmp_path / "s.yaml", out=tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "results.sqlite").exists()


def test_no_carriage_return_progress_when_stderr_is_not_a_terminal(capsys):
    from splitveil.utils import progress

    for _ in progress(range(50), True, total=50, mininterval=0):
        pass
    assert "\r" not in capsys.readouterr().err


def test_sweep_shows_the_epoch_of_each_running_point(tmp_path):
    import io
    import os
    import socket
    import time

    from splitveil.experiments.sweep import SweepProgress, _Tracker, sweep_from_dict

    sw = sweep_from_dict({"name": "e", "config": digits_config(**{"train.epochs": 7}).to_dict()}, out=tmp_path)
    (p,) = sw.points
    (tmp_path / ".locks").mkdir()
    (tmp_path / ".locks" / f"{p.run_id}.lock").write_text(f"{os.getpid()} {socket.gethostname()} {time.time()}\n")
    (tmp_path / p.run_id).mkdir()
    log = tmp_path / p.run_id / "run.log"
    log.write_text("2026-01-01 00:00:00,000 splitveil.run INFO data digits\n")
    stream = io.StringIO()
    tr = _Tracker(sw, sw.points, [], SweepProgress("e", 1, 0, stream))
    tr.epoch_progress()
    assert "epoch" not in stream.getvalue()
    with open(log, "a") as fh:
        fh.write("2026-01-01 00:00:01,000 splitveil.train INFO epoch 3: {'loss.task': 1.0}\n")
    tr.epoch_progress()
    tr.epoch_progress()   # printed once per new epoch
    assert stream.getvalue().count("epoch 3/7  (base)") == 1


def test_readme_python_api_snippet_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    assert "create_attack(" in code and "create_defense(" in code
    code = code.replace("epochs=3", "epochs=1")          # the same calls, a shorter budget
    code = code.replace('"inverse_network", epochs=2', '"inverse_network", epochs=1, channels=32, max_steps=5')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert set(scope["result"]) >= {"mse", "psnr", "ssim"} and 0.0 <= scope["result"]["mse"] <= 1.0
    assert "accuracy" in capsys.readouterr().out


def test_a_broken_image_in_a_dataset_names_the_file(tmp_path):
    from splitveil.data import DataConfig, build_data
    from splitveil.params import CorruptFileError

    root = _tree(tmp_path / "tree", ["a", "b"], n=3)
    (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CorruptFileError, match=r"b/1.png: not a readable image"):
        build_data(DataConfig(name="imagefolder", root=str(root), image_size=8, aux_size=1, cache=False))
