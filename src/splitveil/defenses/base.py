"""The defense plug-in interface (DESIGN.md section 3) and the composition of several defenses.

A defense is an ``nn.Module`` (so it may own parameters, buffers and extra state that checkpoints carry)
with hooks that the one training loop calls. Every hook has a no-op default, so a defense overrides only
what it changes:

- ``setup(model, data, device)``: once, before training (build simulated decoders, masks, ...).
- ``transform(z, training)``: the edge's transform of the transmitted features, at training *and* at
  inference (noise, dropout, pruning masks). The attacker sees its output.
- ``loss(step)``: extra loss terms, already weighted, as ``{name: scalar tensor}``.
- ``targets(y, num_classes)``: soft targets replacing one-hot labels (label smoothing), or None.
- ``after_step(step, trainer)``: after the optimizer step (e.g. train a simulated attacker).
- ``on_epoch_start/on_epoch_end(trainer, epoch)``: between epochs (pruning, mixture refits).
- ``prepare_load(state, trainer)``: before a checkpoint's model state is loaded (re-apply pruning).
- ``info()``: facts recorded in ``metrics.json`` (e.g. channels before/after pruning).
- ``noise_std()``: the std of the Gaussian noise the defense adds to what is sent (None: it adds none).
- ``check_stack(defenses)``: when the stack is built, reject a meaningless combination (a ConfigError).
- ``diagnostics(model, data, device)``: measurements after training, recorded in ``metrics.json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..params import ConfigError, NoParams, coerce, field_names
from ..registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..data import DataBundle
    from ..models import SplitModel

DEFENSES: Registry[type["Defense"]] = Registry("defense")


@dataclass
class StepContext:
    """What a defense sees of one training step."""

    x: torch.Tensor        # normalised inputs
    y: torch.Tensor        # integer labels
    z: torch.Tensor        # encoder output, before any transform
    z_sent: torch.Tensor   # transmitted features (after every transform)
    logits: torch.Tensor
    epoch: int
    step: int              # global step


class Defense(nn.Module):
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    conflicts: ClassVar[tuple[str, ...]] = ()   # registry names this defense cannot be combined with
    changes_targets: ClassVar[bool] = False

    def __init__(self, params: Any = None):
        super().__init__()
        self.params = params if params is not None else self.Params()

    # -- hooks (all optional) --------------------------------------------------------------------
    def setup(self, model: "SplitModel", data: "DataBundle", device: torch.device) -> None:
        pass

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return z

    def loss(self, step: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def targets(self, y: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        return None

    def after_step(self, step: StepContext, trainer: Any) -> None:
        pass

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        pass

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        pass

    def prepare_load(self, state: dict, trainer: Any) -> None:
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the main optimizer trains together with the model (default: all of this module's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def info(self) -> dict[str, Any]:
        return {}

    def noise_std(self) -> float | None:
        """Std of the N(0, s^2) noise this defense adds to the transmitted features; None: adds no noise."""
        return None

    def check_stack(self, defenses: list["Defense"]) -> None:
        """Called once with every defense of the stack (self included) when the stack is built."""

    def diagnostics(self, model: "SplitModel", data: "DataBundle", device: torch.device) -> dict[str, Any]:
        """Measurements after training (e.g. the feature scale), recorded in ``metrics.json``."""
        return {}


class DefenseStack(nn.Module):
    """Several defenses applied in order; itself used by the trainer like a single defense."""

    def __init__(self, defenses: list[Defense]):
        super().__init__()
        names = [d.name for d in defenses]
        for d in defenses:
            if names.count(d.name) > 1:
                raise ConfigError(f"defense.name: '{d.name}' is listed twice")
            bad = [c for c in d.conflicts if c in names]
            if bad:
                raise ConfigError(f"defense.name: '{d.name}' cannot be combined with '{bad[0]}'")
        if sum(d.changes_targets for d in defenses) > 1:
            raise ConfigError("defense.name: at most one defense may change the training targets")
        for d in defenses:
            d.check_stack(list(defenses))
        self.defenses = nn.ModuleList(defenses)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.defenses] or ["none"]

    @property
    def label(self) -> str:
        return "+".join(self.names)

    def __iter__(self):
        return iter(self.defenses)

    def get(self, name: str) -> Defense | None:
        return next((d for d in self.defenses if d.name == name), None)

    def setup(self, model, data, device) -> None:
        for d in self.defenses:
            d.setup(model, data, device)

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        for d in self.defenses:
            z = d.transform(z, training)
        return z

    def loss(self, step: StepContext) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for d in self.defenses:
            for k, v in d.loss(step).items():
                out[f"{d.name}.{k}"] = v
        return out

    def targets(self, y: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        for d in self.defenses:
            t = d.targets(y, num_classes)
            if t is not None:
                return t
        return None

    def after_step(self, step, trainer) -> None:
        for d in self.defenses:
            d.after_step(step, trainer)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        for d in self.defenses:
            d.on_epoch_start(trainer, epoch)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        for d in self.defenses:
            d.on_epoch_end(trainer, epoch)

    def prepare_load(self, state: dict, trainer) -> None:
        for d in self.defenses:
            d.prepare_load(state, trainer)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for d in self.defenses for p in d.trainable_parameters()]

    def info(self) -> dict[str, Any]:
        return {d.name: {**vars(d.params), **d.info()} for d in self.defenses}

    def diagnostics(self, model, data, device) -> dict[str, Any]:
        """``{defense name: its diagnostics}`` for the defenses that measure something after training."""
        out = {}
        for d in self.defenses:
            diag = d.diagnostics(model, data, device)
            if diag:
                out[d.name] = diag
        return out


class Edge(nn.Module):
    """The deployed edge: encoder followed by the defenses' transforms. Its output is what is sent."""

    def __init__(self, encoder: nn.Module, defenses: DefenseStack):
        super().__init__()
        self.encoder = encoder
        self.defenses = defenses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defenses.transform(self.encoder(x), training=self.training)


