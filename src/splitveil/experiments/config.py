"""The run configuration: YAML -> typed, validated objects; ``--set a.b=value`` overrides."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from ..attacks import AttackSuite
from ..data import DataConfig
from ..defenses import DefenseSpec
from ..models import ModelConfig
from ..params import ConfigError, coerce, require
from ..registry import load_plugins
from ..yaml_io import safe_load_bounded
from ..training import TrainConfig


@dataclass
class EvalConfig:
    recon_images: int = 8        # test images shown in recon.png (the first n of the test split)
    latency_batch: int = 32
    latency_repeats: int = 10
    batch_size: int = 256
    # test accuracy is the mean over this many passes of the whole test split through the defended pipeline;
    # null: 5 when the defenses draw randomness at inference (noise, dropout), else 1 (DESIGN.md 4)
    accuracy_draws: int | None = None

    def validate(self) -> None:
        require(self.recon_images >= 1, "recon_images", "must be >= 1")
        require(self.accuracy_draws is None or self.accuracy_draws >= 1, "accuracy_draws", "must be >= 1 or null")
        require(self.latency_repeats >= 1, "latency_repeats", "must be >= 1")
        require(self.latency_batch >= 1, "latency_batch", "must be >= 1 (images per timed forward pass)")
        require(self.batch_size >= 1, "batch_size", "must be >= 1 (images per evaluation batch)")


MAX_SEED = 2 ** 62


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    progress: bool = True           # progress bars on stderr
    threads: int | str | None = None  # torch CPU threads of the run: N, null (= 1, see resolve_threads) or auto (the
    #                                   cores idle when the run starts); the same whatever a sweep's workers; recorded
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # typed once, when the config is read: ``{name: ..., params}`` -> DefenseSpec, ``{attack: params}`` -> AttackSuite
    defense: DefenseSpec = field(default_factory=lambda: DefenseSpec.from_config({"name": "none"}))
    attacks: AttackSuite = field(default_factory=lambda: AttackSuite.from_config({"inverse_network": {}}))
    eval: EvalConfig = field(default_factory=EvalConfig)
    plugins: list[str] = field(default_factory=list)   # the user's modules that register defenses, attacks, ...
    tracking: dict = field(default_factory=dict)   # {tensorboard: DIR, mlflow: URI} (splitveil.tracking); no result changes

    def __post_init__(self) -> None:
        # a plain mapping given in code (``RunConfig(defense={...})``, ``dataclasses.replace``) is typed here
        if not isinstance(self.defense, DefenseSpec):
            self.defense = DefenseSpec.from_config(self.defense)
        if not isinstance(self.attacks, AttackSuite):
            self.attacks = AttackSuite.from_config(self.attacks)

    def validate(self) -> None:
        require(bool(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device)), "device",
                f"'{self.device}' is not auto, cpu, cuda or cuda:N")
        require(0 <= self.seed <= MAX_SEED, "seed", f"{self.seed} is outside 0..{MAX_SEED} (2**62; the seeds derived "
                                                   "from it must fit the 64-bit generators)")
        require(self.threads is None or self.threads == "auto" or (isinstance(self.threads, int) and self.threads >= 1),
                "threads", f"{self.threads!r}: expected a count >= 1, auto or null")
        from ..tracking import validate_tracking

        validate_tracking(self.tracking)
        require(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}", self.name)), "name",
                f"{self.name!r}: use letters, digits, '.', '_' and '-' (no '/', it names the run folder)")

    def attack_params(self) -> dict[str, Any]:
        """Validated parameter objects of every configured attack, in config order."""
        return self.attacks.params()

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (config.yaml); defense and attacks as written, ``plugins`` only when set."""
        d = {f.name: (copy.deepcopy(getattr(self, f.name)) if f.name in ("defense", "attacks", "plugins")
                      else asdict(getattr(self, f.name)) if is_dataclass(getattr(self, f.name))
                      else copy.deepcopy(getattr(self, f.name)))
             for f in fields(self)}
        d["defense"], d["attacks"] = self.defense.to_dict(), self.attacks.to_dict()
        if not self.plugins:
            del d["plugins"]
        # fields added later are written only when set, so configs and run ids from before them are unchanged
        if d["train"].get("init_from") is None:
            del d["train"]["init_from"]
        if not d["train"].get("warmup_epochs"):
            del d["train"]["warmup_epochs"]
        if d["eval"].get("accuracy_draws") is None:
            del d["eval"]["accuracy_draws"]
        if d["model"].get("cloud_width") is None:
            del d["model"]["cloud_width"]
        if not d.get("tracking"):
            del d["tracking"]
        return d

    def defense_label(self) -> str:
        return self.defense.label

    def run_id(self) -> str:
        """Stable id: the same resolved config (progress bars aside) always maps to the same run folder.

        Defense and attack parameters are hashed as resolved (defaults filled in), so writing a default
        value out or leaving it implicit gives the same id."""
        d = self.to_dict()
        d.pop("progress")
        d.pop("tracking", None)   # where results are also logged does not change them
        # what changes the result, not how it is spelled: the device type ('auto' resolved) and the data
        # folder as resolved (relative, '..', trailing '/', root or its dataset sub-folder)
        d["device"] = resolved_device_type(self.device)
        d["data"]["root"] = canonical_data_root(self.data)
        d["defense"] = self.defense.resolved()
        d["attacks"] = self.attacks.resolved()
        h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
        # a user's "module:function" model or data names the folder with its ':' written as '.'
        return f"{self.name}-{_safe(self.data.name)}-{_safe(self.model.name)}-{self.defense_label()}-s{self.seed}-{h}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", ".", name)


