"""The CEM reference bottleneck (issue 11): VGG11-BN cut after conv2, conv3x3 128 -> 8 with no BN and no ReLU,
sigmoid right after it; the cloud side starts with a plain conv 8 -> 128."""
import pytest
import torch
from torch import nn

from splitveil.models import ModelConfig, build_split_model
from splitveil.params import ConfigError, coerce

REFERENCE = dict(name="vgg11_bn", cut="conv2", bottleneck_channels=8, bottleneck_norm=False, bottleneck_act="none",
                 sigmoid=True)


def leaf_types(module):
    return [type(m) for m in module.modules() if not list(m.children())]


def test_reference_encoder_layers_and_parameter_count():
    sm = build_split_model(ModelConfig(**REFERENCE), 10, (3, 32, 32))
    assert leaf_types(sm.encoder) == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                                      nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                                      nn.Conv2d, nn.Sigmoid]
    convs = [m for m in sm.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert (convs[-1].in_channels, convs[-1].out_channels, convs[-1].kernel_size) == (128, 8, (3, 3))
    # the CEM paper's Table 9: 0.085M encoder parameters
    assert sum(p.numel() for p in sm.encoder.parameters()) == 85_256
    # the cloud side starts with a plain conv 8 -> 128 (no BN, no ReLU) before VGG's conv3 block
    first = list(sm.decoder.children())[0]
    assert leaf_types(first) == [nn.Conv2d]
    assert (first.body[0].in_channels, first.body[0].out_channels) == (8, 128)
    assert isinstance(list(sm.decoder.children())[1][0], nn.Conv2d)
    assert sm.feature_shape == (8, 8, 8)


def test_reference_features_lie_in_open_unit_interval_and_use_both_halves():
    torch.manual_seed(0)
    sm = build_split_model(ModelConfig(**{**REFERENCE, "width": 0.25}), 10, (3, 32, 32)).eval()
    with torch.no_grad():
        z = sm.encoder(torch.randn(16, 3, 32, 32))
    # sigmoid of an unrectified conv: values on both sides of 1/2 (a ReLU before it would give only >= 1/2)
    assert float(z.min()) > 0 and float(z.max()) < 1
    assert float((z < 0.5).float().mean()) > 0.2 and float((z > 0.5).float().mean()) > 0.2


def test_default_bottleneck_unchanged_and_bad_activation_named():
    sm = build_split_model(ModelConfig(name="vgg11_bn", cut="conv2", width=0.25, bottleneck_channels=8), 10, (3, 32, 32))
    assert leaf_types(sm.encoder.bottleneck) == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    with pytest.raises(ConfigError, match="bottleneck_act"):
        coerce(ModelConfig, {**REFERENCE, "bottleneck_act": "gelu"}, "model")


def test_cloud_width_keeps_the_edge_and_narrows_the_cloud():
    """model.cloud_width: the encoder is exactly the one at ``width`` (the CEM paper's 85,256 parameters), the cloud
    is narrower; without a bottleneck it is refused naming the field."""
    import pytest
    import torch

    from splitveil.models import ModelConfig, build_split_model
    from splitveil.params import ConfigError, coerce

    ref = dict(name="vgg11_bn", cut="conv2", width=1.0, bottleneck_channels=8, bottleneck_norm=False,
               bottleneck_act="none", sigmoid=True)
    full = build_split_model(ModelConfig(**ref), 10, (3, 32, 32))
    half = build_split_model(ModelConfig(**ref, cloud_width=0.5), 10, (3, 32, 32))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(half.encoder) == n(full.encoder) == 85256
    assert half.feature_shape == full.feature_shape == (8, 8, 8)
    assert n(half.decoder) < 0.35 * n(full.decoder)
    assert half.decoder.bottleneck_up.body[0].out_channels == 64 and half.decoder.conv3[0].in_channels == 64
    assert half(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="cloud_width"):
        coerce(ModelConfig, {"name": "vgg11_bn", "width": 1.0, "cloud_width": 0.5})
