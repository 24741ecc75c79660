"""The run pipeline: one file that says what a run does (DESIGN.md section 1), stage by stage.

::

    cfg ──► prepare ─────► train ───────► freeze_edge ─► attack_all ──────────────► measure_cost ─► record
            (data, split    (Trainer under   (Edge: encoder   (every attack fits on aux,   (params, FLOPs,   (RunRecord:
             model,          the defense;     + defense, what  is scored on the same test   latency,          metrics.json
             defenses)       accuracy,        the device       images; mean-image baseline; payload)         and the store)
                             flags)           sends; frozen)   worst case; weak attacks)

Each stage takes and returns small dataclasses. ``run_pipeline`` chains them for ``splitveil run``
(``experiments/run.py`` adds the run folder, lock and store around it); the GPZ sweep (``experiments/gpz.py``)
and the benchmarks call the stages they need. Every seed a run derives from its config seed is named in
:class:`Seeds`, nowhere else.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..attacks import ATTACKS, Attack, mean_image_baseline, transmitted
from ..attacks.base import fit_and_score, share_split
from ..data import DataBundle, ImageSplit, build_data
from ..defenses import DefenseStack, Edge, build_defenses
from ..metrics import edge_cost
from ..models import SplitModel, build_split_model
from ..params import ConfigError
from ..results.figures import save_recon_grid, score_note
from ..results.records import BASELINE, AttackResult, EdgeCost, ImageScores, RunRecord, WorstCase, weak_attack_warnings
from ..tracking import Trackers, build_trackers
from ..training import Trainer
from ..utils import atomic_torch_save, atomic_write_text, load_verified, resolve_device, restore_verified, seed_everything
from ..version import __version__
from .timing import StageTimer
from .config import RunConfig

log = logging.getLogger("splitveil.run")

LPIPS_UNAVAILABLE = {"available": False, "reason": "LPIPS needs pretrained backbone weights; splitveil downloads none "
                                                   "and does not compute it yet"}


# -- seeds -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seeds:
    """Every seed derived from a run's config seed, written once.

    The derivations are part of what a run id means: changing one changes every recorded number."""
    run: int

    @property
    def global_(self) -> int:
        """``seed_everything`` before the data, the model and training."""
        return self.run

    @property
    def data(self) -> int:
        """The train / test / aux split of the dataset."""
        return self.run

    @property
    def train(self) -> int:
        """The trainer's shuffling and the defenses' training randomness."""
        return self.run

    @property
    def test_split(self) -> int:
        """The one (fit, eval) split of the test images shared by every attack of a run (inference-time mode)."""
        return self.run

    @property
    def transmit(self) -> int:
        """The defense's randomness (noise, dropout) when the test features are transmitted to be scored or
        probed: every attack (and every probe) of a run sees the same transmitted features."""
        return self.run + 7

    @property
    def bootstrap(self) -> int:
        """The bootstrap resamples of the GPZ probe images."""
        return self.run + 11

    def attack(self, index: int) -> int:
        """The ``index``-th attack of the suite (config order, from 0): its own seed and ``seed_everything``."""
        return self.run + 1000 * (index + 1)


# -- stage 1: data, split model, defenses ---------------------------------------------------------------------
@dataclass
class Prepared:
    data: DataBundle
    model: SplitModel
    defenses: DefenseStack
    device: torch.device
    seeds: Seeds
    data_s: float = 0.0


def prepare_data(cfg: RunConfig, seeds: Seeds) -> tuple[DataBundle, float]:
    """Seed everything, then split the dataset (train / test / aux); returns (data, seconds)."""
    seed_everything(seeds.global_)
    t = time.perf_counter()
    data = build_data(cfg.data, seeds.data)
    log.info("data %s: train %d, test %d, aux %d, shape %s", data.name, len(data.train), len(data.test),
             len(data.aux), data.image_shape)
    return data, time.perf_counter() - t


def prepare_defenses(cfg: RunConfig, model: SplitModel, data: DataBundle, device: torch.device) -> DefenseStack:
    defenses = build_defenses(cfg.defense)
    defenses.setup(model, data, device)
    return defenses


def prepare(cfg: RunConfig, device: torch.device | None = None) -> Prepared:
    """Stage 1: the data, the model split at ``cfg.model.cut`` and the configured defenses, set up on them."""
    seeds = Seeds(cfg.seed)
    device = device or resolve_device(cfg.device)
    data, data_s = prepare_data(cfg, seeds)
    model = build_split_model(cfg.model, data.num_classes, data.image_shape)
    defenses = prepare_defenses(cfg, model, data, device)
    return Prepared(data, model, defenses, device, seeds, data_s)


# -- stage 2: training -----------------------------------------------------------------------------------------
@dataclass
class Trained:
    trainer: Trainer
    history: list[dict[str, Any]]
    accuracy: float
    flags: list[str]
    train_s: float
    init_from: dict[str, str | None] | None = None    # train.init_from: {path, sha256} of the warm start
    accuracy_std: float = 0.0       # over the passes of the test split (noise draws)
    accuracy_draws: int = 1


def chance_accuracy(labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy that a classifier learning nothing reaches on ``labels`` within two standard errors: the
    majority-class frequency (constant prediction) plus 2 sqrt(p (1 - p) / n)."""
    n = max(1, int(labels.numel()))
    p = float(torch.bincount(labels.cpu(), minlength=num_classes).max()) / n
    return p + 2.0 * (p * (1.0 - p) / n) ** 0.5


