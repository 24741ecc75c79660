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
