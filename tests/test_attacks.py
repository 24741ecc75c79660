"""The attack suite (issue 5): every attack beats the mean-aux-image baseline through a real run; rmle
inverts an identity encoder and its TV weight smooths; gan losses stay finite and adv_weight 0 is the
inverse network; attention blocks keep shapes; training-time mode never trains on test images."""
import os

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
    dec = {"epochs": 5, "batch_size": 16, "channels": 16, "blocks": 1, "lr": 0.003}
    attacks = {"inverse_network": dec,
               "inverse_network_plus": dec,
               "gan": {**dec, "epochs": 2, "beta1": 0.9, "n_critic": 1, "critic_channels": 8, "adv_weight": 0.001},
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
    assert m["attacks"]["gan"]["fit.init"] == "run's inverse_network"   # warm start from the run's decoder
    wc = m["worst_case"]
    assert wc["mse"]["value"] == min(r["mse"] for r in m["attacks"].values()) and wc["beats_baseline"]
    assert m["weak_attack"] is False and wc["weak_attacks"] == []


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
    assert info["random_edge"] is False and info["noise_samples"] == 1 and info["likelihood"] == "exact"
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
    for w in (0.0, 100.0):   # the residual is in units of tolerance * mean(z^2): weights are ~1/tolerance larger
        attack = RmleAttack(RmleParams(steps=150, lr=0.05, tv_weight=w, init="uniform"), show_progress=False)
        attack.fit(edge, data)
        tvs[w] = float(total_variation(attack.invert(z)).mean())
    assert tvs[100.0] < 0.7 * tvs[0.0], tvs


def test_rmle_is_noise_aware():
    data = synthetic_bundle()
    edge = plain_edge(nn.Conv2d(1, 2, 3, padding=1), {"name": "gaussian_noise", "sigma": 0.1})
    info = RmleAttack(RmleParams(steps=2, noise_samples=5), show_progress=False).fit(edge, data)
    assert info["random_edge"] and info["likelihood"] == "exact" and info["noise_variance"] == pytest.approx(0.01)
    assert info["noise_samples"] == 1          # the exact Gaussian likelihood needs no draws
    mc = RmleAttack(RmleParams(steps=2, noise_samples=5, likelihood="monte_carlo"), show_progress=False).fit(edge, data)
    assert mc["noise_samples"] == 5
    # noise after dropout hides which zeros are dropped: Monte Carlo over the edge's draws
    after = plain_edge(nn.Identity(), {"name": ["dropout", "gaussian_noise"], "rate": 0.5, "sigma": 0.1})
    assert RmleAttack(RmleParams(steps=2), show_progress=False).fit(after, data)["likelihood"] == "monte_carlo"


def test_rmle_under_dropout_uses_the_mask():
    """Identity encoder, dropout 0.5: the mask-aware likelihood recovers the image (MSE < 0.01); averaging the
    feature loss over fresh dropout draws (which pins dropped coordinates to zero) does not."""
    data = synthetic_bundle()
    edge = plain_edge(nn.Identity(), {"name": "dropout", "rate": 0.5})
    x01 = data.test.images.float() / 255
    torch.manual_seed(0)
    z = edge(data.normalize(x01))
    mses = {}
    for lik in ("auto", "monte_carlo"):
        attack = RmleAttack(RmleParams(steps=300, likelihood=lik, select_images=24), show_progress=False)
        info = attack.fit(edge, data)
        mses[lik] = float(((attack.invert(z) - x01) ** 2).mean())
        assert info["likelihood"] == ("exact" if lik == "auto" else "monte_carlo")
    assert mses["auto"] < 0.01 < mses["monte_carlo"], mses


def test_rmle_tv_weight_is_chosen_by_the_feature_residual():
    """The discrepancy principle: the largest grid weight whose mean residual is <= 1, never the test images."""
    data = synthetic_bundle(size=16)
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1))
    edge = plain_edge(enc, {"name": "gaussian_noise", "sigma": 0.3})
    z = edge(data.to_model_input(data.test.images, "cpu"))
    attack = RmleAttack(RmleParams(steps=100, tv_grid=[0.01, 1.0, 100.0], select_images=8), show_progress=False)
    attack.fit(edge, data)
    attack.invert(z[:8])
    sel = {float(k): v for k, v in attack.report()["tv_selection"].items()}
    assert set(sel) == {0.01, 1.0, 100.0}
    ok = [w for w, r in sel.items() if r <= 1.0]
    assert attack.report()["tv_weight"] == (max(ok) if ok else min(sel, key=sel.get))
    assert sel[100.0] > sel[0.01]          # a heavier prior leaves a larger feature residual


