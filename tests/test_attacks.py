"""The attack suite (issue 5): every attack beats the mean-aux-image baseline through a real run; rmle
inverts an identity encoder and its TV weight smooths; gan losses stay finite and adv_weight 0 is the
inverse network; attention blocks keep shapes; training-time mode never trains on test images."""
import pytest
import torch
from torch import nn

from conftest import tiny_config
from splitveil import ATTACKS, Edge, build_data, build_defenses, run_experiment
from splitveil.attacks.blocks import BLOCKS, FeatureEnhancer
from splitveil.attacks.gan import GanAttack, GanParams
from splitveil.attacks.inverse_network import InverseNetworkAttack, InverseNetworkParams
from splitveil.attacks.inverse_network_plus import InverseNetworkPlusAttack, InverseNetworkPlusParams
from splitveil.attacks.rmle import RmleAttack, RmleParams, total_variation
from splitveil.data import DataBundle, ImageSplit
from splitveil.defenses import DefenseStack
from splitveil.params import ConfigError, coerce



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops: one thread avoids the (large) synchronisation cost of two on a busy
    2-core machine; the previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ALL = ["inverse_network", "inverse_network_plus", "gan", "rmle"]
SIZES = [1, 2, 3, 4, 5, 7, 8, 15, 16, 31, 32]


def test_every_attack_is_registered_with_validated_params():
    for name in ALL:
        assert name in ATTACKS
    with pytest.raises(ConfigError, match="fit_fraction"):
        coerce(ATTACKS.get("inverse_network").Params, {"fit_fraction": 1.5})
    with pytest.raises(ConfigError, match="n_critic"):
        coerce(ATTACKS.get("gan").Params, {"n_critic": 0})
    with pytest.raises(ConfigError, match="tv_weight"):
        coerce(ATTACKS.get("rmle").Params, {"tv_weight": -1})
    with pytest.raises(ConfigError, match="nn_enrich"):
        coerce(ATTACKS.get("inverse_network_plus").Params, {"nn_enrich": "sideways"})


def test_every_attack_beats_the_mean_image_through_a_run(tmp_path, data_root):
    """An undefended shallow cut of a tiny VGG trained a few steps on MNIST: each attack's test MSE is below
    the mean-aux-image baseline, and the run is recorded as finished with the same result schema."""
    dec = {"epochs": 5, "batch_size": 16, "channels": 16, "lr": 0.003}
    attacks = {"inverse_network": dec,
               "inverse_network_plus": {**dec, "beta1": 0.9},
               "gan": {**dec, "beta1": 0.9, "n_critic": 1, "critic_channels": 8, "adv_weight": 0.001},
               "rmle": {"steps": 60, "lr": 0.1, "tv_weight": 0.01}}
    cfg = tiny_config(**{"data.test_size": 32, "attacks": attacks})
    m = run_experiment(cfg, tmp_path)
    assert m["status"] == "finished"
    base = m["baseline"]["mean_image"]["mse"]
    assert set(m["attacks"]) == set(ALL)
    for name, r in m["attacks"].items():
        assert {"mse", "psnr", "ssim", "mse_std", "fit_seconds", "n_images"} <= set(r), name
        assert r["n_images"] == 32
        assert r["mse"] < base, f"{name}: mse {r['mse']:.4f} does not beat the mean aux image {base:.4f}"
    from splitveil.experiments.store import ResultsStore
    row = ResultsStore(tmp_path / "results.sqlite").get(cfg.run_id())
    assert row["status"] == "finished"
    assert (tmp_path / cfg.run_id() / "recon.png").exists()
    assert (tmp_path / cfg.run_id() / "attack_gan.pt").exists()   # per-epoch checkpoint of the attack's training


# -- data without training, for the unit tests ---------------------------------------------------------

