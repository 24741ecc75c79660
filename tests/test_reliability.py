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
    # a model that learns nothing (lr so small that nothing moves; lr 1e6 is now caught as diverged) is stored
    # with the flag
    m = run_experiment(digits_config(**{"train.lr": 1e-12}), tmp_path)
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


def test_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch, caplog):
    import shutil

    from splitveil.experiments import ResultsStore
    from splitveil.params import CorruptFileError

    a, b = digits_config(**{"train.epochs": 2}), digits_config(**{"train.epochs": 2, "seed": 1})
    real = _interrupt_at_epoch(monkeypatch, 1)
    for cfg in (a, b):
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, tmp_path)
    for f in ("checkpoint.pt", "checkpoint.pt.sha256"):   # a verified checkpoint, of another run
        shutil.copy(tmp_path / a.run_id() / f, tmp_path / b.run_id() / f)
    monkeypatch.setattr(Trainer, "train_epoch", real)
    with pytest.raises(CorruptFileError, match=f"checkpoint of run {a.run_id()}, not of {b.run_id()}"):
        run_experiment(b, tmp_path)
    assert ResultsStore(tmp_path / "results.sqlite").get(b.run_id())["status"] == "failed"
    # an unreadable one does not match its digest: set aside, and (no earlier state) training starts over
    (tmp_path / a.run_id() / "checkpoint.pt").write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        assert run_experiment(a, tmp_path)["status"] == "finished"
    assert "checkpoint.pt: SHA-256 mismatch" in caplog.text and "training starts from scratch" in caplog.text


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


# -- issue 22: resumed state is verified, a failed run keeps its checkpoints, the store can be rebuilt ----------

def _flip_in_largest_tensor(f, n=8):
    """Flip ``n`` bytes in the middle of the largest tensor stored in the checkpoint zip ``f`` (torch does not
    check the zip CRCs: such a file loads). Returns the tensor record's name."""
    import zipfile

    with zipfile.ZipFile(f) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(f.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    mid = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(mid, mid + n):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))
    return info.filename


def _same_numbers(a, b):
    assert a["accuracy"] == b["accuracy"]
    assert [h["loss.task"] for h in a["history"]] == [h["loss.task"] for h in b["history"]]
    for name in a["attacks"]:
        assert a["attacks"][name]["mse"] == b["attacks"][name]["mse"], name


@pytest.mark.parametrize("flip_previous", [False, True])
def test_a_checkpoint_with_flipped_bytes_is_never_resumed(tmp_path, monkeypatch, caplog, flip_previous):
    cfg = digits_config(**{"train.epochs": 3})
    full = run_experiment(cfg, tmp_path / "a")
    real = _interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "b")
    monkeypatch.setattr(Trainer, "train_epoch", real)
    run_dir = tmp_path / "b" / cfg.run_id()
    ckpt, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    assert (run_dir / "checkpoint.pt.sha256").exists() and (run_dir / "checkpoint.prev.pt.sha256").exists()
    before = torch.load(ckpt, weights_only=True)["model"]
    _flip_in_largest_tensor(ckpt)
    after = torch.load(ckpt, weights_only=True)["model"]    # it loads: without a digest it would be resumed
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if flip_previous:
        _flip_in_largest_tensor(prev)
    with caplog.at_level("WARNING"):
        again = run_experiment(cfg, tmp_path / "b")
    assert "checkpoint.pt: SHA-256 mismatch" in caplog.text
    if flip_previous:
        assert "no earlier verified state" in caplog.text and "training starts from scratch" in caplog.text
    else:
        assert "resuming training from the last verified state instead, checkpoint.prev.pt" in caplog.text
    assert (run_dir / "checkpoint.pt.corrupt").exists()      # set aside for inspection, not deleted
    _same_numbers(again, full)