def test_total_variation_values():
    x = torch.zeros(2, 1, 4, 4)
    x[1, :, :, 2:] = 1.0          # one vertical edge: 4 of the 12 horizontal differences are 1
    assert torch.allclose(total_variation(x), torch.tensor([0.0, 4 / 12]))


def test_gan_losses_finite_and_adversarial_weight_zero_is_the_inverse_network():
    data = synthetic_bundle(n=32, size=8)
    edge = plain_edge(nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU()))
    common = dict(epochs=2, batch_size=8, lr=1e-3, channels=8, blocks=1, val_fraction=0.0)
    gan = GanAttack(GanParams(**common, beta1=0.9, adv_weight=0.5, n_critic=2, critic_channels=8, init_from_inverse=False),
                    show_progress=False)
    batches = []
    orig = GanAttack.critic_step
    GanAttack.critic_step = lambda self: (batches.append(id(self._stream)), orig(self))[1]
    try:
        info = gan.fit(edge, data)
    finally:
        GanAttack.critic_step = orig
    assert len(batches) == 2 * 8
    for k in ("train_mse", "train_g_loss", "train_d_loss", "train_wdist", "train_g_adv"):
        assert torch.isfinite(torch.tensor(info[k])), k
    assert info["steps"] == 8

    inv = InverseNetworkAttack(InverseNetworkParams(**common), seed=3, show_progress=False)
    inv.fit(edge, data)
    gan0 = GanAttack(GanParams(**common, beta1=0.9, adv_weight=0.0, n_critic=1, critic_channels=8, init_from_inverse=False),
                     seed=3, show_progress=False)
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
    common = dict(epochs=2, batch_size=8, channels=8, blocks=1)
    inv = InverseNetworkAttack(InverseNetworkParams(**common), show_progress=False, workdir=tmp_path)
    inv_info = inv.fit(edge, data)
    gan = GanAttack(GanParams(**common, init_from_inverse=True, critic_channels=8, n_critic=1), show_progress=False,
                    workdir=tmp_path)
    captured = {}
    orig = GanAttack.setup_training

    def spy(self, d, total):
        orig(self, d, total)
        captured.update({k: v.clone() for k, v in self.decoder.state_dict().items()})

    GanAttack.setup_training = spy
    try:
        info = gan.fit(edge, data)
    finally:
        GanAttack.setup_training = orig
    assert info["init"] == "run's inverse_network"
    for k, v in inv.decoder.state_dict().items():   # the inverse network's selected (best held-out) epoch
        assert torch.equal(captured[k], v), k
    assert info["val_mse"] <= inv_info["val_mse"] + 1e-7   # the warm start competes: fine-tuning never ends worse


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


