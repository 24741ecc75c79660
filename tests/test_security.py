"""Security: nothing a user names (a checkpoint, a config) runs code or hangs the process."""
import re
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_config
from splitveil.params import ConfigError


class _Payload:
    """A pickle whose loading would create a file (stands for os.system & co.)."""
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_init_from_refuses_a_pickle_that_runs_code(tmp_path, data_root):
    from splitveil.experiments.run import run_experiment

    target = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(target)}, evil)
    # sanity: an unrestricted load of this file really would run the payload
    torch.load(evil, weights_only=False)
    assert target.exists()
    target.unlink()
    with pytest.raises(ConfigError, match=r"train.init_from: .*checkpoint\.pt is not a readable checkpoint"):
        run_experiment(tiny_config(**{"train.epochs": 0, "train.init_from": str(evil)}), tmp_path / "out")
    assert not target.exists()


def test_no_unrestricted_torch_load_in_src():
    """Every torch.load in the package restricts unpickling: weights_only=False must never come back."""
    offenders = []
    for f in (ROOT / "src").rglob("*.py"):
        text = f.read_text()
        if re.search(r"weights_only\s*=\s*False", text):
            offenders.append(str(f))
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start():text.find("\n", m.start()) + 200]
            depth, end = 0, None
            for i, ch in enumerate(call):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0 and ch == ")":
                    end = i
                    break
            if "weights_only=True" not in call[:end]:
                offenders.append(f"{f}: {call[:end + 1]}")
    assert offenders == []


def _alias_bomb(levels=9):
    lines = ['name: bomb', 'model:', '  name: vgg11_bn', '  options:', '    a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f'    a{i}: &a{i} [' + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_quickly_naming_the_file(tmp_path):
    from splitveil.experiments.config import load_config

    f = tmp_path / "bomb.yaml"
    f.write_text(_alias_bomb())
    assert len(f.read_bytes()) < 1500
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: YAML aliases expand"):
        load_config(f)
    assert time.perf_counter() - t < 5.0     # generous on a loaded machine; it takes milliseconds


def test_yaml_bounded_loader_keeps_ordinary_aliases_and_refuses_recursion(tmp_path):
    from splitveil.yaml_io import MAX_EXPANDED_NODES, safe_load_bounded

    assert safe_load_bounded("a: &x {p: 1}\nb: {<<: *x, q: 2}\n") == {"a": {"p": 1}, "b": {"p": 1, "q": 2}}
    # just under the cap is read, just over is refused: the count is exact, not a heuristic
    n = MAX_EXPANDED_NODES - 2          # root sequence + n scalars = n + 1 nodes
    assert len(safe_load_bounded("[" + ", ".join(["1"] * n) + "]")) == n
    with pytest.raises(ConfigError, match="expand"):
        safe_load_bounded("[" + ", ".join(["1"] * (MAX_EXPANDED_NODES + 1)) + "]")
    with pytest.raises(ConfigError, match="recursive"):
        safe_load_bounded("a: &r [1, *r]\n")


def test_every_shipped_config_and_sweep_reads_under_the_cap():
    from splitveil.yaml_io import safe_load_bounded

    for f in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "sweeps").glob("*.yaml")):
        assert isinstance(safe_load_bounded(f.read_text(), str(f)), dict), f


def test_empty_or_directory_config_is_a_clear_error(tmp_path):
    from splitveil.experiments.config import load_config

    (tmp_path / "empty.yaml").write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="not a readable text file"):
        load_config(tmp_path)


# -- plug-ins named in a config run code: only with --allow-plugins -----------------------------------------

EVIL_PLUGIN = '''
from pathlib import Path
Path({target!r}).write_text("ran")   # stands for anything a module can do when imported
'''


def _evil_beside_a_config(tmp_path, monkeypatch, mod="sv_evil_plugin", reference=False):
    """A config in ``tmp_path`` naming the module ``mod`` written beside it (the current directory), whose
    import would create ``tmp_path/pwned``."""
    import sys

    target = tmp_path / "pwned"
    (tmp_path / f"{mod}.py").write_text(EVIL_PLUGIN.format(target=str(target)))
    model = f"{mod}:make" if reference else "vgg11_bn"
    cfg = tmp_path / "received.yaml"
    cfg.write_text(("" if reference else f"plugins: [{mod}]\n") +
                   f"data: {{name: digits}}\nmodel: {{name: '{model}', width: 0.125, cut: 1}}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.delenv("SPLITVEIL_ALLOW_PLUGINS", raising=False)
    return cfg, target, mod


def test_a_plugin_beside_a_received_config_runs_only_with_allow_plugins(tmp_path, monkeypatch, capsys):
    import sys

    import splitveil.registry as registry_mod
    from splitveil.cli import main
    from splitveil.experiments import load_config

    cfg, target, mod = _evil_beside_a_config(tmp_path, monkeypatch)
    monkeypatch.setattr(registry_mod, "_plugins_loaded", dict(registry_mod._plugins_loaded))
    with pytest.raises(ConfigError, match=rf"plugins: refusing to import the plug-in module\(s\) '{mod}'.*--allow-plugins"):
        load_config(cfg)
    assert not target.exists() and mod not in sys.modules
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {cfg.name}\ngrid: {{seed: [0, 1]}}\nout: {tmp_path / 'runs'}\n")
    assert main(["sweep", str(sweep), "--dry-run"]) == 2          # the CLI: refused, one clear line
    err = capsys.readouterr().err
    assert "--allow-plugins" in err and mod in err and "Traceback" not in err
    assert not target.exists() and mod not in sys.modules
    # with the flag: imported (the file appears), and the points list; the environment is as it was after
    assert main(["sweep", str(sweep), "--dry-run", "--allow-plugins"]) == 0
    assert target.read_text() == "ran"
    assert "SPLITVEIL_ALLOW_PLUGINS" not in __import__("os").environ
    # the Python API's opt-in, inherited by worker processes through the environment
    target.unlink()
    monkeypatch.delitem(sys.modules, mod)
    registry_mod._plugins_loaded.pop(mod, None)
    from splitveil import allow_plugins

    try:
        allow_plugins()
        assert __import__("os").environ["SPLITVEIL_ALLOW_PLUGINS"] == "1"
        assert load_config(cfg).plugins == [mod] and target.exists()
    finally:
        allow_plugins(False)


def test_a_model_reference_to_code_beside_a_config_needs_allow_plugins(tmp_path, monkeypatch):
    import sys

    from splitveil.experiments import load_config

    cfg, target, mod = _evil_beside_a_config(tmp_path, monkeypatch, "sv_evil_model", reference=True)
    with pytest.raises(ConfigError, match=rf"model.name: refusing to import .*'{mod}'.*--allow-plugins"):
        load_config(cfg)
    assert not target.exists() and mod not in sys.modules
