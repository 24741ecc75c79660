"""PATROL-style privacy-oriented pruning (Ding et al., WACV 2024): at a chosen epoch, remove the encoder
channels that contribute least to the task, then keep training (fine-tuning) the smaller encoder.

The importance of an output channel is the first-order Taylor estimate of the change of the training loss
when the channel is removed, |gamma dL/dgamma + beta dL/dbeta| of its batch norm (or |sum w dL/dw| of the
conv without one), summed over the steps of the epoch before pruning. Each prunable conv keeps its
``1 - amount`` most important channels. The graph surgery is done here on the block-structured encoder
(a chain of conv / batch-norm / activation / pooling layers, e.g. the VGG family with or without a bottleneck):
the conv's output channels, its batch norm and the next conv's input channels shrink together.
By default the transmitted channels (the last encoder conv) are kept, so the cloud part is unchanged;
``prune_output: true`` prunes them too and shrinks the cloud's first conv.

Checkpoints hold plain tensors only: ``prepare_load`` reads the pruned shapes from the checkpoint's state
dict and re-applies the structure before the weights are loaded (``torch.load(weights_only=True)``).
Residual encoders (ResNet) and transformers are rejected with a clear error."""
from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Any, Literal

import torch
from torch import nn

from ..metrics.cost import count_params, flops_per_image
from ..models.base import Bottleneck
from ..params import ConfigError, require
from .base import DEFENSES, Defense, StepContext

log = logging.getLogger("splitveil.defenses.patrol")

_CONTAINERS = (nn.Sequential, Bottleneck)
_PASS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity,
         nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d)


@dataclass
class PatrolParams:
    amount: float = 0.5          # fraction of the output channels removed from every prunable encoder conv
    prune_epoch: int = 1         # prune before this (0-based) epoch, i.e. after this many epochs; then fine-tune
    importance: Literal["taylor", "magnitude"] = "taylor"  # taylor: task-loss gradients; magnitude: |BN gamma|
    prune_output: bool = False   # also prune the transmitted channels (the cloud's first conv shrinks too)
    min_channels: int = 1        # never keep fewer channels than this in a conv

    def validate(self) -> None:
        require(0.0 <= self.amount < 1.0, "amount", f"must be in [0, 1), got {self.amount}")
        require(self.prune_epoch >= 0, "prune_epoch", "must be >= 0")
        require(self.importance == "magnitude" or self.prune_epoch >= 1, "prune_epoch",
                "must be >= 1 with importance 'taylor' (the importance is gathered during the epoch before pruning)")
        require(self.min_channels >= 1, "min_channels", "must be >= 1")