def _names(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [n.strip() for n in raw.replace("+", ",").split(",") if n.strip()]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(n, str) for n in raw):
        raise ConfigError(f"defense.name: expected a name or a list of names, got {raw!r}")
    return [n for n in raw if n != "none"]


def build_defenses(spec: dict | None) -> DefenseStack:
    """Build the defenses of a config's ``defense`` block.

    ``{name: gaussian_noise, sigma: 0.1}`` or ``{name: [gaussian_noise, nopeek], sigma: 0.1, alpha: 0.5}``.
    A flat parameter goes to every listed defense that declares it (e.g. ``sigma`` to the noise and to CEM);
    ``{<defense name>: {param: value}}`` sets one defense's parameter only and wins over the flat value.
    A parameter that no listed defense declares is an error naming it.
    """
    spec = dict(spec or {})
    names = _names(spec.pop("name", None))
    for n in names:
        if n not in DEFENSES:
            raise ConfigError(f"defense.name: unknown defense '{n}'; registered: {', '.join(['none'] + DEFENSES.names())}")
    per: dict[str, dict] = {n: {} for n in names}
    scoped = {k: spec.pop(k) for k in list(spec) if k in per}
    for key, value in spec.items():
        takers = [n for n in names if key in field_names(DEFENSES.get(n).Params)]
        if not takers:
            if key in DEFENSES or key == "none":
                raise ConfigError(f"defense.{key}: parameters given for '{key}', which is not in defense.name")
            raise ConfigError(f"unknown field 'defense.{key}' for defense(s) {names or ['none']}")
        for n in takers:
            per[n][key] = value
    for n, block in scoped.items():
        if not isinstance(block, dict):
            raise ConfigError(f"defense.{n}: expected a mapping of parameters, got {block!r}")
        per[n].update(block)
    defenses = []
    for n in names:
        cls = DEFENSES.get(n)
        defenses.append(cls(coerce(cls.Params, per[n], f"defense.{n}")))
    return DefenseStack(defenses)
