"""An inference-only copy of a module with its eval-mode algebra simplified, for passes that only read features.

Two rewrites, both exact in real arithmetic for a module in eval mode (only float rounding differs):

- a ``Conv2d`` directly followed by a ``BatchNorm2d`` (running statistics) inside an ``nn.Sequential`` becomes one
  convolution: eval-mode BN is the per-channel affine map ``gamma * (u - mean) / sqrt(var + eps) + beta``, folded
  into the convolution's weight and bias;
- a ``ReLU`` directly followed by a ``MaxPool2d`` becomes the pool then the ReLU: ReLU is monotone, so the max of
  the rectified values is the rectified max, and the ReLU then touches 1/4 of the elements (2x2 pool).

Other layers are left as they are (an ``AvgPool2d`` does not commute with ReLU and is never swapped), and so
is any layer with hooks or a parametrization. On CPU the
element-wise BN/ReLU passes of a VGG block cost more than its convolution at bf16, so the copy encodes in about
half the time. Used by the CEM-GMM refit, which encodes the training split once per epoch.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import parametrize


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``Conv2d`` equal to ``bn(conv(x))`` with ``bn`` in eval mode (its running statistics)."""
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        w = conv.weight.float()
        scale = bn.running_var.float().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.float()
        bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float32)
        shift = bn.bias.float() if bn.bias is not None else torch.zeros_like(scale)
        new_w = (w * scale.view(-1, *([1] * (w.dim() - 1)))).to(conv.weight.dtype)
        fmt = torch.channels_last if (conv.weight.dim() == 4 and not conv.weight.is_contiguous()
                                      and conv.weight.is_contiguous(memory_format=torch.channels_last)) \
            else torch.contiguous_format
        fused.weight = nn.Parameter(new_w.contiguous(memory_format=fmt), requires_grad=False)
        fused.bias = nn.Parameter(((bias - bn.running_mean.float()) * scale + shift).to(conv.weight.dtype),
                                  requires_grad=False)
    return fused


def _plain(*modules: nn.Module) -> bool:
    """No hooks and no parametrization (e.g. torch.nn.utils.prune recomputes ``weight`` in a pre-hook, which
    would overwrite a folded weight): such layers are left as they are."""
    return not any(m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m) for m in modules)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels and _plain(conv, bn))


def _swappable(relu: nn.Module, pool: nn.Module) -> bool:
    return type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d and not pool.return_indices and _plain(relu, pool)


def _rewrite(module: nn.Module) -> dict[str, int]:
    counts = {"conv_bn_folded": 0, "relu_pool_swapped": 0}
    for child in module.children():
        for k, v in _rewrite(child).items():
            counts[k] += v
    if not isinstance(module, nn.Sequential):
        return counts
    layers = list(module._modules.items())
    out: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(layers):
        name, layer = layers[i]
        nxt = layers[i + 1][1] if i + 1 < len(layers) else None
        if nxt is not None and _foldable(layer, nxt):
            layers[i + 1] = (name, fold_conv_bn(layer, nxt))     # the fused conv takes the BN's place, under its name
            counts["conv_bn_folded"] += 1
            i += 1
            continue
        if nxt is not None and _swappable(layer, nxt):
            out += [(layers[i + 1][0], nxt), (name, layer)]
            counts["relu_pool_swapped"] += 1
            i += 2
            continue
        out.append((name, layer))
        i += 1
    module._modules = OrderedDict(out)
    return counts


def inference_copy(module: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """An eval-mode, gradient-free copy of ``module`` with the rewrites of the module doc applied; ``module`` is
    not changed. Returns (copy, counts of each rewrite)."""
    m = copy.deepcopy(module).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    counts = _rewrite(m)
    return m, counts