def quality_flags(accuracy: float, data) -> list[str]:
    """Warnings stored in metrics.json ``flags``: ``chance_accuracy`` when the model learned nothing (its
    attack MSE then says nothing about a defense)."""
    flags = []
    if accuracy <= chance_accuracy(data.test.labels, data.num_classes):
        flags.append("chance_accuracy")
    return flags


def load_init(model: SplitModel, f: Path) -> dict[str, str | None]:
    """``train.init_from``: load the model weights of the checkpoint ``f`` into ``model`` (every tensor must
    match by name and shape); returns {path, sha256} for the record."""
    if not f.is_file():
        raise ConfigError(f"train.init_from: no checkpoint file at {f}")
    try:
        # weights_only=True: a file the user names is never unpickled with arbitrary globals (a crafted
        # "checkpoint" whose pickle calls os.system is refused before anything runs)
        st = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated, foreign or unsafe (non-tensor pickle) file: name it
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"train.init_from: {f} is not a readable checkpoint, or holds objects other than "
                          f"tensors and plain containers, which are refused ({type(e).__name__}: {first})") from None
    weights = st.get("model", st) if isinstance(st, dict) else None
    if not isinstance(weights, dict):
        raise ConfigError(f"train.init_from: {f} holds no model state dict (expected a run's checkpoint.pt)")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    bad = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ConfigError(f"train.init_from: {f} does not fit this model (model.name, width, cut and bottleneck "
                          f"must match): missing {missing[:3]}, unexpected {unexpected[:3]}, shape differs {bad[:3]}")
    model.load_state_dict(weights)
    digest = file_sha256(f)
    log.info("train.init_from: weights of %s (sha256 %s)", f, (digest or "")[:12])
    return {"path": str(f), "sha256": digest}


def file_sha256(f: Path) -> str | None:
    import hashlib

    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def train(cfg: RunConfig, prep: Prepared, ckpt_path: Path | None = None, resume: bool = False,
          run_id: str | None = None, tracker: Trackers | None = None) -> Trained:
    """Stage 2: train under the defenses (resuming from ``ckpt_path`` when asked), then the test accuracy with the
    defenses active as at inference, and the quality flags. ``tracker`` hears every epoch (those of a resumed
    run's earlier sessions after training)."""
    # a checkpoint that does not match its recorded digest is never resumed: the previous one, or a fresh start
    resuming = bool(resume and ckpt_path is not None and restore_verified(ckpt_path))
    init = None
    if cfg.train.init_from:   # a resumed run continues from its own checkpoint, which already holds the warm start
        f = Path(cfg.train.init_from).expanduser()
        init = {"path": str(f), "sha256": file_sha256(f)} if resuming else load_init(prep.model, f)
    trainer = Trainer(prep.model, prep.defenses, prep.data, cfg.train, prep.device, seed=prep.seeds.train,
                      ckpt_path=ckpt_path, show_progress=cfg.progress, augment=cfg.data.augment)
    if run_id is not None:
        trainer.run_id = run_id   # stored in checkpoint.pt and checked on resume
    if tracker:
        trainer.on_epoch = tracker.epoch
    t = time.perf_counter()
    history = trainer.fit(resume=resume)
    if tracker:
        tracker.history(history)
    train_s = time.perf_counter() - t
    accuracy, accuracy_std, draws = test_accuracy(trainer, cfg.eval.accuracy_draws, cfg.eval.batch_size)
    log.info("test accuracy %.4f (mean of %d pass(es) over the test split, std %.4f)", accuracy, draws, accuracy_std)
    flags = quality_flags(accuracy, prep.data)
    if flags:
        log.warning("test accuracy %.4f is at chance level: the model learned nothing (check train.lr and "
                    "train.epochs); its privacy numbers are meaningless", accuracy)
    return Trained(trainer, history, accuracy, flags, train_s, init, accuracy_std, draws)


