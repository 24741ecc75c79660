"""Numeric precision and memory layout of training and fitting loops (issue 12), in one place.

``precision``: ``auto | fp32 | bf16 | fp16``. ``bf16``/``fp16`` mean *autocast* mixed precision: parameters,
gradients and optimizer state stay float32; only the heavy ops (convolutions, matmuls) run in the low
precision. Losses and every statistic that needs precision are computed in float32 by the caller
(cast the network's output with ``.float()`` before the loss).

``auto`` picks ``bf16`` where the device runs it fast (a CPU with AMX-BF16 or AVX512-BF16, a CUDA GPU with
native bf16) and ``fp32`` elsewhere. ``fp16`` is CUDA only and uses a gradient scaler.

``channels_last``: ``auto | true | false``; ``auto`` turns it on where ``auto`` precision would pick bf16
(the same devices), independently of the precision actually chosen.

Typical fit loop (an attack's decoder, a simulated attacker, ...)::

    amp = MixedPrecision.create(params.precision, params.channels_last, device, field="attacks.x.precision")
    net = amp.prepare(net)                          # channels-last weights when enabled
    opt = torch.optim.Adam(net.parameters())
    meter = DeviceMeter(device)
    for z, x in batches:
        with amp.autocast():
            out = net(amp.input(z))
        loss = F.mse_loss(out.float(), x)           # float32 loss
        opt.zero_grad(set_to_none=True)
        amp.backward_step(loss, opt)                # scaler for fp16; grad clipping optional
        meter.add(loss=loss)                        # stays on the device: no host sync
    stats = meter.means()                           # one host sync per epoch
    net = amp.release(net)                          # back to the default layout for whoever uses it next
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .params import ConfigError

log = logging.getLogger("splitveil.precision")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _dev(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (oneDNN then runs bf16 convolutions natively)."""
    flags = cpu_flags()
    if flags:
        return bool({"amx_bf16", "avx512_bf16"} & flags)
    try:  # no /proc (macOS, Windows): ask torch's own CPU feature probe (private API, may not exist)
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001
        return False


def cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 on this CUDA GPU (compute capability >= 8.0: Ampere and later)."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def fast_bf16(device: torch.device | str) -> bool:
    device = _dev(device)
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    if device.type == "cuda":
        return cuda_has_bf16(device)
    return False


def resolve_precision(name: str, device: torch.device | str, field: str = "precision") -> str:
    """``auto|fp32|bf16|fp16`` -> the precision used on ``device`` (``fp32``, ``bf16`` or ``fp16``).

    Raises :class:`ConfigError` naming ``field`` for an unknown name, fp16 off CUDA, or bf16 on a CUDA GPU
    without bf16."""
    device = _dev(device)
    if name not in PRECISIONS:
        raise ConfigError(f"{field}: {name!r} is not one of {list(PRECISIONS)}")
    if name == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"{field}: fp16 needs a CUDA device (it is {device.type}); use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not cuda_has_bf16(device):
        raise ConfigError(f"{field}: this CUDA GPU has no native bf16; use fp16 or fp32")
    if name == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning("%s: bf16 on a CPU without AMX/AVX512-BF16 is emulated and likely slower than fp32", field)
    return name


def resolve_channels_last(flag: bool | str, device: torch.device | str, field: str = "channels_last") -> bool:
    """``auto|true|false`` -> whether 4-D weights and inputs use the channels-last memory layout."""
    if isinstance(flag, bool):
        return flag
    if flag == "auto":
        return fast_bf16(device)
    raise ConfigError(f"{field}: {flag!r} is not auto, true or false")


def autocast(device: torch.device | str, precision: str):
    """Autocast context for an already resolved precision (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device = _dev(device)
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 on CUDA; None otherwise (bf16 has float32's exponent range)."""
    device = _dev(device)
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


@dataclass
class MixedPrecision:
    """Resolved precision and layout of one loop, with the few calls a training or fitting step needs."""

    device: torch.device
    precision: str = "fp32"          # resolved: fp32 | bf16 | fp16
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, precision: str = "auto", channels_last: bool | str = "auto",
               device: torch.device | str = "cpu", field: str = "") -> "MixedPrecision":
        """Resolve the config values; ``field`` prefixes error messages (e.g. ``train``)."""
        device = _dev(device)
        pre = f"{field}." if field else ""
        p = resolve_precision(precision, device, f"{pre}precision")
        cl = resolve_channels_last(channels_last, device, f"{pre}channels_last")
        return cls(device, p, cl, grad_scaler(device, p))

    def info(self) -> dict[str, Any]:
        return {"precision": self.precision, "channels_last": self.channels_last}

    def autocast(self):
        return autocast(self.device, self.precision)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Put ``module``'s 4-D weights in channels-last layout when enabled (in place; returns it)."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    @staticmethod
    def release(module: nn.Module) -> nn.Module:
        """Back to the default (contiguous) layout, e.g. before handing a trained model to other code."""
        return module.to(memory_format=torch.contiguous_format)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A 4-D input in the loop's layout (other tensors pass through)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      params: Iterable[torch.Tensor] | None = None, grad_clip: float | None = None) -> None:
        """``loss.backward()``, optional gradient-norm clipping of ``params``, ``optimizer.step()``; through the
        gradient scaler for fp16 (clipping then sees unscaled gradients)."""
        if self.scaler is None:
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(list(params or []), grad_clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(list(params or []), grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the scaler if both sides have one; a checkpoint of another precision loads as is."""
        if self.scaler is not None and state and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class DeviceMeter:
    """Running float64 sums of scalar tensors kept on the device: adding never waits for the device; ``sums()`` and
    ``means()`` read them all with one transfer. A non-finite value makes its running sum non-finite, so
    ``nonfinite()`` also tells which quantity went bad since the last ``reset()``."""

    def __init__(self, device: torch.device | str):
        self.device = _dev(device)
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, weight: int = 1, **values: torch.Tensor) -> None:
        """Add scalar tensors (``weight`` counts how many items each stands for, for ``means``)."""
        for k, v in values.items():
            v = (v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v)).to(self.device, torch.float64)
            if k in self._sums:
                self._sums[k] += v
            else:
                self._sums[k] = v.clone()
            self._counts[k] = self._counts.get(k, 0) + weight

    def sums(self) -> dict[str, float]:
        if not self._sums:
            return {}
        keys = list(self._sums)
        vals = torch.stack([self._sums[k] for k in keys]).cpu().tolist()
        return dict(zip(keys, vals))

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self._counts[k]) for k, v in self.sums().items()}

    def counts(self) -> dict[str, int]:
        return dict(self._counts)