def _leaves(module: nn.Module, prefix: str, where: str) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, leaf) in execution order for a chain of known layers."""
    out = []
    for name, child in module.named_children():
        q = f"{prefix}.{name}" if prefix else name
        if isinstance(child, _CONTAINERS):
            out += _leaves(child, q, where)
        elif isinstance(child, (nn.Conv2d, nn.BatchNorm2d) + _PASS):
            if isinstance(child, nn.Conv2d) and child.groups != 1:
                raise ConfigError(f"defense.patrol: grouped conv '{q}' in the {where} cannot be pruned")
            out.append((module, name, q, child))
        else:
            raise ConfigError(f"defense.patrol: the {where} layer '{q}' ({type(child).__name__}) is not a plain "
                              "conv / batch-norm / activation / pooling layer; patrol prunes chain encoders "
                              "(the VGG family), not residual or transformer encoders")
    return out


@dataclass
class _Unit:
    """A prunable conv, its batch norm (if any) and the next conv that reads its channels."""
    conv: tuple[nn.Module, str, str]
    bn: tuple[nn.Module, str, str] | None
    nxt: tuple[nn.Module, str, str]


def _get(ref):
    return getattr(ref[0], ref[1])


def _replace(ref, new: nn.Module) -> None:
    setattr(ref[0], ref[1], new)


def _new_conv(old: nn.Conv2d, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None) -> nn.Conv2d:
    w = old.weight.data
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Conv2d(w.shape[1], w.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode).to(w.device, w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data if out_idx is None else old.bias.data[out_idx])
    new.train(old.training)
    return new


def _new_bn(old: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), old.eps, old.momentum, old.affine, old.track_running_stats)
    new = new.to(old.weight.device if old.affine else old.running_mean.device)
    if old.affine:
        new.weight.data.copy_(old.weight.data[idx])
        new.bias.data.copy_(old.bias.data[idx])
    if old.track_running_stats:
        new.running_mean.copy_(old.running_mean[idx])
        new.running_var.copy_(old.running_var[idx])
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


@DEFENSES.register("patrol", "PATROL pruning: remove the encoder channels least useful to the task at an epoch, "
                             "then fine-tune (params: amount, prune_epoch)")
class Patrol(Defense):
    Params = PatrolParams

    @property
    def changes_feature_size(self) -> bool:
        return bool(self.params.prune_output)   # the transmitted channels are pruned too

    def setup(self, ctx) -> None:
        model = ctx.model
        self._model = [model]          # a list: the model must not become a submodule of the defense
        self._image_shape = tuple(model.input_shape)
        enc = _leaves(model.encoder, "encoder", "encoder")
        convs = [(i, leaf) for i, leaf in enumerate(enc) if isinstance(leaf[3], nn.Conv2d)]
        if not convs:
            raise ConfigError("defense.patrol: the encoder has no conv layer to prune")
        for (_, a), (_, b) in zip(convs, convs[1:]):
            if a[3].out_channels != b[3].in_channels:
                raise ConfigError(f"defense.patrol: '{b[2]}' does not read the output of '{a[2]}'; "
                                  "the encoder is not a plain chain")
        units: list[_Unit] = []
        for k, (i, leaf) in enumerate(convs):
            bn = enc[i + 1] if i + 1 < len(enc) and isinstance(enc[i + 1][3], nn.BatchNorm2d) else None
            if k + 1 < len(convs):
                nxt = convs[k + 1][1]
            elif self.params.prune_output:
                nxt = self._cloud_first_conv(model, leaf[3].out_channels)
            else:
                continue
            units.append(_Unit(leaf[:3], bn[:3] if bn else None, nxt[:3]))
        self._units = units
        if not units:
            log.warning("patrol: the encoder has a single conv, whose channels are transmitted; nothing to prune "
                        "(set defense.patrol.prune_output: true, cut deeper or add a bottleneck)")
        for j, u in enumerate(units):
            self.register_buffer(f"importance_{j}", torch.zeros(_get(u.conv).out_channels))
        self.register_buffer("pruned", torch.zeros((), dtype=torch.long))
        self._before = self._measure()
        self._after: dict[str, Any] | None = None
        self._pruned_at: int | None = None

    @staticmethod
    def _cloud_first_conv(model, channels: int):
        for parent, attr, q, leaf in _leaves_first(model.decoder):
            if isinstance(leaf, nn.Conv2d):
                if leaf.in_channels != channels:
                    break
                return parent, attr, q, leaf
            if any(True for _ in leaf.parameters()):
                break
        raise ConfigError("defense.patrol: prune_output needs the cloud part to start with a conv that reads the "
                          "transmitted channels; use prune_output: false")

    # -- measurement ---------------------------------------------------------------------------------------
    def _measure(self) -> dict[str, Any]:
        model = self._model[0]
        dev = next(model.encoder.parameters()).device
        channels = [_get(u.conv).out_channels for u in self._units]
        return {"channels": channels, "total_channels": int(sum(channels)),
                "encoder_flops": flops_per_image(model.encoder, self._image_shape, dev),
                "encoder_params": count_params(model.encoder)}

    # -- importance ----------------------------------------------------------------------------------------
    def _scores(self, u: _Unit) -> torch.Tensor:
        if u.bn is not None and _get(u.bn).affine:
            bn = _get(u.bn)
            if self.params.importance == "magnitude":
                return bn.weight.detach().abs()
            g = torch.zeros_like(bn.weight)
            for p in (bn.weight, bn.bias):
                if p.grad is not None:
                    g = g + p.detach() * p.grad.detach()
            return g.abs()
        conv = _get(u.conv)
        if self.params.importance == "magnitude":
            return conv.weight.detach().abs().flatten(1).sum(1)
        if conv.weight.grad is None:
            return torch.zeros(conv.out_channels, device=conv.weight.device)
        s = (conv.weight.detach() * conv.weight.grad.detach()).flatten(1).sum(1)
        if conv.bias is not None and conv.bias.grad is not None:
            s = s + conv.bias.detach() * conv.bias.grad.detach()
        return s.abs()

    def after_step(self, step: StepContext, ctx) -> None:
        if self.params.importance == "taylor" and not int(self.pruned) and step.epoch == self.params.prune_epoch - 1:
            for j, u in enumerate(self._units):
                buf = getattr(self, f"importance_{j}")
                buf += self._scores(u).to(buf.dtype)

    # -- surgery -------------------------------------------------------------------------------------------
    def _restructure(self, keeps: list[torch.Tensor]) -> None:
        for u, keep in zip(self._units, keeps):
            _replace(u.conv, _new_conv(_get(u.conv), None, keep))
            if u.bn is not None:
                _replace(u.bn, _new_bn(_get(u.bn), keep))
            _replace(u.nxt, _new_conv(_get(u.nxt), keep, None))
        self._model[0].measure_feature_shape()   # the model measures what it now sends
        self.pruned.fill_(1)
        self._after = self._measure()

    def prune(self) -> None:
        """Remove the ``amount`` least important channels of every prunable conv (now)."""
        keeps = []
        for j, u in enumerate(self._units):
            n = _get(u.conv).out_channels
            n_keep = max(self.params.min_channels, n - int(round(self.params.amount * n)))
            n_keep = min(n, n_keep)
            score = getattr(self, f"importance_{j}") if self.params.importance == "taylor" else self._scores(u)
            keep = torch.sort(torch.topk(score.to(torch.float64), n_keep).indices).values
            keeps.append(keep.to(_get(u.conv).weight.device))
        self._restructure(keeps)

    def check_training(self, ctx) -> None:
        if ctx.epochs is not None and self.params.prune_epoch >= ctx.epochs:
            raise ConfigError(f"defense.patrol.prune_epoch: {self.params.prune_epoch} is not below train.epochs "
                              f"({ctx.epochs}); the encoder would never be pruned")

    def on_epoch_start(self, ctx, epoch: int) -> None:
        if epoch == self.params.prune_epoch and not int(self.pruned):
            self.prune()
            self._pruned_at = epoch
            ctx.parameters_changed()   # the pruned parameters are new tensors

    def prepare_load(self, state: dict, ctx) -> None:
        """Give the model the checkpoint's (possibly pruned) shapes before its weights are loaded."""
        sd = state["model"]
        keeps, changed = [], False
        for u in self._units:
            n_now = _get(u.conv).out_channels
            key = f"{u.conv[2]}.weight"
            w = sd.get(key)
            if w is None:
                raise ConfigError(f"defense.patrol: checkpoint has no '{key}'; it was written by another model")
            n_ck = int(w.shape[0])
            if n_ck > n_now:
                raise ConfigError(f"defense.patrol: checkpoint '{key}' has {n_ck} channels, the model {n_now}")
            changed |= n_ck != n_now
            keeps.append(torch.arange(n_ck, device=_get(u.conv).weight.device))
        if changed:
            self._restructure(keeps)
            self._pruned_at = self.params.prune_epoch

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pruned": bool(int(self.pruned)) and bool(self._units),
                               "pruned_at_epoch": self._pruned_at, "layers": [u.conv[2] for u in self._units]}
        if not self._units:
            out["note"] = "nothing to prune: the encoder's only conv is the transmitted one"
        after = self._after or self._before
        for k in ("channels", "total_channels", "encoder_flops", "encoder_params"):
            out[f"{k}_before"] = self._before[k]
            out[f"{k}_after"] = after[k]
        return out


def _leaves_first(module: nn.Module):
    """Leaves of ``module`` in order, without the chain check (only the first few are looked at)."""
    for name, child in module.named_children():
        kids = list(child.named_children())
        if kids:
            yield from _leaves_first(child)
        else:
            yield module, name, name, child
