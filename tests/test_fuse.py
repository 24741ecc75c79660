"""The inference copy used by the CEM-GMM refit (models/fuse.py): same features as the eval-mode encoder, BN
folded, ReLU after max-pool, nothing swapped that does not commute, the original untouched."""
import pytest
import torch
from torch import nn

from splitveil.data.base import DataBundle, ImageSplit
from splitveil.defenses import build_defenses
from splitveil.models import ModelConfig, build_split_model
from splitveil.models.fuse import fold_conv_bn, inference_copy


def _randomise_bn(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("name,cut", [("vgg11_bn", "conv2"), ("vgg11_bn", "conv4"), ("resnet20", "layer1_2")])
def test_copy_gives_the_eval_features(name, cut):
    torch.manual_seed(0)
    enc = build_split_model(ModelConfig(name=name, cut=cut, width=0.25), 10, (3, 32, 32)).encoder
    _randomise_bn(enc)
    enc.train()
    x = torch.randn(6, 3, 32, 32)
    fused, counts = inference_copy(enc)
    assert enc.training, "the original keeps its mode"
    enc.eval()
    with torch.no_grad():
        ref = enc(x)
        got = fused(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in fused.parameters())
    assert any(p.requires_grad for p in enc.parameters())
    if name.startswith("vgg"):
        n_blocks = int(cut[4:])
        n_pools = sum(isinstance(m, nn.MaxPool2d) for m in enc.modules())     # VGG11: no pool after conv3
        assert n_pools >= 2
        assert counts == {"conv_bn_folded": n_blocks, "relu_pool_swapped": n_pools}
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert sum(isinstance(m, nn.BatchNorm2d) for m in enc.modules()) == n_blocks     # original untouched
        block = list(fused.children())[0]
        kinds = [type(m) for m in block]
        assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.ReLU]


def test_fold_matches_conv_then_bn_without_bias():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(5)
    _randomise_bn(bn, seed=3)
    bn.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_only_commuting_layers_are_swapped():
    """ReLU does not commute with average pooling (nor a max-pool that returns indices): those stay in order."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, padding=1))
    fused, counts = inference_copy(net)
    assert counts == {"conv_bn_folded": 0, "relu_pool_swapped": 1}
    assert [type(m) for m in fused] == [nn.Conv2d, nn.ReLU, nn.AvgPool2d, nn.Conv2d, nn.MaxPool2d, nn.ReLU]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net.eval()(x))


def test_layers_with_hooks_are_left_alone():
    """A hooked layer may change what it computes (torch.nn.utils.prune recomputes a conv's weight in a forward
    pre-hook, which would undo a fold): a hooked conv keeps its BN, a hooked ReLU keeps its place."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    _randomise_bn(net)
    net[0].register_forward_pre_hook(lambda m, inp: None)
    net[5].register_forward_hook(lambda m, inp, out: out * 2)
    fused, counts = inference_copy(net)
    assert counts == {"conv_bn_folded": 0, "relu_pool_swapped": 1}
    assert [type(m) for m in fused] == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU, nn.Conv2d, nn.ReLU,
                                        nn.MaxPool2d]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_cem_gmm_refit_uses_the_eval_features():
    """The refit's mixture equals a k-means on the plain eval-mode encoder's features (same generator)."""
    torch.manual_seed(0)
    model = build_split_model(ModelConfig(name="vgg11_bn", cut="conv2", width=0.25, bottleneck_channels=8,
                                          bottleneck_norm=False, bottleneck_act="none", sigmoid=True), 4, (3, 32, 32))
    _randomise_bn(model.encoder)
    g = torch.Generator().manual_seed(0)
    n = 80
    split = ImageSplit(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                       torch.arange(n) % 4, torch.arange(n), "train")
    data = DataBundle("synthetic", split, split, split, 4, list("abcd"), (0.5,) * 3, (0.25,) * 3)
    dims = 8 * 8 * 8
    a = build_defenses({"name": "cem_gmm", "noise": True, "k": 3}).get("cem_gmm")
    b = build_defenses({"name": "cem_gmm", "noise": True, "k": 3}).get("cem_gmm")
    for d in (a, b):
        d.allocate(4, dims)
        d.seed = 0
    model.encoder.train()
    a.refit(model, data, "cpu", epoch=1)
    assert model.encoder.training
    model.encoder.eval()
    with torch.no_grad():
        z = torch.cat([model.encoder(x).flatten(1) for x, _ in data.batches(split, 256, "cpu")])
    b.fit_features(z, split.labels, torch.Generator().manual_seed(1_000_003 * 0 + 7919 * 1 + 11))
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.mix_vars, b.mix_vars, rtol=1e-3, atol=1e-7)