def synthetic_bundle(n: int = 24, size: int = 8, seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    # smooth images (upsampled noise), so that a TV prior has something to agree with
    low = torch.rand(3 * n, 1, size // 2, size // 2, generator=g)
    imgs = (torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)
    labels = torch.zeros(3 * n, dtype=torch.long)

    def part(i, pool):
        idx = torch.arange(i * n, (i + 1) * n)
        return ImageSplit(imgs[idx], labels[idx], idx, pool)

    return DataBundle("synthetic", part(0, "train"), part(1, "test"), part(2, "train"), 1, ["x"], (0.5,), (0.25,))


def plain_edge(encoder: nn.Module, defense: dict | None = None) -> Edge:
    edge = Edge(encoder, build_defenses(defense or {"name": "none"})).eval()
    for p in edge.parameters():
        p.requires_grad_(False)
    return edge


def test_rmle_recovers_the_input_through_an_identity_encoder():
    data = synthetic_bundle()
    attack = RmleAttack(RmleParams(steps=300, lr=0.05, tv_weight=0.0), show_progress=False)
    edge = Edge(nn.Identity(), DefenseStack([])).eval()
    info = attack.fit(edge, data)
    assert info["random_edge"] is False and info["noise_samples"] == 1
    x01 = data.test.images.float() / 255
    x_hat = attack.invert(data.normalize(x01))
    assert x_hat.shape == x01.shape
    assert float(((x_hat - x01) ** 2).mean()) < 1e-5
    start_mse = float(((0.5 - x01) ** 2).mean())
    assert start_mse > 1e-2   # the gray start was far from the images


def test_rmle_tv_weight_lowers_total_variation():
    torch.manual_seed(0)
    data = synthetic_bundle(size=16)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    edge = plain_edge(encoder)
    z = edge(data.to_model_input(data.test.images, "cpu"))
    tvs = {}
    for w in (0.0, 0.2):
        attack = RmleAttack(RmleParams(steps=150, lr=0.05, tv_weight=w, init="uniform"), show_progress=False)
        attack.fit(edge, data)
        tvs[w] = float(total_variation(attack.invert(z)).mean())
    assert tvs[0.2] < 0.7 * tvs[0.0], tvs


def test_rmle_is_noise_aware():
    data = synthetic_bundle()
    attack = RmleAttack(RmleParams(steps=2, noise_samples=5), show_progress=False)
    info = attack.fit(plain_edge(nn.Conv2d(1, 2, 3, padding=1), {"name": "gaussian_noise", "sigma": 0.1}), data)
    assert info == {"random_edge": True, "noise_samples": 5}


def test_total_variation_values():
    x = torch.zeros(2, 1, 4, 4)
    x[1, :, :, 2:] = 1.0          # one vertical edge: 4 of the 12 horizontal differences are 1
    assert torch.allclose(total_variation(x), torch.tensor([0.0, 4 / 12]))


def test_gan_losses_finite_and_adversarial_weight_zero_is_the_inverse_network():
    data = synthetic_bundle(n=32, size=8)
    edge = plain_edge(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU()))
    common = dict(epochs=2, batch_size=8, lr=1e-3, channels=8)
    gan = GanAttack(GanParams(**common, beta1=0.9, adv_weight=0.5, n_critic=2, critic_channels=8), show_progress=False)
    info = gan.fit(edge, data)
    for k in ("train_mse", "train_g_loss", "train_d_loss", "train_wdist", "train_g_adv"):
        assert torch.isfinite(torch.tensor(info[k])), k
    assert info["steps"] == 8

    inv = InverseNetworkAttack(InverseNetworkParams(**common), seed=3, show_progress=False)
    inv.fit(edge, data)
    gan0 = GanAttack(GanParams(**common, beta1=0.9, adv_weight=0.0, n_critic=1, critic_channels=8), seed=3,
                     show_progress=False)
    info0 = gan0.fit(edge, data)
    assert info0["train_g_loss"] == pytest.approx(info0["train_mse"])   # the objective is the MSE alone
    a, b = inv.decoder.state_dict(), gan0.decoder.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    # ... and a positive adversarial weight changes the trajectory
    assert not all(torch.allclose(a[k].float(), v.float(), atol=1e-6) for k, v in gan.decoder.state_dict().items())


def test_gan_can_start_from_the_runs_inverse_network(tmp_path):
    data = synthetic_bundle(n=16, size=8)
    edge = plain_edge(nn.Conv2d(1, 4, 3, stride=2, padding=1))
    common = dict(epochs=1, batch_size=8, channels=8)
    inv = InverseNetworkAttack(InverseNetworkParams(**common), show_progress=False, workdir=tmp_path)
    inv.fit(edge, data)
    gan = GanAttack(GanParams(**common, init_from_inverse=True, critic_channels=8, n_critic=1), show_progress=False,
                    workdir=tmp_path)
    captured = {}
    orig = GanAttack.setup_training

    def spy(self, d):
        orig(self, d)
        captured.update({k: v.clone() for k, v in self.decoder.state_dict().items()})

    GanAttack.setup_training = spy
    try:
        info = gan.fit(edge, data)
    finally:
        GanAttack.setup_training = orig
    assert info["init"] == "run's inverse_network"
    for k, v in inv.decoder.state_dict().items():
        assert torch.equal(captured[k], v), k


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_attention_blocks_preserve_shapes(name):
    torch.manual_seed(0)
    block = BLOCKS[name](8)
    for mode in (True, False):
        block.train(mode)
        for h in SIZES:
            for w in (h, SIZES[-1 - SIZES.index(h)]):   # square and non-square maps
                x = torch.randn(2, 8, h, w)
                y = block(x)
                assert y.shape == x.shape, (name, h, w)
                assert torch.isfinite(y).all()
    one = block.train()(torch.randn(1, 8, 1, 1))   # a single 1x1 map in training mode
    assert one.shape == (1, 8, 1, 1)


@pytest.mark.parametrize("feature_shape", [(4, 1, 1), (4, 3, 3), (4, 8, 8), (6, 16, 16), (10,), (17, 6)])
def test_inverse_network_plus_decoder_outputs_the_image_shape(feature_shape):
    params = InverseNetworkPlusParams(channels=8, self_attention=True, fft="concat", nn_enrich="residual",
                                      enrich_hidden=8)
    dec = InverseNetworkPlusAttack(params).build_decoder(feature_shape, (3, 32, 32))
    out = dec(torch.randn(2, *feature_shape))
    assert out.shape == (2, 3, 32, 32)
    assert float(out.detach().min()) >= 0 and float(out.detach().max()) <= 1
    kinds = {type(m).__name__ for m in dec.modules()}
    assert "MultiHeadSelfAttention" in kinds
    if feature_shape[-1] >= 8 and len(feature_shape) == 3:   # at least two stages: early and late blocks
        assert {"AttentionAsConv", "SqueezeExcitation", "LargeKernelAttention", "MultiScaleChannelAttention"} <= kinds


def test_attention_blocks_follow_weak_to_strong_and_are_switchable():
    att = InverseNetworkPlusAttack(InverseNetworkPlusParams(channels=8))
    dec = att.build_decoder((4, 4, 4), (1, 32, 32))   # stages at 4, 8, 16, 32: early 4, 8; late 16, 32
    stages = [m for m in dec[1].body if isinstance(m, nn.Sequential)]
    names = [[type(b).__name__ for b in s] for s in stages]
    assert names == [["AttentionAsConv", "SqueezeExcitation"]] * 2 + [["LargeKernelAttention", "MultiScaleChannelAttention"]] * 2
    off = InverseNetworkPlusAttack(InverseNetworkPlusParams(channels=8, attention_as_conv=False, squeeze_excitation=False,
                                                            large_kernel=False, multi_scale_channel=False,
                                                            normalize=False, nn_enrich="none"))
    plain = off.build_decoder((4, 4, 4), (1, 32, 32))
    kinds = {type(m).__name__ for m in plain.modules()}
    assert not kinds & {"AttentionAsConv", "SqueezeExcitation", "LargeKernelAttention", "MultiScaleChannelAttention"}
    assert not plain[0].active


def test_feature_enhancements_shapes_and_normalisation():
    z = torch.randn(3, 4, 5, 5) * 7 + 3
    n = FeatureEnhancer((4, 5, 5), normalize=True)(z)
    assert torch.allclose(n.flatten(1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(n.flatten(1).std(1, unbiased=False), torch.ones(3), atol=1e-3)
    assert FeatureEnhancer((4, 5, 5), fft="concat", nn_enrich="concat")(z).shape == (3, 12, 5, 5)
    assert FeatureEnhancer((4, 5, 5), fft="residual", nn_enrich="residual")(z).shape == (3, 4, 5, 5)
    assert FeatureEnhancer((10,), fft="concat")(torch.randn(2, 10)).shape == (2, 20)


def _seen_images(attack_cls, params, edge, data):
    seen = []
    orig = attack_cls.train_step

    def spy(self, z, x01):
        seen.append((x01 * 255).round().to(torch.uint8).cpu())
        return orig(self, z, x01)

    attack = attack_cls(params, show_progress=False)
    attack_cls.train_step = spy
    try:
        attack.fit(edge, data)
    finally:
        attack_cls.train_step = orig
    return attack, torch.cat(seen)


def test_training_time_mode_never_trains_on_test_images(data_root):
    from splitveil import DataConfig

    data = build_data(DataConfig(name="mnist", root=str(data_root), train_size=64, test_size=48, aux_size=40), seed=0)
    edge = plain_edge(nn.Conv2d(1, 4, 3, stride=2, padding=1))
    attack, seen = _seen_images(InverseNetworkAttack, InverseNetworkParams(epochs=1, batch_size=16, channels=8), edge, data)
    fit, ev = attack.fit_split(data), attack.eval_split(data)
    fit_keys = {(fit.pool, int(i)) for i in fit.indices}
    test_keys = {(data.test.pool, int(i)) for i in data.test.indices}
    train_keys = {(data.train.pool, int(i)) for i in data.train.indices}
    assert ev is data.test and len(fit_keys) == 40
    assert fit_keys.isdisjoint(test_keys) and fit_keys.isdisjoint(train_keys)
    # every image the decoder trained on is an aux image, none is a test image
    assert len(seen) == 40
    test_set = {bytes(t.numpy()) for t in data.test.images}
    aux_set = {bytes(t.numpy()) for t in data.aux.images}
    assert all(bytes(s.numpy()) in aux_set for s in seen)
    assert not any(bytes(s.numpy()) in test_set and bytes(s.numpy()) not in aux_set for s in seen)


def test_inference_time_mode_splits_the_test_images(data_root):
    from splitveil import DataConfig, run_attack

    data = build_data(DataConfig(name="mnist", root=str(data_root), train_size=64, test_size=48, aux_size=40), seed=0)
    edge = plain_edge(nn.Conv2d(1, 4, 3, stride=2, padding=1))
    params = InverseNetworkParams(epochs=1, batch_size=16, channels=8, mode="inference-time", fit_fraction=0.25)
    attack, seen = _seen_images(InverseNetworkAttack, params, edge, data)
    fit, ev = attack.fit_split(data), attack.eval_split(data)
    assert len(fit) == 12 and len(ev) == 36 and len(seen) == 12
    assert set(fit.indices.tolist()).isdisjoint(ev.indices.tolist())
    assert sorted(fit.indices.tolist() + ev.indices.tolist()) == sorted(data.test.indices.tolist())
    again = InverseNetworkAttack(params)
    assert torch.equal(again.fit_split(data).indices, fit.indices)      # seeded: the same split every call
    other = InverseNetworkAttack(params, seed=1)
    assert not torch.equal(other.fit_split(data).indices, fit.indices)
    result, x01, _ = run_attack(attack, edge, data, seed=0)
    assert result["n_images"] == 36 and x01.shape[0] == 36


def test_rmle_checkpoints_finished_batches(tmp_path):
    data = synthetic_bundle()
    edge = Edge(nn.Identity(), DefenseStack([])).eval()
    z = data.normalize(data.test.images.float() / 255)
    first = RmleAttack(RmleParams(steps=20, batch_size=10), show_progress=False, workdir=tmp_path)
    first.fit(edge, data)
    x1 = first.invert(z)
    assert (tmp_path / "attack_rmle.pt").exists()
    again = RmleAttack(RmleParams(steps=20, batch_size=10), show_progress=False, workdir=tmp_path)
    again.fit(edge, data)
    calls = []
    again._optimise = lambda zb: calls.append(zb) or zb   # must not be called: every batch is restored
    assert torch.equal(again.invert(z), x1) and calls == []
