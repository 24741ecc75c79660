"""Every command shown in README.md and docs/*.md works as written.

The commands are read from the fenced ``bash`` blocks (and the indented command lines) of the documents. Each one is
either

- **executed** through bash, as a user would type it, in a scratch copy of the repository's configs and sweeps
  (``../shared/data`` beside it points at the real data), with its budget scaled down by the overrides
  ``SCALE`` appends (``--set train.epochs=1 ...``, ``--bootstrap 50``), in document order (README first, so the
  runs exist when docs/reports.md reports them); or
- **resolved only**, when ``RESOLVE_ONLY`` lists it with the reason (a GPU, hours of training, a network
  install, or a rewrite of committed exports): its arguments are parsed by the real command-line parser, its
  run config loaded and pre-flighted (data root, cut), a sweep checked with ``--dry-run`` (every point
  validated), a script checked to exist and to accept the options shown.

A documented command that stops working, or a new one that is neither executable nor listed, fails here. The
whole file takes about a minute of CPU (12 short processes).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA_ROOT = Path(os.environ.get("SPLITVEIL_DATA", ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class DocCommand:
    file: str
    line: int
    text: str          # as written (continuations joined)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def documented_commands() -> list[DocCommand]:
    """Commands of the fenced bash blocks and indented command lines, in document order, README first."""
    out: list[DocCommand] = []
    for path in DOCS:
        text = path.read_text()
        lines = text.splitlines()
        fence = None
        buf, start = "", 0
        for i, ln in enumerate(lines, 1):
            s = ln.strip()
            if s.startswith("```"):
                fence = s[3:].strip() if fence is None else None
                continue
            in_bash = fence in ("bash", "sh", "shell", "console")
            indented = fence is None and re.match(r"^ {4}(splitveil|python) ", ln)
            if not (in_bash or indented or buf):
                continue
            if not buf:
                start = i
            if s.endswith("\\"):
                buf += s[:-1] + " "
                continue
            cmd = (buf + s).strip()
            buf = ""
            if cmd and not cmd.startswith("#"):
                out.append(DocCommand(path.relative_to(ROOT).as_posix(), start, cmd))
    return out


# -- what is only resolved, and why ------------------------------------------------------------------------------
RESOLVE_ONLY: list[tuple[str, str]] = [
    (r"^python3 -m venv ", "creates a virtual environment and installs torch from PyPI (network, minutes); "
                           ".ci/run runs exactly this line"),
    (r"pip install -e \"\.\[test\]\" && python -m pytest", "installs the test extra and runs the whole suite, this "
                                                           "file included; .ci/run runs exactly this line"),
    (r"^splitveil sweep ", "a sweep trains and attacks many models (30 min to hours on 2 CPU cores; the full "
                           "designs need a GPU cluster): checked with --dry-run, which validates every point"),
    (r"^splitveil gpz ", "trains a model and attacks it at every cut (tens of minutes on CPU; IR-152 needs a GPU): "
                         "config resolved and pre-flighted"),
    (r"^splitveil probe .*cifar10", "trains the CIFAR-10 CPU model (10,000 images) before probing: config resolved "
                                    "and pre-flighted"),
    (r"^splitveil run configs/(cifar10|mnist|att_faces|gpz)", "trains on real data for minutes (cifar10_vgg11_cem_paper: "
                                                             "240 epochs, a GPU): config resolved and pre-flighted"),
    (r"^splitveil report runs/(proposal_study|cifar10_defenses)", "reads the results of a sweep that is only "
                                                                 "resolved here: arguments parsed"),
    (r"^splitveil report runs/ .*--reference gaussian_noise\+cem_gmm", "its second reference needs runs of "
                                                                     "gaussian_noise+cem_gmm (a CEM study; the executed "
                                                                     "runs are the quickstart's): arguments parsed"),
    (r"mymodels:|my_resnet18|runs/my-resnet18", "the your-own-model walk-through needs the user's mymodels.py and "
                                                "my_resnet18.yaml (docs/your_model.md; tests/test_your_model.py "
                                                "executes it): arguments parsed"),
    (r"^(nice -n \d+ )?python benchmarks/", "a benchmark (tens of minutes) that writes benchmarks/results/ (committed "
                                            "exports): the script exists and accepts the options shown"),
    (r"^cp benchmarks/", "copies committed exports: the source exists"),
]

# budgets scaled down for execution; appended to the documented arguments (the last value of an option wins)
SCALE = {
    "run": ["--no-progress", "--set", "train.epochs=1", "--set", "data.train_size=256", "--set", "data.test_size=64",
            "--set", "data.aux_size=128", "--set", "attacks={inverse_network: {epochs: 2, batch_size: 32, channels: 16, blocks: 1}}",
            "--set", "eval.latency_repeats=1", "--set", "eval.latency_batch=8", "--set", "threads=1"],
    "report": ["--bootstrap", "50"],
    "list": [], "blocks": [],
}


def resolve_reason(cmd: DocCommand) -> str | None:
    for pattern, reason in RESOLVE_ONLY:
        if re.search(pattern, cmd.text):
            return reason
    return None


def unique(cmds: list[DocCommand]) -> list[DocCommand]:
    seen, out = set(), []
    for c in cmds:
        key = " ".join(c.argv)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


COMMANDS = unique(documented_commands())
EXECUTED = [c for c in COMMANDS if resolve_reason(c) is None]
RESOLVED = [c for c in COMMANDS if resolve_reason(c) is not None]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch 'clone': configs/ and sweeps/ copied (relative data roots resolve beside it), benchmarks/ and
    pyproject.toml linked, ../shared/data pointing at the real data when there is any."""
    base = tmp_path_factory.mktemp("clone")
    ws = base / "repo"
    ws.mkdir()
    for d in ("configs", "sweeps"):
        shutil.copytree(ROOT / d, ws / d)
    for f in ("benchmarks", "pyproject.toml", "README.md", "docs"):
        (ws / f).symlink_to(ROOT / f)
    if DATA_ROOT.exists():
        (base / "shared").mkdir()
        (base / "shared" / "data").symlink_to(DATA_ROOT.resolve())
    return ws


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("SPLITVEIL_DATA", None)     # as a user's shell: data roots come from the configs and the options
    return env