def test_wgan_gp_penalty_equals_its_closed_form_for_a_linear_critic():
    """D(x) = w.x + b has gradient w everywhere: the penalty is (||w|| - 1)^2 whatever the images."""
    from splitveil.attacks.gan import gradient_penalty
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1))
    with torch.no_grad():
        critic[1].weight.mul_(7.0)
    w = critic[1].weight.detach()
    real, fake = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8)
    expected = (w.norm() - 1) ** 2
    assert float(gradient_penalty(critic, real, fake).detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 1.0


def test_feature_enhancements_shapes_and_normalisation():
    z = torch.randn(3, 4, 5, 5) * 7 + 3
    n = FeatureEnhancer((4, 5, 5), normalize=True)(z)
    assert torch.allclose(n.flatten(1).mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(n.flatten(1).std(1, unbiased=False), torch.ones(3), atol=1e-3)
    assert FeatureEnhancer((4, 5, 5), fft="concat", nn_enrich="concat")(z).shape == (3, 12, 5, 5)
    assert FeatureEnhancer((4, 5, 5), fft="residual", nn_enrich="residual")(z).shape == (3, 4, 5, 5)
    assert FeatureEnhancer((10,), fft="concat")(torch.randn(2, 10)).shape == (2, 20)
    # per-channel normalisation with the attacker's statistics keeps each image's brightness
    enh = FeatureEnhancer((4, 5, 5), normalize="channel")
    aux = torch.randn(50, 4, 5, 5) * torch.tensor([1.0, 2, 3, 4]).view(1, 4, 1, 1) + 5
    enh.set_statistics(aux)
    out = enh(aux)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(out.std((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3)
    bright = enh(aux[:1] + 1.0)
    assert float((bright - out[:1]).mean()) > 0.2   # a brighter input stays brighter (per-sample would erase it)


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
    attack, seen = _seen_images(InverseNetworkAttack, InverseNetworkParams(epochs=1, batch_size=16, channels=8, blocks=1,
                                                                           val_fraction=0.0), edge, data)
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
    params = InverseNetworkParams(epochs=1, batch_size=16, channels=8, blocks=1, mode="inference-time", fit_fraction=0.25,
                                  val_fraction=0.0)
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
    first = RmleAttack(RmleParams(steps=20, batch_size=10, tv_weight=0.01), show_progress=False, workdir=tmp_path)
    first.fit(edge, data)
    x1 = first.invert(z)
    assert (tmp_path / "attack_rmle.pt").exists()
    again = RmleAttack(RmleParams(steps=20, batch_size=10, tv_weight=0.01), show_progress=False, workdir=tmp_path)
    again.fit(edge, data)
    calls = []
    again._optimise = lambda zb, *a, **k: calls.append(zb) or zb   # must not be called: every batch is restored
    assert torch.equal(again.invert(z), x1) and calls == []


# -- issue 10: strength, shared images, worst case -------------------------------------------------------

OLD_DECODER = dict(arch="plain", channels=128, weight_decay=0.0, schedule="none", select="last", val_fraction=0.0)


def _old_and_new_decoder_mse(data, epochs: int, steps: int, batch_size: int) -> dict[str, float]:
    """Test MSE of the old decoder configuration and of the new defaults, both fitted for ``steps`` steps on
    the features of one fixed 3-conv encoder (256 channels, 8x downsampled)."""
    from splitveil import run_attack
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(128, 256, 3, stride=2, padding=1), nn.ReLU())
    edge = plain_edge(enc)
    mse = {}
    for name, kw in (("old", OLD_DECODER), ("new", {})):
        attack = InverseNetworkAttack(InverseNetworkParams(epochs=epochs, max_steps=steps, batch_size=batch_size, **kw),
                                      show_progress=False)
        mse[name] = run_attack(attack, edge, data, seed=0)[0]["mse"]
    return mse


@pytest.mark.xfail(strict=True, reason="measured: on this toy problem (128 smooth 16x16 images) the new defaults do not beat "
                   "the old decoder at 200 steps (MSE 0.0163 vs 0.0147; 0.0148 without the 10% held-out split); "
                   "see docs/attacks.md. strict: this flags when it starts to hold")
def test_new_inverse_network_beats_the_old_configuration_at_equal_steps():
    """Deep-cut-like features (256 channels at 2x2): the residual decoder (width 128 = C_in / 2, AdamW + cosine,
    best held-out epoch) reconstructs held-out images better than the old 5-layer decoder (fixed 128-channel
    stem, Adam, no schedule, last epoch) after the same number of steps."""
    mse = _old_and_new_decoder_mse(synthetic_bundle(n=128, size=16), epochs=100, steps=STEPS, batch_size=16)
    assert mse["new"] < 0.97 * mse["old"], mse


STEPS = 200


@pytest.mark.skipif(os.environ.get("SPLITVEIL_LONG_TESTS") != "1",
                    reason="about 5 CPU minutes: set SPLITVEIL_LONG_TESTS=1 (not part of the CI run)")
def test_new_inverse_network_beats_the_old_configuration_on_real_digits(data_root):
    """The same comparison on real images (MNIST, 512 aux images, 256 channels at 4x4, 300 steps of batch 32):
    measured 2026-12-02 at 1 thread, old 0.00373, new 0.00304 (-18%). At 150 steps on 256 aux images and 128
    channels the new decoder is not yet ahead (0.0069 vs 0.0046): it needs its budget."""
    from splitveil import DataConfig
    data = build_data(DataConfig(name="mnist", root=str(data_root), train_size=64, test_size=200, aux_size=512), seed=0)
    mse = _old_and_new_decoder_mse(data, epochs=1000, steps=300, batch_size=32)
    assert mse["new"] < 0.9 * mse["old"], mse


def _suite_run(tmp_path, attacks):
    """A tiny run that records, per attack, the test positions it is scored on."""
    import splitveil.experiments.pipeline as run_mod  # the stages live in the pipeline
    seen = {}
    orig = run_mod.fit_and_score

    def spy(attack, edge, data, seed):
        seen[attack.name] = attack.eval_split(data).indices.tolist()
        return orig(attack, edge, data, seed)

    run_mod.fit_and_score = spy
    try:
        m = run_experiment(tiny_config(**{"data.test_size": 40, "attacks": attacks}), tmp_path)
    finally:
        run_mod.fit_and_score = orig
    return m, seen


def test_every_attack_of_a_run_is_scored_on_the_same_images(tmp_path, data_root):
    dec = {"epochs": 1, "batch_size": 32, "channels": 8, "blocks": 1}
    rmle = {"steps": 2, "tv_weight": 0.0}
    # training-time: every attack on the whole test split
    m, seen = _suite_run(tmp_path / "a", {"inverse_network": dec, "gan": {**dec, "n_critic": 1, "critic_channels": 8},
                                          "rmle": rmle})
    assert len({tuple(v) for v in seen.values()}) == 1 and len(seen["rmle"]) == 40
    assert m["baseline"]["mean_image"]["n_images"] == 40
    # inference-time: one split seeded by the run seed; training-time attacks and rmle scored on its eval part too
    inf = {**dec, "mode": "inference-time", "fit_fraction": 0.5}
    m, seen = _suite_run(tmp_path / "b", {"inverse_network": inf, "gan": {**inf, "n_critic": 1, "critic_channels": 8},
                                          "inverse_network_plus": dec, "rmle": rmle})
    sets = {tuple(v) for v in seen.values()}
    assert len(sets) == 1 and len(seen["rmle"]) == 20, seen
    assert all(r["n_images"] == 20 for r in m["attacks"].values()) and m["baseline"]["mean_image"]["n_images"] == 20
    from splitveil import DataConfig
    from splitveil.attacks.base import inference_split
    data = build_data(DataConfig(name="mnist", root=str(data_root), train_size=512, test_size=40, aux_size=256), seed=0)
    assert seen["rmle"] == data.test.indices[inference_split(40, 0.5, 0)[1]].tolist()   # seeded by the run seed (0)
    with pytest.raises(ConfigError, match="fit_fraction"):
        _suite_run(tmp_path / "c", {"inverse_network": inf, "gan": {**inf, "fit_fraction": 0.9}})


def test_worst_case_picks_the_best_reconstruction_and_flags_weak_attacks(tmp_path, data_root):
    from splitveil.attacks.base import worst_case
    attacks = {"a": {"mse": 0.02, "psnr": 17.0, "ssim": 0.5}, "b": {"mse": 0.01, "psnr": 16.0, "ssim": 0.6},
               "c": {"mse": 0.05, "psnr": 20.0, "ssim": 0.4}}
    wc = worst_case(attacks, {"mse": 0.04})
    assert wc["mse"] == {"attack": "b", "value": 0.01}
    assert wc["psnr"] == {"attack": "c", "value": 20.0} and wc["ssim"] == {"attack": "b", "value": 0.6}
    assert wc["weak_attacks"] == ["c"] and wc["beats_baseline"] is True
    none_beat = worst_case(attacks, {"mse": 0.005})
    assert none_beat["beats_baseline"] is False and set(none_beat["weak_attacks"]) == {"a", "b", "c"}
    # through a run: an rMLE of one step from a gray start cannot beat the mean image; the run carries the flag
    m, _ = _suite_run(tmp_path, {"rmle": {"steps": 1, "lr": 1e-4, "tv_weight": 0.0}})
    assert m["weak_attack"] is True and m["worst_case"]["weak_attacks"] == ["rmle"]
    assert m["worst_case"]["mse"]["attack"] == "rmle" and m["worst_case"]["beats_baseline"] is False
    assert any("weak attack" in w and "rmle" in w for w in m["warnings"])


# -- precision (issue 12) and the IR decoder option --------------------------------------------------------

def test_decoder_attacks_fit_in_fp32_and_bf16_with_close_mse():
    """fp32 and bf16 autocast (channels-last) fits of the same tiny problem both run, record their precision and
    give finite, close held-out-free test MSE; the GAN's critic and gradient penalty run under bf16 too."""
    from splitveil import run_attack
    data = synthetic_bundle(n=48, size=8)
    torch.manual_seed(0)
    edge = plain_edge(nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU()))
    common = dict(epochs=6, batch_size=16, channels=16, blocks=1, lr=3e-3, val_fraction=0.0)
    mse = {}
    for prec, cl in (("fp32", False), ("bf16", True)):
        res = run_attack(InverseNetworkAttack(InverseNetworkParams(**common, precision=prec, channels_last=cl),
                                              show_progress=False), edge, data, seed=0)[0]
        assert res["fit.precision"] == prec and res["fit.channels_last"] is cl
        assert torch.isfinite(torch.tensor(res["mse"])) and torch.isfinite(torch.tensor(res["fit.train_mse"]))
        mse[prec] = res["mse"]
    base = ((data.test.images.float() / 255 - data.aux.images.float().mean(0) / 255) ** 2).mean().item()
    assert mse["fp32"] < 0.8 * base                            # both learned something ...
    assert abs(mse["bf16"] - mse["fp32"]) < 0.1 * mse["fp32"], mse   # ... and the same thing, up to rounding
    gan = GanAttack(GanParams(**{**common, "epochs": 1}, precision="bf16", n_critic=1, critic_channels=8,
                              init_from_inverse=False), show_progress=False)
    info = gan.fit(edge, data)
    assert info["precision"] == "bf16"
    for k in ("train_mse", "train_d_loss", "train_gp"):
        assert torch.isfinite(torch.tensor(info[k])), k
    with pytest.raises(ConfigError, match="precision"):
        coerce(InverseNetworkParams, {"precision": "fp8"})


def test_ir_decoder_is_a_decoder_option():
    from splitveil import run_attack
    from splitveil.models.ir_decoder import IRInversionDecoder
    data = synthetic_bundle(n=32, size=8)
    torch.manual_seed(0)
    edge = plain_edge(nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU()))
    attack = InverseNetworkAttack(InverseNetworkParams(arch="ir", channels=16, ir_units=1, epochs=2, batch_size=16,
                                                       val_fraction=0.0), show_progress=False)
    res = run_attack(attack, edge, data, seed=0)[0]
    assert isinstance(attack.decoder, IRInversionDecoder) and attack.decoder.body[0].residual[1].out_channels == 16
    assert torch.isfinite(torch.tensor(res["mse"]))
    gan = GanAttack(GanParams(arch="ir", channels=16, ir_units=1, epochs=1, batch_size=16, n_critic=1, critic_channels=8,
                              init_from_inverse=False, val_fraction=0.0), show_progress=False)
    gan.fit(edge, data)
    assert isinstance(gan.decoder, IRInversionDecoder)
    with pytest.raises(ConfigError, match="arch"):
        coerce(InverseNetworkPlusParams, {"arch": "ir"})
    with pytest.raises(ConfigError, match="arch"):
        coerce(InverseNetworkParams, {"arch": "unet"})


def test_rmle_pyramid_levels_and_start():
    """The pyramid runs from the full size down to 2 pixels on the shorter side; ``levels`` caps it; ``pixels``
    optimises the image itself; every reconstruction lies in [0, 1]."""
    def levels(size, **kw):
        data = synthetic_bundle(n=4, size=size)
        a = RmleAttack(RmleParams(steps=1, tv_weight=0.0, **kw), show_progress=False)
        a.fit(plain_edge(nn.Identity()), data)
        return a._levels()
    assert levels(32) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert levels(28) == [(28, 28), (14, 14), (7, 7), (3, 3)]
    assert levels(32, levels=2) == [(32, 32), (16, 16)]
    assert levels(32, parameterization="pixels") == [(32, 32)]
    data = synthetic_bundle(size=16)
    edge = plain_edge(nn.Conv2d(1, 2, 3, stride=4, padding=1))
    z = edge(data.to_model_input(data.test.images, "cpu"))
    a = RmleAttack(RmleParams(steps=30, lr=0.5, tv_weight=0.0), show_progress=False)
    a.fit(edge, data)
    x = a.invert(z)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(a.residual(x, z).mean()) < float(a.residual(torch.full_like(x, 0.5), z).mean())


@pytest.mark.parametrize("defense", [{"name": "gaussian_noise", "sigma": 0.3}, {"name": "dropout", "rate": 0.3}])
def test_encoded_once_fit_is_the_per_batch_fit(defense, monkeypatch):
    """The attacker's encoder pass is computed once (EncodedSplit) and only the defense's randomness is drawn per
    batch: the fit gives the same held-out curve as running the edge on every batch, and the defense really
    draws fresh noise each epoch (a cache of *transmitted* features would give a different curve)."""
    from splitveil.attacks import inverse_network as inv_mod

    data = synthetic_bundle(n=48, size=8)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU())
    common = dict(epochs=3, batch_size=8, lr=3e-3, channels=8, blocks=1, val_fraction=0.25)

    def fit():
        torch.manual_seed(0)
        return InverseNetworkAttack(InverseNetworkParams(**common), seed=1, show_progress=False).fit(
            plain_edge(encoder, defense), data)

    calls = []
    real_build = inv_mod.EncodedSplit.build
    monkeypatch.setattr(inv_mod.EncodedSplit, "build", classmethod(
        lambda cls, *a, **k: calls.append(1) or real_build.__func__(cls, *a, **k)))
    cached = fit()
    assert calls == [1]
    monkeypatch.setattr(inv_mod.EncodedSplit, "build", classmethod(lambda cls, *a, **k: None))
    per_batch = fit()
    assert cached["val_curve"] == pytest.approx(per_batch["val_curve"], rel=1e-5, abs=1e-7)
    assert cached["train_mse"] == pytest.approx(per_batch["train_mse"], rel=1e-5)

    # a cache that froze one noise draw for every epoch would not match
    frozen = {}

    def frozen_transform(self, z, training=False):
        key = z.shape
        if key not in frozen:
            frozen[key] = torch.randn_like(z) * 0.3
        return z + frozen[key]
    monkeypatch.setattr(inv_mod.EncodedSplit, "build", classmethod(lambda cls, *a, **k: real_build.__func__(cls, *a, **k)))
    monkeypatch.setattr(DefenseStack, "transform", frozen_transform)
    assert fit()["val_curve"] != pytest.approx(per_batch["val_curve"], rel=1e-3)
