import pytest
import torch

from splitveil.models import MODELS, ModelConfig, SplitModel, build_split_model, create_model, split
from splitveil.params import ConfigError


@pytest.mark.parametrize("name", MODELS.names())
def test_every_cut_of_every_model_splits_consistently(name):
    torch.manual_seed(0)
    model = create_model(name, 7, (3, 32, 32), width=0.125).eval()
    shapes = model.block_shapes()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        assert full.shape == (2, 7)
        for k in range(1, len(model.block_names)):
            enc, dec = split(model, k)
            z = enc(x)
            assert tuple(z.shape[1:]) == shapes[k - 1][1]          # transmitted shape known up front
            assert torch.allclose(dec(z), full, atol=1e-5)          # the two halves compose to the model
            enc2, _ = split(model, model.block_names[k - 1])       # the same cut by block name
            assert torch.allclose(enc2(x), z)


def test_bottleneck_and_sigmoid_options():
    sm = build_split_model(ModelConfig(name="vgg11_bn", cut="conv2", width=0.25, bottleneck_channels=8, sigmoid=True),
                           10, (3, 32, 32))
    assert sm.feature_shape == (8, 8, 8) and sm.cut_name == "conv2"
    with torch.no_grad():
        z = sm.encoder(torch.randn(4, 3, 32, 32))
    assert z.shape == (4, 8, 8, 8) and float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    assert sm(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_resnet20_blocks_and_invalid_cuts():
    m = create_model("resnet20", 10, (3, 32, 32), width=0.25)
    assert m.block_names[0] == "stem" and m.block_names[-1] == "classifier" and len(m.block_names) == 11
    assert dict(m.block_shapes())["layer3_2"] == (16, 8, 8)
    for bad in (0, 11, "nope"):
        with pytest.raises(ConfigError, match="model.cut"):
            SplitModel(m, bad)
