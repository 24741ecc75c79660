"""Block-structured models and the split into an edge encoder and a cloud decoder."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..params import ConfigError, did_you_mean, require
from ..registry import Registry

MODELS: Registry[Callable[..., "BlockModel"]] = Registry("model")


class BlockModel(nn.Module):
    """A classifier written as an ordered list of named blocks; any block boundary is a valid cut.

    ``names``: the blocks' names as shown and used by ``model.cut`` when they differ from the module keys (a
    user's model cut at ``layer2.1``: a key cannot hold a dot); default: the keys."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], input_shape: tuple[int, int, int],
                 names: list[str] | None = None):
        super().__init__()
        if len(blocks) < 2:
            raise ValueError("a split model needs at least two blocks")
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.input_shape = tuple(input_shape)
        if names is not None and len(names) != len(blocks):
            raise ValueError("BlockModel: one name per block")
        self._names = list(names) if names is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    @property
    def block_names(self) -> list[str]:
        return list(self._names) if self._names is not None else list(self.blocks._modules.keys())

    def cut_index(self, cut: int | str) -> int:
        """Number of blocks that run on the edge for ``cut`` (1-based index or the name of the last edge block)."""
        names = self.block_names
        if isinstance(cut, str) and not cut.lstrip("-").isdigit():
            if cut not in names:
                raise ConfigError(f"model.cut: unknown block '{cut}'; blocks: {', '.join(names[:-1])}")
            k = names.index(cut) + 1
        else:
            k = int(cut)
        if not 1 <= k <= len(names) - 1:
            raise ConfigError(f"model.cut: {cut} is out of range; valid cuts are 1..{len(names) - 1} "
                              f"or a block name ({', '.join(names[:-1])})")
        return k

    @torch.no_grad()
    def block_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Output shape (without batch) of every block, from one dry run in eval mode."""
        was = self.training
        self.eval()
        p = next(self.parameters())
        x = torch.zeros((1, *self.input_shape), device=p.device, dtype=p.dtype)
        out = []
        for name, blk in zip(self.block_names, self.blocks.children()):
            x = blk(x)
            out.append((name, tuple(x.shape[1:])))
        self.train(was)
        return out


BOTTLENECK_ACTS = ("relu", "none")


class Bottleneck(nn.Module):
    """3x3 conv that changes the channel count at the cut, optionally followed by BN and a ReLU.

    ``norm=False, act="none"`` is the CEM reference's ``noRELU_C8S1`` bottleneck: a plain conv (the edge's
    conv C -> 8, and on the cloud side the conv 8 -> C that restores the width, neither followed by a ReLU)."""

    def __init__(self, cin: int, cout: int, norm: bool = True, act: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        if act == "relu":
            layers.append(nn.ReLU(inplace=True))
        elif act != "none":
            raise ConfigError(f"model.bottleneck_act: {act!r} is not one of {list(BOTTLENECK_ACTS)}")
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@dataclass
class ModelConfig:
    name: str = "vgg11_bn"
    cut: Any = 2                       # blocks on the edge (1-based) or the name of the last edge block
    width: float = 1.0                 # channel multiplier (tiny models for tests: 0.125)
    bottleneck_channels: int | None = None  # narrow conv at the cut (e.g. 8); null: none
    bottleneck_norm: bool = True       # BatchNorm after each bottleneck conv (CEM reference: false)
    bottleneck_act: str = "relu"       # relu | none: activation after each bottleneck conv (CEM reference: none)
    sigmoid: bool = False              # sigmoid on the transmitted features, right after the bottleneck if any
    #                                    (CEM reference: true, with bottleneck_norm false and bottleneck_act none)
    options: dict = field(default_factory=dict)  # extra constructor arguments of the architecture
    cloud_width: float | None = None   # channel multiplier of the blocks after the cut (null: ``width``); the edge
    #                                    keeps ``width``. Needs a bottleneck (its cloud-side conv restores the width)

    def validate(self) -> None:
        from ..references import is_reference

        if is_reference(self.name):   # the user's own factory, "module:function": registered on first use
            from .generic import ensure_user_model

            ensure_user_model(self.name)
        require(self.name in MODELS, "name", f"unknown model '{self.name}'"
                f"{did_you_mean(self.name, list(MODELS.names()))}; registered: {', '.join(MODELS.names())} "
                "(or the user's factory as 'module:function')")
        require(self.width > 0, "width", "must be positive")
        require(self.bottleneck_channels is None or self.bottleneck_channels > 0, "bottleneck_channels",
                "must be positive or null")
        require(self.bottleneck_act in BOTTLENECK_ACTS, "bottleneck_act",
                f"{self.bottleneck_act!r} is not one of {list(BOTTLENECK_ACTS)}")
        require(isinstance(self.cut, (int, str)) and not isinstance(self.cut, bool), "cut",
                "must be a block index or a block name")
        require(self.cloud_width is None or self.cloud_width > 0, "cloud_width", "must be positive or null")
        require(self.cloud_width is None or self.cloud_width == self.width or self.bottleneck_channels is not None,
                "cloud_width", "a cloud narrower or wider than the edge needs model.bottleneck_channels (its "
                "cloud-side conv maps the transmitted channels to the cloud's width)")


class SplitModel(nn.Module):
    """The deployed pair: ``encoder`` (edge) and ``decoder`` (cloud); ``feature_shape`` is what is sent."""

    def __init__(self, backbone: BlockModel | nn.Module, cut: int | str, bottleneck_channels: int | None = None,
                 sigmoid: bool = False, bottleneck_norm: bool = True, bottleneck_act: str = "relu",
                 cloud: BlockModel | None = None, input_shape: tuple[int, int, int] | None = None):
        """``backbone``: a ``BlockModel``, or any ``nn.Module`` (cut at its module boundaries, see
        ``models/generic.py``; then ``input_shape`` is needed). ``cloud``: the same architecture at another width,
        whose blocks after the cut form the decoder (the edge's come from ``backbone``); needs
        ``bottleneck_channels``."""
        super().__init__()
        if not isinstance(backbone, BlockModel):
            from .generic import as_block_model

            backbone = as_block_model(backbone, input_shape)
        k = backbone.cut_index(cut)
        named = list(backbone.blocks.named_children())
        shapes = backbone.block_shapes()
        cloud_named, cloud_shapes = named, shapes
        if cloud is not None:
            if bottleneck_channels is None:
                raise ConfigError("model.cloud_width: a cloud of another width needs model.bottleneck_channels")
            cloud_named, cloud_shapes = list(cloud.blocks.named_children()), cloud.block_shapes()
        enc: list[tuple[str, nn.Module]] = named[:k]
        dec: list[tuple[str, nn.Module]] = []
        if bottleneck_channels is not None:
            c = shapes[k - 1][1]
            if len(c) != 3:
                raise ConfigError(f"model.bottleneck_channels: the cut '{named[k - 1][0]}' outputs a vector {c}, "
                                  "a conv bottleneck needs a feature map")
            enc.append(("bottleneck", Bottleneck(c[0], bottleneck_channels, bottleneck_norm, bottleneck_act)))
            dec.append(("bottleneck_up", Bottleneck(bottleneck_channels, cloud_shapes[k - 1][1][0], bottleneck_norm,
                                                    bottleneck_act)))
        if sigmoid:
            enc.append(("sigmoid", nn.Sigmoid()))
        dec += cloud_named[k:]
        self.encoder = nn.Sequential(OrderedDict(enc))
        self.decoder = nn.Sequential(OrderedDict(dec))
        self.cut_index = k
        self.cut_name = backbone.block_names[k - 1]
        # the names of the encoder's and the decoder's children in order (block names, then the bottleneck's)
        extra = [n for n, _ in enc[k:]]
        self.edge_block_names = backbone.block_names[:k] + extra
        self.cloud_block_names = [n for n, _ in dec[: len(dec) - len(cloud_named[k:])]] + backbone.block_names[k:]
        self.input_shape = backbone.input_shape
        self.block_names = backbone.block_names
        was = backbone.training  # the blocks are shared with ``backbone``: leave their mode as it was
        with torch.no_grad():
            self.eval()
            self.feature_shape = tuple(self.encoder(torch.zeros(1, *self.input_shape)).shape[1:])
        self.train(was)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    @torch.no_grad()
    def measure_feature_shape(self) -> tuple[int, ...]:
        """Measure (and store as ``feature_shape``) what the encoder sends now, e.g. after pruning changed it."""
        was = self.training
        self.eval()
        try:
            dev = next(iter(self.encoder.parameters()), torch.zeros(())).device
            self.feature_shape = tuple(self.encoder(torch.zeros(1, *self.input_shape, device=dev)).shape[1:])
        finally:
            self.train(was)
        return self.feature_shape


def create_model(name: str, num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0,
                 **options) -> BlockModel:
    """Build a registered architecture for ``input_shape`` = (C, H, W)."""
    try:
        return MODELS.get(name)(num_classes=num_classes, input_shape=tuple(input_shape), width=width, **options)
    except TypeError as e:
        raise ConfigError(f"model.options: {e}") from None


def split(model: BlockModel | nn.Module, cut: int | str, bottleneck_channels: int | None = None,
          sigmoid: bool = False, input_shape: tuple[int, int, int] | None = None) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut ``model`` after ``cut``: returns (encoder, decoder) sharing the model's parameters.

    ``model``: a ``BlockModel`` (``cut``: number of edge blocks or the last edge block's name), or any
    ``nn.Module`` (``cut``: a module's qualified name such as ``"layer2.1"``, or the number of valid cuts on the
    edge; see ``models/generic.py``). ``input_shape`` (C, H, W) is needed for a bottleneck or a sigmoid on a
    user's module."""
    if not isinstance(model, BlockModel):
        from .generic import TracedModel

        traced = TracedModel(model, input_shape)
        if bottleneck_channels is None and not sigmoid and input_shape is None:   # no dry run needed
            k = traced.cut_index(cut)
            blocks = list(traced.blocks.named_children())
            return nn.Sequential(OrderedDict(blocks[:k])), nn.Sequential(OrderedDict(blocks[k:]))
        model = traced
    sm = SplitModel(model, cut, bottleneck_channels, sigmoid)
    return sm.encoder, sm.decoder


def build_split_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, int, int]) -> SplitModel:
    backbone = create_model(cfg.name, num_classes, input_shape, cfg.width, **cfg.options)
    cloud = None
    if cfg.cloud_width is not None and cfg.cloud_width != cfg.width:
        cloud = create_model(cfg.name, num_classes, input_shape, cfg.cloud_width, **cfg.options)
    return SplitModel(backbone, cfg.cut, cfg.bottleneck_channels, cfg.sigmoid, cfg.bottleneck_norm, cfg.bottleneck_act,
                      cloud=cloud)


def scaled(c: int, width: float) -> int:
    return max(4, int(round(c * width)))
