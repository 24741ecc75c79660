"""The defense plug-in interface (DESIGN.md section 3) and the composition of several defenses.

A defense is an ``nn.Module`` (so it may own parameters, buffers and extra state that checkpoints carry)
with hooks that the one training loop calls. The hooks get a :class:`DefenseContext` (the model, the data,
the device, the number of epochs, the seed, the learning rate), never the trainer itself. Every hook has a
no-op default, so a defense overrides only what it changes:

- ``setup(ctx)``: once, before training (build simulated decoders, masks, ...). ``Trainer`` calls it.
- ``check_training(ctx)``: before the first epoch, reject what cannot work with this run (a ConfigError).
- ``transform(z, training)``: the edge's transform of the transmitted features, at training *and* at
  inference (noise, dropout, pruning masks). The attacker sees its output.
- ``loss(step)``: extra loss terms, already weighted, as ``{name: scalar tensor}``.
- ``targets(y, num_classes)``: soft targets replacing one-hot labels (label smoothing), or None.
- ``after_step(step, ctx)``: after the optimizer step (e.g. train a simulated attacker).
- ``on_epoch_start(ctx, epoch)`` / ``on_epoch_end(ctx, epoch)``: between epochs (pruning, mixture refits).
  A hook that replaces or adds trainable parameters calls ``ctx.parameters_changed()``: the trainer rebuilds
  its optimizer (keeping the schedule's position).
- ``prepare_load(state, ctx)``: before a checkpoint's model state is loaded (re-apply pruning).
- ``info()``: facts recorded in ``metrics.json`` (e.g. channels before/after pruning).
- ``diagnostics(model, data, device)``: measurements after training, recorded in ``metrics.json``.

Composition rules are capabilities that a defense declares, checked by :class:`DefenseStack` when the stack is
built (so when the config is read, before any training), never names compared with strings:

- ``noise_std()`` / ``adds_noise``: the Gaussian noise the defense adds to what is sent (CEM's threshold is
  relative to it);
- ``changes_targets``: replaces the one-hot targets (at most one per stack);
- ``changes_feature_size``: may change the size of the transmitted features during training (PATROL with
  ``prune_output``); ``needs_fixed_features``: cannot follow such a change (noise_arl's decoder);
  ``adapts_to_feature_size``: follows it at the start of the next epoch, so must be listed after the changer;
- ``conflicts``: registry names this defense cannot be combined with;
- ``shared_params``: flat config keys this defense shares with others by design (``sigma``);
- ``check_stack(defenses)``: any further rule of one defense about the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from ..params import ConfigError, NoParams, params_from
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


@dataclass
class DefenseContext:
    """What a defense's hooks may use of the training run (instead of the whole trainer).

    ``epochs`` is the planned number of training epochs (None outside a trainer); ``lr`` the optimizer's
    current learning rate (None outside a trainer); ``amp`` the training loop's precision and layout (a hook
    that runs the encoder itself, e.g. CEM's refit, runs it the same way). A hook that changed the trainable parameters (pruning
    replaced tensors, a surrogate was rebuilt) calls :meth:`parameters_changed`."""

    model: "SplitModel"
    data: "DataBundle"
    device: torch.device
    epochs: int | None = None
    seed: int = 0
    on_parameters_changed: Callable[[], None] | None = field(default=None, repr=False)
    current_lr: Callable[[], float] | None = field(default=None, repr=False)
    amp: Any = field(default=None, repr=False)   # the loop's splitveil.precision.MixedPrecision (None: fp32)

    def parameters_changed(self) -> None:
        """The defense replaced or added trainable parameters: the trainer rebuilds its optimizer."""
        if self.on_parameters_changed is not None:
            self.on_parameters_changed()

    @property
    def lr(self) -> float | None:
        return float(self.current_lr()) if self.current_lr is not None else None


class Defense(nn.Module):
    name: ClassVar[str] = ""          # the registry name (set by ``DEFENSES.register``; written once)
    Params: ClassVar[type] = NoParams
    conflicts: ClassVar[tuple[str, ...]] = ()   # registry names this defense cannot be combined with
    changes_targets: ClassVar[bool] = False
    shared_params: ClassVar[tuple[str, ...]] = ()  # flat keys shared by design with other listed defenses
    needs_fixed_features: ClassVar[bool] = False   # cannot follow a change of the transmitted feature size
    adapts_to_feature_size: ClassVar[bool] = False  # follows such a change at the next epoch start

    def __init__(self, params: Any = None, **param_values: Any):
        """``params``: a ``Params`` object, a mapping or None (defaults); or the parameters as keywords
        (``GaussianNoise(sigma=0.1)``). ``create_defense(name, **params)`` builds a whole stack by name."""
        super().__init__()
        self.params = params_from(type(self), params, param_values, f"defense.{self.name}", "create_defense")

    # -- capabilities ------------------------------------------------------------------------------------
    def noise_std(self) -> float | None:
        """Std of the N(0, s^2) noise this defense adds to the transmitted features; None: adds no noise."""
        return None

    @property
    def adds_noise(self) -> bool:
        return self.noise_std() is not None

    @property
    def changes_feature_size(self) -> bool:
        """True if this defense may change the size of the transmitted features during training."""
        return False

    def check_stack(self, defenses: list["Defense"]) -> None:
        """Called once with every defense of the stack (self included) when the stack is built."""

    # -- hooks (all optional) --------------------------------------------------------------------
    def setup(self, ctx: DefenseContext) -> None:
        pass

    def check_training(self, ctx: DefenseContext) -> None:
        pass

    def transform(self, z: torch.Tensor, training: bool) -> torch.Tensor:
        return z

    def loss(self, step: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def targets(self, y: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        return None

    def after_step(self, step: StepContext, ctx: DefenseContext) -> None:
        pass

    def on_epoch_start(self, ctx: DefenseContext, epoch: int) -> None:
        pass

    def on_epoch_end(self, ctx: DefenseContext, epoch: int) -> None:
        pass

    def prepare_load(self, state: dict, ctx: DefenseContext) -> None:
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the main optimizer trains together with the model (default: all of this module's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def info(self) -> dict[str, Any]:
        return {}

    def diagnostics(self, model: "SplitModel", data: "DataBundle", device: torch.device) -> dict[str, Any]:
        """Measurements after training (e.g. the feature scale), recorded in ``metrics.json``."""
        return {}


class DefenseStack(nn.Module):
    """Several defenses applied in order; itself used by the trainer like a single defense.

    The composition rules (see the module doc) are checked here, when the stack is built."""

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
        for i, changer in enumerate(defenses):
            if not changer.changes_feature_size:
                continue
            for j, d in enumerate(defenses):
                if d is changer:
                    continue
                if d.needs_fixed_features:
                    raise ConfigError(f"defense.name: '{changer.name}' changes the size of the transmitted features "
                                      f"during training and '{d.name}' cannot follow that; use them apart or stop "
                                      f"{changer.name} changing the size (patrol: prune_output: false)")
                if d.adapts_to_feature_size and j < i:
                    raise ConfigError(f"defense.name: '{changer.name}' changes the size of the transmitted features; "
                                      f"list it before '{d.name}', which follows the new size")
        for d in defenses:
            d.check_stack(list(defenses))
        self.defenses = nn.ModuleList(defenses)
        self._ctx: DefenseContext | None = None
        self._setup_key: tuple[int, int] | None = None

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

    @property
    def context(self) -> DefenseContext | None:
        return self._ctx

    def setup(self, ctx: DefenseContext | "SplitModel", data: "DataBundle | None" = None,
              device: torch.device | str | None = None) -> DefenseContext:
        """Set every defense up for ``ctx`` (or the older spelling ``setup(model, data, device)``).

        ``Trainer`` calls it; a second call for the same model and data only adopts the new context (the
        trainer's, with its optimizer callbacks), so code that still sets up by hand is harmless."""
        if not isinstance(ctx, DefenseContext):
            if data is None or device is None:
                raise TypeError("setup(ctx) or setup(model, data, device)")
            ctx = DefenseContext(ctx, data, torch.device(device))
        key = (id(ctx.model), id(ctx.data))
        if self._setup_key != key:
            for d in self.defenses:
                d.setup(ctx)
            self._setup_key = key
        self._ctx = ctx
        return ctx

    def _context(self, ctx: Any) -> DefenseContext:
        if isinstance(ctx, DefenseContext):
            return ctx
        if self._ctx is None:
            raise RuntimeError("the defense stack is not set up: call setup(ctx) (Trainer does) first")
        return self._ctx

    def check_training(self, ctx: DefenseContext | None = None) -> None:
        c = self._context(ctx)
        for d in self.defenses:
            d.check_training(c)

    def transform(self, z: torch.Tensor, training: bool,
                  observe: "Callable[[str, torch.Tensor], None] | None" = None) -> torch.Tensor:
        """Every defense's transform in order; ``observe(name, output)`` (read-only) after each."""
        for d in self.defenses:
            z = d.transform(z, training)
            if observe is not None:
                observe(d.name, z)
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

    def after_step(self, step: StepContext, ctx: DefenseContext | None = None) -> None:
        c = self._context(ctx)
        for d in self.defenses:
            d.after_step(step, c)

    def on_epoch_start(self, ctx: DefenseContext | None, epoch: int) -> None:
        c = self._context(ctx)
        for d in self.defenses:
            d.on_epoch_start(c, epoch)

    def on_epoch_end(self, ctx: DefenseContext | None, epoch: int) -> None:
        c = self._context(ctx)
        for d in self.defenses:
            d.on_epoch_end(c, epoch)

    def prepare_load(self, state: dict, ctx: DefenseContext | None = None) -> None:
        c = self._context(ctx)
        for d in self.defenses:
            d.prepare_load(state, c)

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