@torch.no_grad()
def draws_at_inference(trainer: Trainer) -> bool:
    """Whether the defenses draw randomness at inference (noise, dropout masks): the same features sent twice
    through them differ. Asked of the behaviour, not of the defenses' names, so a plug-in is judged alike."""
    z = torch.rand(2, *trainer.model.feature_shape, device=trainer.device)
    return not torch.equal(trainer.defenses.transform(z.clone(), training=False),
                           trainer.defenses.transform(z.clone(), training=False))


def test_accuracy(trainer: Trainer, draws: int | None, batch_size: int) -> tuple[float, float, int]:
    """(mean, population std, number of passes) of the top-1 accuracy over ``draws`` passes of the whole test
    split (``eval.accuracy_draws``; None: 5 when the defenses draw randomness at inference, else 1)."""
    n = draws if draws is not None else (5 if draws_at_inference(trainer) else 1)
    accs = [trainer.evaluate("test", batch_size) for _ in range(n)]
    mean = sum(accs) / n
    return mean, (sum((a - mean) ** 2 for a in accs) / n) ** 0.5, n


# -- stage 3: the edge -----------------------------------------------------------------------------------------
def freeze_edge(encoder: torch.nn.Module, defenses: DefenseStack) -> Edge:
    """Stage 3: what the device runs and sends (encoder, then the defenses' transform), in eval mode and frozen."""
    edge = Edge(encoder, defenses).eval()
    for p in edge.parameters():
        p.requires_grad_(False)
    return edge


# -- stage 4: attacks --------------------------------------------------------------------------------------------
@dataclass
class AttackOutcome:
    """Every attack's result (config order), the mean-image baseline on the same images, the worst case."""
    attacks: dict[str, AttackResult]
    baseline: dict[str, ImageScores]
    worst_case: WorstCase | None
    warnings: list[str]
    originals: torch.Tensor | None = None               # the first shown test images, [0, 1]
    recon: dict[str, torch.Tensor] = field(default_factory=dict)   # attack -> its reconstructions of them


def build_suite(specs: dict[str, Any], seeds: Seeds, device: torch.device, show_progress: bool = False,
                workdir: Path | None = None) -> list[tuple[int, str, Attack]]:
    """(index, name, attack) of every configured attack (``specs``: name -> validated params, config order), each
    seeded by :meth:`Seeds.attack`."""
    return [(i, name, ATTACKS.get(name)(params, device=device, seed=seeds.attack(i), show_progress=show_progress,
                                        workdir=workdir)) for i, (name, params) in enumerate(specs.items())]