def test_an_altered_attack_checkpoint_or_decode_cache_is_recomputed(tmp_path, monkeypatch, caplog):
    import splitveil.attacks.inverse_network as inv_mod
    from splitveil.data import build_data
    from splitveil.data.build import DataConfig

    cfg = digits_config(**{"attacks.inverse_network.epochs": 3})
    full = run_experiment(cfg, tmp_path / "a")
    real = inv_mod.atomic_torch_save

    def stop_after_two_epochs(obj, path, **kw):
        real(obj, path, **kw)
        if obj.get("epoch") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(inv_mod, "atomic_torch_save", stop_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "b")
    monkeypatch.setattr(inv_mod, "atomic_torch_save", real)
    ckpt = tmp_path / "b" / cfg.run_id() / "attack_inverse_network.pt"
    _flip_in_largest_tensor(ckpt)
    with caplog.at_level("WARNING"):
        again = run_experiment(cfg, tmp_path / "b")
    assert "attack_inverse_network.pt: SHA-256 mismatch" in caplog.text
    assert "fitting attack inverse_network from its first epoch" in caplog.text
    _same_numbers(again, full)
    # the decode cache: an altered cache file is decoded again, with the same images
    caplog.clear()
    monkeypatch.setenv("SPLITVEIL_CACHE", str(tmp_path / "cache"))
    dc = DataConfig(name="digits", image_size=16)
    first = build_data(dc, 0)
    (cache,) = (tmp_path / "cache" / "data").glob("digits-16-*.pt")
    _flip_in_largest_tensor(cache)
    with caplog.at_level("WARNING"):
        second = build_data(dc, 0)
    assert "SHA-256 mismatch" in caplog.text and "decoding the dataset again" in caplog.text
    assert torch.equal(first.train.images, second.train.images)


def test_disk_full_names_the_file_and_the_failed_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import errno

    import splitveil.utils as utils_mod
    from splitveil.experiments import ResultsStore
    from splitveil.utils import DiskFullError, verify_file

    cfg = digits_config(**{"train.epochs": 3})
    full = run_experiment(cfg, tmp_path / "a")
    real_write = utils_mod._write_all
    saves = []

    def full_disk_on_third_checkpoint(fh, data):
        if "checkpoint.pt" in fh.name and "sha256" not in fh.name:   # the checkpoint itself, not its digest
            saves.append(fh.name)
            if len(saves) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fh, data)

    monkeypatch.setattr(utils_mod, "_write_all", full_disk_on_third_checkpoint)
    out = tmp_path / "b"
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*checkpoint\.pt"):
        run_experiment(cfg, out)
    monkeypatch.setattr(utils_mod, "_write_all", real_write)
    run_dir = out / cfg.run_id()
    row = ResultsStore(out / "results.sqlite").get(cfg.run_id())
    assert row["status"] == "failed" and "no space left on device" in row["error"]
    assert verify_file(run_dir / "checkpoint.pt") is None          # the last good checkpoint is intact
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not list(run_dir.glob(".*"))                            # no temporary file left
    loads = []
    real_load = Trainer.load
    monkeypatch.setattr(Trainer, "load", lambda self, p: (loads.append(p), real_load(self, p)))
    again = run_experiment(cfg, out)                               # a failed run: resumed, not started over
    assert len(loads) == 1 and [h["epoch"] for h in again["history"]] == [1, 2, 3]
    _same_numbers(again, full)


def test_store_rebuild_restores_identical_rows_from_the_run_folders(tmp_path, monkeypatch, capsys):
    from splitveil.cli import main
    from splitveil.experiments import ResultsStore
    from splitveil.params import CorruptFileError

    out = tmp_path / "runs"
    done = [digits_config(), digits_config(seed=1)]
    for cfg in done:
        run_experiment(cfg, out)
    stopped = digits_config(**{"train.epochs": 2})
    real = _interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(stopped, out)
    monkeypatch.setattr(Trainer, "train_epoch", real)
    db = out / "results.sqlite"
    volatile = ("started", "updated", "owner", "error")
    before = {r["run_id"]: {k: v for k, v in r.items() if k not in volatile} for r in ResultsStore(db).runs()}
    (db.parent / "results.sqlite-wal").unlink(missing_ok=True)
    db.write_bytes(b"not a database any more " * 200)
    with pytest.raises(CorruptFileError, match=r"splitveil store rebuild"):
        ResultsStore(db)
    assert main(["store", "rebuild", str(out)]) == 0
    assert "2 finished run(s), 1 not finished" in capsys.readouterr().out
    after = {r["run_id"]: {k: v for k, v in r.items() if k not in volatile} for r in ResultsStore(db).runs()}
    assert after == before and len(after) == 3
    assert list(out.glob("results.sqlite.corrupt-*"))              # the damaged store is kept, not deleted
    loads = []
    real_load = Trainer.load
    monkeypatch.setattr(Trainer, "load", lambda self, p: (loads.append(p), real_load(self, p)))
    assert run_experiment(stopped, out)["status"] == "finished" and len(loads) == 1   # resumed, not restarted