def test_the_documents_show_commands_and_every_one_is_classified():
    assert len(COMMANDS) >= 30, [str(c) for c in COMMANDS]
    for c in COMMANDS:
        # a bash line that is a usage synopsis or a placeholder does not run as written
        assert not re.search(r"\b(CONFIG|SWEEP\.yaml|RESULTS|FIELD=VALUE)\b", c.text), f"placeholder in {c}"
        assert "|" not in c.text.split("#")[0].replace("||", "") or "&&" in c.text, f"shell pipeline in {c}"
        prog = c.argv[0] if c.argv else ""
        assert prog in ("splitveil", "python", "python3", "cp", ".", "nice"), f"unknown program in {c}"
        if resolve_reason(c) is None:
            assert prog == "splitveil" and c.argv[1] in SCALE, f"{c}: executed, but no budget scaling known for it"


def test_executed_commands_work_as_written(workspace):
    """Every executable command, in document order, through bash, with the budget scaled down."""
    failures = []
    for c in EXECUTED:
        argv = c.argv
        if not DATA_ROOT.exists() and "../shared/data" in c.text:
            continue
        line = shlex.join(argv + SCALE[argv[1]])
        p = subprocess.run(["bash", "-c", line], cwd=workspace, env=_env(), capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            failures.append(f"{c}\n  ran: {line}\n  exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}")
    assert not failures, "\n\n".join(failures)
    # what the commands promise, read back
    runs = workspace / "runs"
    assert (runs / "results.sqlite").exists() and (runs / "report.md").exists()
    assert (runs / "report.html").exists() and (workspace / "paper" / "report.tex").exists()
    assert len([d for d in runs.iterdir() if (d / "metrics.json").exists()]) >= 2


def _resolve_splitveil(argv: list[str], workspace: Path) -> None:
    from splitveil.cli import build_parser, main
    from splitveil.commands import config_from_args
    from splitveil.experiments.run import preflight

    import torch

    if "cuda" in argv and not torch.cuda.is_available():   # a GPU command, resolved on a machine without one
        argv = [("cpu" if a == "cuda" and argv[i - 1] == "--device" else a) for i, a in enumerate(argv)]
    args = build_parser().parse_args(argv[1:])
    if argv[1] == "sweep":
        assert main(argv[1:] + ["--dry-run", "--no-progress", "--no-estimate"]) == 0, argv   # no calibration in CI
    elif argv[1] == "run":
        preflight(config_from_args(args))          # data root, dataset, model and cut, as `run` checks first
    elif argv[1] in ("gpz", "probe"):              # these cut the plain backbone at every block: model.cut is
        from splitveil.data import DATASETS        # not checked (the command notes a cut the model lacks)
        from splitveil.data.build import resolve_root
        from splitveil.models import MODELS

        cfg = config_from_args(args)
        resolve_root(cfg.data)
        DATASETS.get(cfg.data.name)
        MODELS.get(cfg.model.name)


def _resolve_script(argv: list[str], workspace: Path) -> None:
    if argv[0] == "nice":
        argv = argv[3:]
    if argv[0] == "cp":
        assert (workspace / argv[1]).exists(), argv
        return
    script = workspace / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    src = script.read_text()
    for opt in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert f'"{opt}"' in src, f"{argv[1]} has no option {opt}"


@pytest.mark.parametrize("cmd", RESOLVED, ids=[f"{c.file}:{c.line}" for c in RESOLVED])
def test_heavy_commands_resolve(cmd, workspace, monkeypatch, capsys):
    """A command listed in RESOLVE_ONLY (see its reason) parses, its config loads and pre-flights."""
    from splitveil.params import ConfigError

    argv = cmd.argv
    monkeypatch.chdir(workspace)
    if argv[0] == "python3" or argv[0] == ".":
        assert (workspace / "pyproject.toml").exists()
        assert re.search(r"^test\s*=", (workspace / "pyproject.toml").read_text(), re.M), "no [test] extra"
        return
    if argv[0] != "splitveil":
        _resolve_script(argv, workspace)
        return
    if resolve_reason(cmd).endswith("arguments parsed"):
        from splitveil.cli import build_parser

        build_parser().parse_args(argv[1:])
        return
    try:
        _resolve_splitveil(argv, workspace)
    except ConfigError as e:
        if not DATA_ROOT.exists() and "does not exist" in str(e):
            pytest.skip(f"real data not found at {DATA_ROOT}: {e}")
        raise AssertionError(f"{cmd}\n  {e}") from None


# -- the README's Python API example and the terminal ---------------------------------------------------------------
def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


def test_readme_python_api_example_reports_baseline_and_flags(capsys):
    """The README's API example, run as written (3 training epochs scaled to 1): it prints the attack's MSE beside
    the mean-image baseline and the weak / unconverged flags, so a failed fit cannot read as privacy."""
    block = next(b for b in _python_blocks(ROOT / "README.md") if "run_attack(" in b)
    code = block.replace("TrainConfig(epochs=3", "TrainConfig(epochs=1")
    ns: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), ns)
    result = ns["result"]
    assert set(result) >= {"mse", "psnr", "ssim", "baseline_mse", "weak_attack", "unconverged"}
    assert 0 < result["baseline_mse"] < 1
    assert result["weak_attack"] == (result["mse"] >= result["baseline_mse"])
    curve = result["fit.val_curve"]
    assert len(curve) == 2 and isinstance(result["unconverged"], bool)
    # 2 epochs: the last fifth is the last epoch, unconverged iff it improved the first by more than 2%
    assert result["unconverged"] == (curve[1] < 0.98 * curve[0])
    out = capsys.readouterr().out
    assert "baseline" in out and "weak" in out and "unconverged" in out