def attack_one(attack: Attack, index: int, edge: Edge, data: DataBundle,
               seeds: Seeds) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Fit and score the ``index``-th attack of the suite; returns (its result dict, originals, reconstructions)."""
    seed_everything(seeds.attack(index))
    return fit_and_score(attack, edge, data, seed=seeds.transmit)


def attack_all(specs: dict[str, Any], edge: Edge, data: DataBundle, seeds: Seeds, device: torch.device, *,
               show_progress: bool = False, workdir: Path | None = None, n_show: int = 8,
               done: dict[str, dict[str, Any]] | None = None,
               done_rows: dict[str, torch.Tensor] | None = None, done_originals: torch.Tensor | None = None,
               on_result: Callable[[str, dict[str, Any], torch.Tensor, torch.Tensor], None] | None = None) -> AttackOutcome:
    """Stage 4: every attack of ``specs`` against ``edge``, all scored on the same test images (one shared split
    of them when an attack runs in inference-time mode), then the mean-image baseline on those images, the worst
    case over the suite and a warning per attack that does not beat the baseline.

    ``done``: results of attacks finished before a resume (with their rows ``done_rows``), not run again;
    ``on_result(name, result, originals, recon)`` is called after each attack (the run persists it there)."""
    attacks: dict[str, dict[str, Any]] = dict(done or {})
    recon: dict[str, torch.Tensor] = dict(done_rows or {})
    originals = done_originals
    suite = build_suite(specs, seeds, device, show_progress, workdir)
    # one split of the test images per run, shared by every attack: all are scored on the same images, and so is
    # the mean-image baseline
    shared = share_split([a for _, _, a in suite], data, seeds.test_split)
    eval_split: ImageSplit = data.test.subset(shared[1]) if shared is not None else data.test
    guess_split: ImageSplit = (data.test.subset(shared[0]) if shared is not None and all(a.inference_time for _, _, a in suite)
                               else data.aux)
    for i, name, attack in suite:
        if name in attacks:
            log.info("attack %s already finished (resume)", name)
            continue
        result, x01, x_hat = attack_one(attack, i, edge, data, seeds)
        recon[name], originals = x_hat[:n_show], x01[:n_show]
        if on_result is not None:
            on_result(name, result, originals, recon[name])
        attacks[name] = result
        log.info("attack %s: mse %.5f psnr %.2f ssim %.4f", name, result["mse"], result["psnr"], result["ssim"])
    recon = {n: recon[n] for n in specs if n in recon}   # config order
    baseline = {BASELINE: mean_image_baseline(data, eval_split, guess_split)}
    wc = WorstCase.compute({n: AttackResult.from_dict(r, n) for n, r in attacks.items()}, baseline[BASELINE]["mse"]) \
        if attacks else None
    warnings = weak_attack_warnings(wc.to_dict(), attacks) if wc else []
    return AttackOutcome({n: AttackResult.from_dict(r, n) for n, r in attacks.items()},
                         {n: ImageScores.from_dict(r, n) for n, r in baseline.items()}, wc, warnings, originals, recon)


# -- stage 5: cost ---------------------------------------------------------------------------------------------
def measure_cost(cfg: RunConfig, edge: Edge, model: SplitModel, data: DataBundle, device: torch.device) -> EdgeCost:
    """Stage 5: encoder parameters (the deployed encoder's, not training-only modules), FLOPs, latency and payload
    per image."""
    return EdgeCost.from_dict(edge_cost(edge, data.image_shape, model.feature_shape, device, cfg.eval.latency_batch,
                                        cfg.eval.latency_repeats, params_of=model.encoder))


# -- stage 6: the record ---------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import numpy

    v = {"splitveil": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
         "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = str(torch.version.cuda)
    return v


def record(cfg: RunConfig, run_id: str, prep: Prepared, trained: Trained, diagnostics: dict[str, Any],
           outcome: AttackOutcome, cost: EdgeCost, timings: dict[str, float]) -> RunRecord:
    """Stage 6: everything the run measured as one typed record (``to_dict()`` is metrics.json)."""
    flags = list(trained.flags)
    wc = outcome.worst_case
    weak = bool(wc and wc.weak_attacks)
    if weak:
        flags.append("weak_attack")
    unconverged = [n for n, a in outcome.attacks.items() if a.unconverged()]
    if unconverged:   # its MSE is an upper bound on what the attack can do: kept out of gains and fronts
        log.warning("unconverged attack: %s still improved its held-out MSE by more than 2%% over the last fifth "
                    "of its budget; give it more epochs (the run is flagged 'unconverged')", ", ".join(unconverged))
        flags.append("unconverged")
    model, data = prep.model, prep.data
    return RunRecord(
        status="finished", run_id=run_id, dataset=data.name, model=cfg.model.name, cut=model.cut_name,
        cut_index=model.cut_index, feature_shape=list(model.feature_shape), defense=prep.defenses.label,
        defense_info=prep.defenses.info(), defense_diagnostics=diagnostics, seed=cfg.seed, accuracy=trained.accuracy,
        flags=flags, attacks=outcome.attacks, baseline=outcome.baseline, worst_case=wc or WorstCase(),
        weak_attack=weak, warnings=outcome.warnings, lpips=dict(LPIPS_UNAVAILABLE), cost=cost,
        history=trained.history, sizes={"train": len(data.train), "test": len(data.test), "aux": len(data.aux)},
        timings=timings, versions=versions(), device=str(prep.device), threads=torch.get_num_threads(),
        precision=trained.trainer.amp.info(),   # resolved train.precision / train.channels_last
        extra={"accuracy_std": trained.accuracy_std, "accuracy_draws": trained.accuracy_draws,
               **({"init_from": trained.init_from} if trained.init_from else {})})


# -- the whole run ---------------------------------------------------------------------------------------------
def _resumed_attacks(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """Attacks finished before a resume (``attacks.json``) with their rows (``recon_<attack>.pt``); an attack whose
    file cannot be read runs again."""
    partial_path = run_dir / "attacks.json"
    attacks: dict[str, Any] = {}
    if partial_path.exists():
        try:
            attacks = json.loads(partial_path.read_text())
        except (OSError, ValueError) as e:
            log.warning("%s cannot be read (%s): running every attack again", partial_path, e)
    rows: dict[str, torch.Tensor] = {}
    originals = None
    for name in list(attacks):
        f = run_dir / f"recon_{name}.pt"
        try:
            d = load_verified(f)   # its recorded SHA-256 first
            rows[name], originals = d["recon"], d["originals"]
        except Exception as e:
            log.warning("%s cannot be read (%s: %s): running attack %s again", f, type(e).__name__, e, name)
            del attacks[name]
    return attacks, rows, originals


def run_pipeline(cfg: RunConfig, run_id: str, run_dir: Path, resume: bool = False) -> RunRecord:
    """The stages in order, for one run in ``run_dir`` (checkpoints, finished attacks and the reconstruction grid
    are kept there: an interrupted run resumes where it stopped). ``cfg.tracking``'s trackers hear the run start,
    every epoch, every attack and the final record."""
    with tracking(cfg, run_id) as tracker:
        rec = _run_stages(cfg, run_id, run_dir, resume, tracker)
        tracker.run_end(rec.to_dict())
    return rec


@contextmanager
def tracking(cfg: RunConfig, run_id: str):
    """The trackers of ``cfg.tracking`` for one run (none: a no-op); closed with the run's status."""
    tracker = build_trackers(cfg.tracking)
    tracker.run_start(run_id, cfg.to_dict())
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.close("interrupted")
        raise
    except BaseException:
        tracker.close("failed")
        raise
    tracker.close("finished")


def _run_stages(cfg: RunConfig, run_id: str, run_dir: Path, resume: bool, tracker: Trackers) -> RunRecord:
    clock = StageTimer(run_dir, resume)   # per stage, cumulative over the sessions of a resumed run
    with clock.stage("data"):
        prep = prepare(cfg)
    with clock.stage("train"):
        trained = train(cfg, prep, ckpt_path=run_dir / "checkpoint.pt", resume=resume, run_id=run_id, tracker=tracker)
        diagnostics = prep.defenses.diagnostics(prep.model, prep.data, prep.device)  # e.g. CEM's feature scale on test
    for part, seconds in trained.trainer.seconds.items():   # the training stage by part
        clock.add(f"train_{part}", seconds)
    edge = freeze_edge(prep.model.encoder, prep.defenses)

    done, rows, originals = _resumed_attacks(run_dir) if resume else ({}, {}, None)
    partial = dict(done)

    def persist(name: str, result: dict[str, Any], x01: torch.Tensor, x_hat: torch.Tensor) -> None:
        # the rows first (atomically), then attacks.json marks the attack done: a kill between the two only
        # repeats the attack
        atomic_torch_save({"originals": x01, "recon": x_hat}, run_dir / f"recon_{name}.pt")
        partial[name] = result
        atomic_write_text(run_dir / "attacks.json", json.dumps(partial, indent=2))
        tracker.attack(name, result)

    with clock.stage("attacks"):
        outcome = attack_all(cfg.attack_params(), edge, prep.data, prep.seeds, prep.device, show_progress=cfg.progress,
                             workdir=run_dir, n_show=min(cfg.eval.recon_images, len(prep.data.test)), done=done,
                             done_rows=rows, done_originals=originals, on_result=persist)
    if outcome.originals is not None:
        title = f"{prep.data.name} {cfg.model.name} cut={prep.model.cut_name} defense={prep.defenses.label}"
        weak = set(outcome.worst_case.weak_attacks or []) if outcome.worst_case else set()
        notes = {n: score_note(a.mse, a.ssim, n in weak, bool(a.unconverged())) for n, a in outcome.attacks.items()}
        save_recon_grid(run_dir / "recon.png", outcome.originals, outcome.recon, title, notes=notes)
    with clock.stage("cost"):
        cost = measure_cost(cfg, edge, prep.model, prep.data, prep.device)
    return record(cfg, run_id, prep, trained, diagnostics, outcome, cost, clock.totals())


def transmitted_features(edge: Edge, data: DataBundle, split: ImageSplit, device: torch.device, seeds: Seeds,
                         batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(features as ``edge`` sends them, [0, 1] originals) of ``split``, the defense's randomness drawn from
    :attr:`Seeds.transmit` (the features every attack of the run is scored on)."""
    return transmitted(edge, data, split, device, seeds.transmit, batch_size)
