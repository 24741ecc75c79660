"""Cost of the edge: parameters, FLOPs per image, latency per image, payload bytes per image."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def flops_per_image(module: nn.Module, input_shape: tuple[int, ...], device="cpu") -> int:
    """FLOPs of one forward pass for one image, counted by ``torch.utils.flop_counter`` (a multiply-add is 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = module.training
    module.eval()
    x = torch.zeros((1, *input_shape), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        module(x)
    module.train(was)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_ms_per_image(module: nn.Module, input_shape: tuple[int, ...], device="cpu", batch_size: int = 32,
                         repeats: int = 10, warmup: int = 3) -> float:
    """Median over ``repeats`` timed batches of the per-image time (synchronised on CUDA)."""
    device = torch.device(device)
    was = module.training
    module.eval()
    x = torch.randn((batch_size, *input_shape), device=device)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        module(x)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0 / batch_size)
    module.train(was)
    return float(statistics.median(times))


def payload_bytes(feature_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """Bytes sent per image: number of transmitted values x bytes per value."""
    n = 1
    for s in feature_shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def edge_cost(edge: nn.Module, input_shape: tuple[int, ...], feature_shape: tuple[int, ...], device="cpu",
              latency_batch: int = 32, latency_repeats: int = 10, params_of: nn.Module | None = None) -> dict[str, float]:
    """Cost of running ``edge`` on the device. ``params_of`` (default ``edge``) is the module whose parameters are
    deployed: pass the encoder when the edge holds training-only modules (e.g. a CEM surrogate)."""
    return {
        "encoder_params": count_params(params_of if params_of is not None else edge),
        "encoder_flops": flops_per_image(edge, input_shape, device),
        "latency_ms": latency_ms_per_image(edge, input_shape, device, latency_batch, latency_repeats),
        "payload_bytes": payload_bytes(feature_shape),
    }