def test_plugin_module_in_the_current_folder_loads_without_cwd_on_sys_path(tmp_path, monkeypatch):
    """The console script does not put the current folder on sys.path (``python -m`` does): a plug-in module
    there must load under both, and sys.path is left as it was."""
    from splitveil.defenses import DEFENSES
    from splitveil.registry import load_plugins

    (tmp_path / "my_lab_docs_plugin.py").write_text(
        "from dataclasses import dataclass\n"
        "from splitveil.defenses import DEFENSES, Defense\n"
        "@dataclass\nclass P:\n    sigma: float = 0.1\n"
        "@DEFENSES.register('my_docs_noise', 'test plug-in')\n"
        "class MyNoise(Defense):\n    Params = P\n    def transform(self, z, training):\n        return z\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPLITVEIL_ALLOW_PLUGINS", "1")        # the user trusts this module (--allow-plugins)
    cleaned = [p for p in sys.path if p not in ("", ".", str(tmp_path))]
    monkeypatch.setattr(sys, "path", cleaned)
    load_plugins(["my_lab_docs_plugin"])
    assert "my_docs_noise" in DEFENSES
    assert sys.path == cleaned


def test_progress_bar_draws_on_a_terminal_reporting_zero_columns(monkeypatch):
    """Under `script` or a CI pty the terminal reports 0 x 0: the bar must still draw (fixed width), not an empty line."""
    import pty

    from splitveil.utils import progress

    master, slave = pty.openpty()
    assert os.get_terminal_size(slave).columns == 0
    stream = open(slave, "w", buffering=1, closefd=False)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("COLUMNS", raising=False)
    for _ in progress(range(5), enabled=True, desc="fit", mininterval=0):
        pass
    stream.flush()
    os.set_blocking(master, False)
    chunks = []
    while True:                     # a pty hands the output over in pieces: read until it is drained
        try:
            chunk = os.read(master, 1 << 16)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    out = b"".join(chunks).decode(errors="replace")
    os.close(master)
    os.close(slave)
    assert "fit: 100%" in out and "5/5" in out, repr(out)


def test_config_typos_suggest_the_field():
    """As README promises: a misspelt field suggests the right one; an unknown defense parameter lists the listed
    defenses' parameters."""
    from splitveil import config_from_dict
    from splitveil.params import ConfigError

    base = {"name": "t", "data": {"name": "digits"}, "model": {"name": "vgg11_bn", "cut": 1},
            "defense": {"name": ["gaussian_noise", "cem_gmm"], "sigma": 0.05}}
    with pytest.raises(ConfigError, match=r"unknown field 'train.epoch' \(did you mean 'epochs'\?\); valid fields: .*epochs"):
        config_from_dict(base, ["train.epoch=2"])
    with pytest.raises(ConfigError, match=r"'defense.sigmaa' \(did you mean 'sigma'\?\).*parameters: .*\bk\b.*lambda.*sigma"):
        config_from_dict(base, ["defense.sigmaa=0.1"])
