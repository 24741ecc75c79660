"""The one training loop used by every defense (DESIGN.md section 3)."""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..data import DataBundle
from ..defenses import DefenseContext, DefenseStack, StepContext
from ..models import SplitModel
from ..params import CorruptFileError, require
from ..precision import DeviceMeter, MixedPrecision
from ..utils import atomic_torch_save, load_verified, progress, rng_state, set_rng_state

log = logging.getLogger("splitveil.train")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["none", "cosine", "multistep"] = "cosine"
    milestones: list[int] = field(default_factory=list)  # epochs at which multistep multiplies lr by gamma
    gamma: float = 0.1
    grad_clip: float | None = None
    # linear lr warm-up over the first ``warmup_epochs`` epochs (per step, from lr/steps to the schedule's lr), as
    # the CEM reference trains (1 epoch); 0: none. The schedule's own epoch-wise decay is unchanged
    warmup_epochs: float = 0.0
    # autocast mixed precision (parameters and optimizer state stay float32) and the memory layout of 4-D
    # tensors; auto: bf16 + channels-last where the device runs bf16 fast, fp32 elsewhere (splitveil.precision)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    # warm start: a checkpoint (a run's checkpoint.pt, or a bare state dict of the same split model) whose model
    # weights are loaded before the first epoch; optimizer, schedule and defenses start fresh. Its SHA-256 is
    # recorded in metrics.json (the run id hashes the path, not the file)
    init_from: str | None = None

    def validate(self) -> None:
        require(self.epochs >= 0, "epochs", "must be >= 0")
        require(self.init_from is None or (isinstance(self.init_from, str) and self.init_from.strip() != ""),
                "init_from", "must be a checkpoint path or null")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.lr > 0, "lr", "must be positive")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive or null")
        require(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        require(self.warmup_epochs <= max(self.epochs, 0) or self.epochs == 0, "warmup_epochs",
                f"{self.warmup_epochs} is longer than training ({self.epochs} epochs)")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss, parameter or buffer; the message names it and the cause: ``train.lr``,
    or the defense (and its parameters) whose transmitted features blew up."""


class TrainingDivergedError(NonFiniteLossError):
    """Training diverged while every number stayed finite: the task loss rose far above its starting scale, or the
    weights or the BN statistics grew by orders of magnitude (see :meth:`Trainer.check_divergence`)."""


# divergence thresholds (Trainer.check_divergence); a healthy run stays far inside all of them
LOSS_FACTOR = 3.0         # an epoch's mean task loss above LOSS_FACTOR x ln(classes) (chance is ln C) ...
FIRST_LOSS_FACTOR = 3.0   # ... and above FIRST_LOSS_FACTOR x the first epoch's mean task loss
WEIGHT_GROWTH = 1e3       # the parameters' L2 norm above WEIGHT_GROWTH x its value at initialisation
BUFFER_GROWTH = WEIGHT_GROWTH ** 2   # a BN statistic (a variance: weights squared) above this x its initial peak
# a defense whose output exceeds its input's peak (at least 1) by this factor, or is not finite, is named as the
# cause when the loss then becomes non-finite (float32 squares overflow from ~1.8e19)
DEFENSE_BLOWUP = 1e6


class Trainer:
    """Trains ``model`` (encoder + decoder) under ``defenses``; checkpoints every epoch and resumes exactly.

    The trainer sets the defenses up itself (``defenses.setup(self.ctx)``; a stack already set up by hand for
    the same model and data is not set up twice) and hands their hooks ``self.ctx``, a
    :class:`~splitveil.defenses.DefenseContext`: a hook that changes the trainable parameters calls
    ``ctx.parameters_changed()`` and the optimizer is rebuilt here.

    The encoder and decoder run under ``cfg.precision`` (autocast) and ``cfg.channels_last``; the defenses'
    hooks get float32, contiguous features and run outside autocast, and every loss is float32. The step
    never waits for the device: losses and accuracy are summed on it and read every ``sync_every`` steps
    (progress bar, non-finite check) and at the end of the epoch."""

    run_id: str | None = None   # when set: stored in checkpoints, and a checkpoint of another run is refused
    on_epoch: Any = None        # when set: called as on_epoch(epoch, stats) after every epoch (tracking)

    def __init__(self, model: SplitModel, defenses: DefenseStack, data: DataBundle, cfg: TrainConfig,
                 device: torch.device, seed: int = 0, ckpt_path: str | Path | None = None, show_progress: bool = True,
                 augment: bool = False, sync_every: int = 25):
        self.data, self.cfg, self.device, self.seed = data, cfg, device, seed
        self.show_progress, self.augment = show_progress, augment
        self.epoch = 0            # number of finished epochs
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.amp = MixedPrecision.create(cfg.precision, cfg.channels_last, device, field="train")
        self.ctx = DefenseContext(model, data, device, epochs=cfg.epochs, seed=seed,
                                  on_parameters_changed=self.rebuild_optimizer, current_lr=self._lr, amp=self.amp)
        defenses.setup(self.ctx)   # before the model moves (as when set up by hand); once per model and data
        self.model, self.defenses = model.to(device), defenses.to(device)
        self.sync_every = max(1, int(sync_every))
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None
        self.generator = torch.Generator().manual_seed(seed)  # data order and augmentation
        self.rebuild_optimizer()
        # wall seconds of this session's training by part: steps (batches, forward/backward, the defenses'
        # epoch hooks), the per-epoch test evaluation, the checkpoints (benchmarks/run_cost.py reads them)
        self.seconds: dict[str, float] = {"steps": 0.0, "eval": 0.0, "checkpoint": 0.0}
        # the scale of the weights and BN statistics before training (a resumed run rebuilds the same model from
        # the same seed first, so it gets the same reference): divergence is judged against it
        self.initial_scale = self.scale()
        self._peaks: dict[str, torch.Tensor] = {}   # stage -> running max |output| (encoder, then each defense)

    # -- optimisation ---------------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        seen, out = set(), []
        for p in list(self.model.parameters()) + self.defenses.trainable_parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
        return out

    def rebuild_optimizer(self) -> None:
        """(Re)create optimizer and schedule, e.g. after a defense changed the model's parameters."""
        c = self.cfg
        params = self.parameters()
        if c.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, c.epochs))
        elif c.schedule == "multistep":
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, c.milestones, c.gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda e: 1.0)
        with warnings.catch_warnings():  # stepping before any optimizer step is intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.epoch):  # keep the schedule's position when rebuilt mid-training
                self.scheduler.step()

    def _warmup_lr(self, steps_per_epoch: int) -> None:
        """During the warm-up: every group's lr = the schedule's lr x (step + 1) / warm-up steps."""
        w = self.cfg.warmup_epochs
        if w <= 0:
            return
        total = max(1, int(round(w * steps_per_epoch)))
        if self.global_step >= total:
            if self.global_step == total:
                self._restore_schedule_lr()
            return
        f = (self.global_step + 1) / total
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr * f

    def _restore_schedule_lr(self) -> None:
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        soft = self.defenses.targets(y, logits.shape[1])
        if soft is None:
            return F.cross_entropy(logits, y)
        return -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        self.defenses.train()
        amp = self.amp
        amp.prepare(self.model)  # channels-last weights (no-op when already, or when disabled)
        epoch = self.epoch
        self.defenses.on_epoch_start(self.ctx, epoch)
        meter = DeviceMeter(self.device)
        first_step = self.global_step
        batches = self.data.batches(self.data.train, self.cfg.batch_size, self.device, shuffle=True,
                                    generator=self.generator, augment=self.augment, drop_last=True)
        total = max(1, len(self.data.train) // self.cfg.batch_size)
        bar = progress(batches, self.show_progress, total=total, desc=f"train {epoch + 1}/{self.cfg.epochs}", leave=False)
        for x, y in bar:
            self._warmup_lr(total)
            with amp.autocast():
                z = self.model.encoder(amp.input(x))
            z = z.float().contiguous()  # defenses see float32 features in the default layout
            self._observe("encoder", z)
            z_sent = self.defenses.transform(z, training=True, observe=self._observe)
            with amp.autocast():
                logits = self.model.decoder(z_sent)
            logits = logits.float()
            step = StepContext(x, y, z, z_sent, logits, epoch, self.global_step)
            terms = {"task": self.task_loss(logits, y), **self.defenses.loss(step)}
            loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            amp.backward_step(loss, self.optimizer, self.parameters() if self.cfg.grad_clip else None,
                              self.cfg.grad_clip)
            self.defenses.after_step(step, self.ctx)
            self.global_step += 1
            meter.add(weight=len(y), correct=(logits.detach().argmax(1) == y).sum())
            meter.add(**{f"loss.{k}": v for k, v in terms.items()})
            if (self.global_step - first_step) % self.sync_every == 0:
                means = self._check(meter, epoch, first_step)
                bar.set_postfix(loss=f"{means['loss.task']:.3f}", acc=f"{means['correct']:.3f}")
        means = self._check(meter, epoch, first_step)
        self._restore_schedule_lr()   # the schedule steps from its own lr, never from a warmed-up one
        self.scheduler.step()
        self.epoch += 1
        stats = {k: v for k, v in means.items() if k.startswith("loss.")}
        stats["train_accuracy"] = means.get("correct", 0.0)
        self.defenses.on_epoch_end(self.ctx, epoch)
        return stats

    def _check(self, meter: DeviceMeter, epoch: int, first_step: int) -> dict[str, float]:
        """One host sync: the running means; raises if a loss term was non-finite at any step so far."""
        means = meter.means()
        for k, v in means.items():
            if k.startswith("loss.") and not math.isfinite(v):
                raise NonFiniteLossError(f"loss term '{k[5:]}' became {v} in epoch {epoch + 1}, at a step in "
                                         f"[{first_step}, {self.global_step - 1}]; {self.blame()}")
        return means

    # -- divergence ---------------------------------------------------------------------------------------
    def _observe(self, stage: str, t: torch.Tensor) -> None:
        """Keep the running max |value| of what ``stage`` (the encoder, then each defense) output; on the device,
        no host sync (read only when training failed, to name the cause)."""
        peak = torch.linalg.vector_norm(t.detach(), ord=math.inf).float()
        prev = self._peaks.get(stage)
        self._peaks[stage] = peak if prev is None else torch.maximum(prev, peak)   # NaN propagates

    def blame(self) -> str:
        """The likely cause of a non-finite loss or state, as advice naming the config field: the first defense
        whose transmitted features were not finite or far larger than its input (its parameters named), else
        ``train.lr``."""
        peaks = {k: float(v) for k, v in self._peaks.items()}
        before = peaks.get("encoder")
        for d in self.defenses:
            out = peaks.get(d.name)
            if out is None or before is None:
                continue
            if math.isfinite(before) and (not math.isfinite(out) or out > DEFENSE_BLOWUP * max(1.0, before)):
                params = ", ".join(f"defense.{k}={v:g}" for k, v in vars(d.params).items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool))
                return (f"the defense '{d.name}' sent features of magnitude {out:.3g} (its input at most {before:.3g}), "
                        f"which overflow float32 in the layers after it: lower its parameters ({params or 'none'})")
            before = out
        return f"training diverged: lower train.lr (now {self.cfg.lr:g})"

    def scale(self) -> dict[str, float]:
        """``weights``: the L2 norm of every trainable parameter (model and defenses) together; ``bn``: the largest
        |value| of the model's floating-point buffers (BN running means and variances)."""
        with torch.no_grad():
            norms = [torch.linalg.vector_norm(p.detach().float()) for p in self.parameters()]
            peaks = [torch.linalg.vector_norm(b.detach().float(), ord=math.inf) for b in self.model.buffers()
                     if b.is_floating_point() and b.numel()]
            weights = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
            bn = float(torch.stack(peaks).max()) if peaks else 0.0
        return {"weights": weights, "bn": bn}

    def check_divergence(self, stats: dict[str, float]) -> None:
        """Raise :class:`TrainingDivergedError` (naming ``train.lr``) when this epoch shows divergence while every
        number is finite: its mean task loss is above both ``LOSS_FACTOR`` x ln C (a model that learned nothing
        sits at ln C) and ``FIRST_LOSS_FACTOR`` x the first epoch's, or the weights' norm grew more than
        ``WEIGHT_GROWTH`` times (the BN statistics more than ``BUFFER_GROWTH`` times) since initialisation."""
        lr = f"lower train.lr (now {self.cfg.lr:g}, train.optimizer {self.cfg.optimizer})"
        task = stats.get("loss.task")
        classes = int(getattr(self.data, "num_classes", 0) or 0)
        first = self.history[0].get("loss.task") if self.history else None   # None: this is the first epoch
        if task is not None and classes >= 2:
            chance = LOSS_FACTOR * math.log(classes)
            limit = max(chance, FIRST_LOSS_FACTOR * first) if first is not None else chance
            if task > limit:
                since = (f" and {FIRST_LOSS_FACTOR:g} x the first epoch's {first:.4g}" if first is not None else "")
                raise TrainingDivergedError(
                    f"training diverged: the mean task loss of epoch {self.epoch} is {task:.4g}, above {limit:.4g} "
                    f"({LOSS_FACTOR:g} x ln {classes} = {chance:.3g}: a model that learned nothing sits at ln "
                    f"{classes}{since}); {lr}")
        now, init = self.scale(), self.initial_scale
        if init["weights"] > 0 and now["weights"] > WEIGHT_GROWTH * init["weights"]:
            raise TrainingDivergedError(
                f"training diverged: the weights' norm grew from {init['weights']:.4g} at initialisation to "
                f"{now['weights']:.4g} after epoch {self.epoch} (more than {WEIGHT_GROWTH:g}x); {lr}")
        if now["bn"] > BUFFER_GROWTH * max(1.0, init["bn"]):
            raise TrainingDivergedError(
                f"training diverged: the BN statistics reached {now['bn']:.4g} after epoch {self.epoch} (more than "
                f"{BUFFER_GROWTH:g}x their initial {max(1.0, init['bn']):.4g}); {lr}")

    @torch.no_grad()
    def evaluate(self, split: str = "test", batch_size: int = 256) -> float:
        """Top-1 accuracy with the defenses active as at inference."""
        self.model.eval()
        part = getattr(self.data, split)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for x, y in self.data.batches(part, batch_size, self.device):  # float32: a measurement
            logits = self.model.decoder(self.defenses.transform(self.model.encoder(x), training=False))
            correct += (logits.argmax(1) == y).sum()
        return int(correct) / max(1, len(part))

    def fit(self, resume: bool = False) -> list[dict[str, float]]:
        """Train to ``cfg.epochs``; the model is handed back in the default (contiguous) layout."""
        if resume and self.ckpt_path and self.ckpt_path.exists():
            self.load(self.ckpt_path)
            log.info("resumed from %s after epoch %d", self.ckpt_path, self.epoch)
        log.info("precision %s, channels_last %s", self.amp.precision, self.amp.channels_last)
        self.defenses.check_training(self.ctx)   # what a defense cannot do with this run, before any epoch
        try:
            self._fit_epochs()
        finally:
            self.amp.release(self.model)
        return self.history

    def _fit_epochs(self) -> None:
        clock = time.perf_counter
        while self.epoch < self.cfg.epochs:
            t = clock()
            stats = self.train_epoch()
            self.seconds["steps"] += clock() - t
            self._check_finite_state()
            self.check_divergence(stats)   # finite but diverged: never recorded as a finished run
            stats["epoch"] = self.epoch
            t = clock()
            stats["test_accuracy"] = self.evaluate("test")
            self.seconds["eval"] += clock() - t
            stats["lr"] = self.optimizer.param_groups[0]["lr"]
            self.history.append(stats)
            log.info("epoch %d: %s", self.epoch, {k: round(v, 4) for k, v in stats.items()})
            if self.on_epoch is not None:
                self.on_epoch(self.epoch, {k: v for k, v in stats.items() if k != "epoch"})
            if self.ckpt_path:
                t = clock()
                self.save(self.ckpt_path)
                self.seconds["checkpoint"] += clock() - t

    def _check_finite_state(self) -> None:
        """Diverged training can keep finite losses while weights or BN statistics overflow: check them all."""
        named = [*self.model.named_parameters(), *self.model.named_buffers(), *self.defenses.named_parameters(),
                 *self.defenses.named_buffers()]
        for name, t in named:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteLossError(f"'{name}' is not finite after epoch {self.epoch}; {self.blame()}")

    # -- checkpoints (loaded with weights_only=True: no arbitrary unpickling) ----------------------------
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "global_step": self.global_step, "history": self.history,
            "model": self.model.state_dict(), "defenses": self.defenses.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(), "generator": self.generator.get_state(), "run_id": self.run_id,
            "precision": self.amp.info(), "amp": self.amp.state_dict(),
        }

    def save(self, path: str | Path) -> None:
        """The checkpoint, its SHA-256 beside it (``checkpoint.pt.sha256``); the one before is kept as
        ``checkpoint.prev.pt`` (the last state to fall back on when this one does not verify)."""
        atomic_torch_save(self.state(), path, keep_previous=True)

    def load(self, path: str | Path) -> None:
        """Resume from ``path`` after checking its recorded SHA-256 (an altered or unverifiable checkpoint is an
        IntegrityError naming it, never resumed)."""
        try:
            st = load_verified(path, map_location=self.device)
        except CorruptFileError as e:
            raise type(e)(f"{e}; delete it to train from scratch (or re-run with --force)") from None
        if self.run_id is not None and st.get("run_id") != self.run_id:
            raise CorruptFileError(f"{path}: checkpoint of run {st.get('run_id')}, not of {self.run_id}; delete it "
                                   f"(or re-run with --force)")
        self.defenses.prepare_load(st, self.ctx)
        self.model.load_state_dict(st["model"])
        self.defenses.load_state_dict(st["defenses"])
        self.epoch, self.global_step, self.history = st["epoch"], st["global_step"], list(st["history"])
        self.rebuild_optimizer()
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        self.generator.set_state(st["generator"])
        self.amp.load_state_dict(st.get("amp"))  # a checkpoint of another precision resumes in this one