def resolved_device_type(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def canonical_data_root(data: DataConfig) -> str | None:
    from ..data import DATASETS
    from ..data.build import resolve_root

    if data.name in DATASETS and not DATASETS.get(data.name).needs_root:
        return DATASETS.get(data.name).fingerprint   # None, or the content hash of the user's in-memory data
    try:
        return str(resolve_root(data))
    except ConfigError:   # missing or does not exist (yet): the absolute spelling
        return os.path.abspath(os.path.expanduser(data.root)) if data.root else None


def resolve_threads(threads: int | str | None) -> int:
    """The torch thread count of a run.

    - ``N``: N threads, whatever the machine is doing.
    - ``null`` (the default): 1. Measured on the project's 2-core machine (benchmarks/results/run_cost.md,
      ``contention``): with other processes running, the quickstart took 96 s at 2 threads and 42 s at 1 (2.3x
      slower; OpenMP's passive wait policy made 2 threads worse still, 265 s), because every parallel region waits
      for the thread that shares its core. One thread is never that slow, and a run's numbers do not depend on
      the load when it started (CPU results depend on the thread count). On an idle machine more threads are
      faster (training steps 1.4-1.7x at 2 threads: benchmarks/results/throughput.md): ask for them, or for ``auto``.
    - ``auto``: the cores idle when the run starts (min 1, max 8), measured over 0.2 s from /proc/stat (Linux;
      elsewhere min(8, cores)); a rerun under another load may pick another count, so its numbers can differ in
      the last digits."""
    if threads == "auto":
        return idle_cores()
    if threads:
        return int(threads)
    return 1


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def idle_cores(window_s: float = 0.2) -> int:
    """The cores not busy with other work right now (this process is idle while it measures), in 1..min(8, cores)."""
    import time

    cores = usable_cores()

    def sample() -> tuple[int, int] | None:
        try:
            f = open("/proc/stat").readline().split()
        except OSError:
            return None
        vals = [int(v) for v in f[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return idle, sum(vals)
    a = sample()
    if a is None:
        return max(1, min(8, cores))
    time.sleep(window_s)
    b = sample()
    total = b[1] - a[1]
    if total <= 0:
        return max(1, min(8, cores))
    machine_cores = os.cpu_count() or cores
    busy = machine_cores * (1 - (b[0] - a[0]) / total)
    return max(1, min(8, cores, int(machine_cores - busy + 0.3)))


def parse_value(text: str, field: str = "value") -> Any:
    """A ``--set`` value is read as YAML: 3 -> int, 0.1 -> float, [a, b] -> list, true -> bool."""
    try:
        return safe_load_bounded(text, f"--set {field}")
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {field}: {text!r} is not a valid YAML value ({problem}); "
                          f"put quotes around a string value") from None


def apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. train.epochs=3")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p.strip() for p in parts):
        raise ConfigError(f"--set {assignment!r}: '{key.strip()}' is not a dotted field name (empty part), "
                          f"e.g. train.epochs=3")
    parts = [p.strip() for p in parts]
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = parse_value(value, ".".join(parts))


def plugin_list(value: Any, field: str = "plugins") -> list[str]:
    """A ``plugins:`` entry: a module name or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{field}: expected a list of importable module names, got {value!r}")
    return [v.strip() for v in value]


def config_from_dict(tree: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a run config tree (after ``overrides``) into a :class:`RunConfig`: the ``plugins`` modules are
    imported first, so the defenses and attacks they register can be named in the same config."""
    tree = copy.deepcopy(tree or {})
    for a in overrides:
        apply_override(tree, a)
    if "plugins" in tree:
        tree["plugins"] = load_plugins(plugin_list(tree["plugins"]))
    return coerce(RunConfig, tree)


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; clear errors for a missing file, bad YAML or another top level."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        tree = safe_load_bounded(path.read_text(), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not a readable text file ({type(e).__name__})") from None
    if tree is None:
        raise ConfigError(f"{what} {path} is empty: write at least the fields that differ from the defaults "
                          "(an empty file is not a run of every default)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return tree


def root_relative_to(tree: dict, base_dir: str | Path) -> dict:
    """A relative ``data.root`` written in a file means relative to that file (not the current directory)."""
    data = tree.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str):
        root = os.path.expanduser(data["root"])
        if not os.path.isabs(root):
            data["root"] = os.path.normpath(os.path.join(os.path.abspath(base_dir), root))
    return tree


def absolute_root(cfg: RunConfig) -> RunConfig:
    """A relative root left after the files (``--set``, ``--data-root``) is relative to the current directory:
    made absolute now, so worker processes in other directories read the same data."""
    if cfg.data.root is not None:
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config file; a relative ``data.root`` in it is relative to the file, one given in
    ``overrides`` relative to the current directory."""
    tree = root_relative_to(read_yaml_mapping(path), Path(path).parent)
    try:
        return absolute_root(config_from_dict(tree, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
