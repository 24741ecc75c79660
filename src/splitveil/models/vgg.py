"""VGG with batch norm, written as one block per conv layer (its max-pool folded in)."""
from __future__ import annotations

from torch import nn

from .base import MODELS, BlockModel, scaled

CFGS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13_bn": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                 512, 512, 512, 512, "M"],
}


def make_vgg(cfg: list, num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0,
             hidden: int = 0) -> BlockModel:
    """Blocks ``conv1..convN`` (conv-BN-ReLU, then max-pool where the config has one and the map is >= 2),
    then ``fc1..`` hidden layers if ``hidden`` > 0 and the ``classifier``."""
    cin, size = input_shape[0], min(input_shape[1:])
    blocks: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(cfg):
        c = scaled(cfg[i], width)
        layers: list[nn.Module] = [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i + 1 < len(cfg) and cfg[i + 1] == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            i += 1
        blocks.append((f"conv{len(blocks) + 1}", nn.Sequential(*layers)))
        cin, i = c, i + 1
    feat = cin
    if hidden:
        blocks.append(("fc1", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feat, hidden),
                                            nn.ReLU(inplace=True))))
        blocks.append(("classifier", nn.Linear(hidden, num_classes)))
    else:
        blocks.append(("classifier", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feat, num_classes))))
    return BlockModel(blocks, input_shape)


for _name, _cfg in CFGS.items():
    MODELS.register(_name, f"{_name.split('_')[0].upper()} with batch norm: one block per conv layer, "
                    "max-pools folded in, then the classifier")(
        lambda num_classes, input_shape, width=1.0, hidden=0, _c=_cfg: make_vgg(_c, num_classes, input_shape, width, hidden))