# -- issue 22: bad inputs give one clear error naming the field or file, before any work ------------------------

def _cifar_with_a_refused_pickle(tmp_path):
    """A cifar10 root whose first batch file is a pickle naming os.system (refused by the safe unpickler)."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    batches = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (batches / n).write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}, protocol=2))
    return tmp_path / "data"


def _config_file(tmp_path, **over):
    import yaml

    tree = {"name": "r", "device": "cpu", "progress": False,
            "data": {"name": "digits", "train_size": 256, "test_size": 128, "aux_size": 64, "image_size": 16},
            "model": {"name": "vgg11_bn", "width": 0.125, "cut": 1},
            "train": {"epochs": 1, "batch_size": 32}, **over}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tree))
    return f


BAD_INPUTS = {   # id -> (how it is given, what the message must name)
    "eval.batch_size=0": ("set", {"eval.batch_size": 0}, "eval.batch_size"),
    "eval.latency_batch=0": ("set", {"eval.latency_batch": 0}, "eval.latency_batch"),
    "gpz --cuts 99": ("cli", ["gpz", "{config}", "--cuts", "99", "--out", "{out}"], "--cuts: 99 is out of range"),
    "probe --cut 99": ("cli", ["probe", "{config}", "--cut", "99", "--out", "{out}"], "--cut: 99 is out of range"),
    "device gpu0": ("set", {"device": "gpu0"}, "device"),
    "device cudaa": ("cli", ["run", "{config}", "--device", "cudaa", "--out", "{out}"], "device: 'cudaa'"),
    "device cuda:7 absent": ("run", {"device": "cuda:7"}, "device"),
    "seed 2**70": ("set", {"seed": 2 ** 70}, "seed"),
    "seed via --seed": ("cli", ["run", "{config}", "--seed", str(2 ** 64), "--out", "{out}"], "seed"),
    "--out is a file": ("cli", ["run", "{config}", "--out", "{file}"], "--out: "),
    "run(out=file)": ("out_file", {}, "--out: "),
    "refused CIFAR pickle": ("cifar", {}, "data_batch_1: refusing to load global 'posix.system'"),
    "huge image_size": ("set", {"data.image_size": 100_000}, "data.image_size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_one_clear_error_naming_its_field_before_any_work(case, tmp_path, capsys, monkeypatch):
    from splitveil.cli import main
    from splitveil.experiments import ResultsStore
    from splitveil.params import ConfigError

    kind, value, named = BAD_INPUTS[case]
    out = tmp_path / "out"
    started = []
    monkeypatch.setattr(Trainer, "train_epoch", lambda self: started.append(1) or {})   # no training may start
    if kind == "set":   # "eval.batch_size" is written "eval: batch_size" by the config's coercion
        with pytest.raises(ConfigError, match=named.replace(".", "(\\.|: )")):
            run_experiment(digits_config(**value), out)
    elif kind == "run":
        with pytest.raises(ConfigError, match=named):
            run_experiment(digits_config(**value), out)
    elif kind == "out_file":
        f = tmp_path / "a_file"
        f.write_text("x")
        with pytest.raises(ConfigError, match=named):
            run_experiment(digits_config(), f)
    elif kind == "cifar":
        root = _cifar_with_a_refused_pickle(tmp_path)
        cfg = digits_config(**{"data.name": "cifar10", "data.root": str(root), "data.image_size": 32,
                               "data.cache": False})
        with pytest.raises(ConfigError, match=f"data.root: .*{named}"):
            run_experiment(cfg, out)
        assert not (tmp_path / "pwned").exists()
        # found while the data was read, after the row was written: no failed row, no empty run folder left
        assert ResultsStore(out / "results.sqlite").runs() == [] and not (out / cfg.run_id()).exists()
    else:
        (tmp_path / "a_file").write_text("x")
        argv = [a.format(config=_config_file(tmp_path), out=out, file=tmp_path / "a_file") for a in value]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not started
    assert not out.exists() or not [p for p in out.iterdir() if p.name not in (".locks", "results.sqlite",
                                                                                "results.sqlite-wal",
                                                                                "results.sqlite-shm")]


# -- issue 22: divergence that stays finite, defenses that overflow ----------------------------------------------

@pytest.mark.parametrize("optimizer,lr", [("adam", 1e3), ("adam", 1e6), ("sgd", 1e6)])
def test_finite_divergence_is_stored_failed_naming_train_lr(tmp_path, optimizer, lr):
    """Adam at lr 1e3 ends with a finite loss near 1e3..1e7 and Adam at 1e6 with weights near 1e9: neither may be
    stored 'finished' (only flagged chance_accuracy before); SGD at 1e6 overflows."""
    from splitveil.results.store import ResultsStore

    cfg = digits_config(**{"train.optimizer": optimizer, "train.lr": lr})
    with pytest.raises(NonFiniteLossError, match=r"lower train\.lr") as e:
        run_experiment(cfg, tmp_path)
    row = ResultsStore(tmp_path / "results.sqlite").get(cfg.run_id())
    assert row["status"] == "failed" and "train.lr" in row["error"] and "diverged" in str(e.value), row
    assert not (tmp_path / cfg.run_id() / "metrics.json").exists()


def test_normal_and_defended_runs_stay_far_inside_the_divergence_limits(tmp_path, monkeypatch):
    """Three epochs without a defense and under noise sigma 0.5 + NoPeek + label smoothing -0.05 (the strongest
    settings the studies use): no divergence error, and every quantity stays an order of magnitude inside its
    limit (the limits cannot be close to firing on a healthy run)."""
    import math

    from splitveil.training import trainer as trainer_mod

    seen = []
    real = Trainer.check_divergence

    def spy(self, stats):
        seen.append((stats["loss.task"], self.history[0]["loss.task"] if self.history else None, self.scale(),
                     self.initial_scale, self.data.num_classes))
        return real(self, stats)

    monkeypatch.setattr(Trainer, "check_divergence", spy)
    defended = {"defense.name": "[gaussian_noise,nopeek,label_smoothing]", "defense.sigma": 0.5,
                "defense.nopeek.alpha": 3.0, "defense.label_smoothing.alpha": -0.05}
    for over in ({}, defended):
        m = run_experiment(digits_config(**{"train.epochs": 3, "train.lr": 0.01, **over}), tmp_path)
        assert m["status"] == "finished" and "diverged" not in m["flags"]
    assert len(seen) == 6
    for task, first, now, init, classes in seen:
        assert task < 0.5 * trainer_mod.LOSS_FACTOR * math.log(classes), seen
        assert now["weights"] < 0.01 * trainer_mod.WEIGHT_GROWTH * init["weights"], seen
        assert now["bn"] < 1e-3 * trainer_mod.BUFFER_GROWTH * max(1.0, init["bn"]), seen


def test_an_overflowing_defense_is_named_with_its_parameter_not_train_lr(tmp_path):
    from splitveil.params import ConfigError

    with pytest.raises(ConfigError, match=r"^defense\.sigma: 1e\+39 is not a finite float32"):
        digits_config(**{"defense.name": "gaussian_noise", "defense.sigma": 1e39})
    with pytest.raises(ConfigError, match=r"^defense\.gaussian_noise\.sigma: "):
        digits_config(**{"defense.name": "gaussian_noise", "defense.gaussian_noise.sigma": 1e39})
    cfg = digits_config(**{"defense.name": "gaussian_noise", "defense.sigma": 1e30})
    with pytest.raises(NonFiniteLossError) as e:
        run_experiment(cfg, tmp_path)
    msg = str(e.value)
    assert "defense 'gaussian_noise'" in msg and "defense.sigma=1e+30" in msg and "train.lr" not in msg, msg
