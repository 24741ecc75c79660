"""The baseline defenses (issue 3): dropout, nopeek, label_smoothing, patrol, noise_arl, topk_prune, the
bottleneck model option, and their composition. Each test checks what the defense claims, with values."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_config
from splitveil import (DataConfig, Edge, ModelConfig, TrainConfig, Trainer, build_data, build_defenses,
                       build_split_model)
from splitveil.attacks.base import transmitted
from splitveil.defenses.label_smoothing import smooth_targets
from splitveil.defenses.nopeek import distance_correlation
from splitveil.defenses.topk_prune import topk_mask
from splitveil.params import ConfigError


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits", train_size=768, test_size=256, aux_size=256), seed=0)


def make(data, spec, width=0.125, cut=2, bottleneck=None, epochs=1, seed=0, lr=3e-3, ckpt=None):
    torch.manual_seed(seed)
    model = build_split_model(ModelConfig(name="vgg11_bn", cut=cut, width=width, bottleneck_channels=bottleneck),
                              data.num_classes, data.image_shape)
    defenses = build_defenses(spec)
    defenses.setup(model, data, torch.device("cpu"))
    trainer = Trainer(model, defenses, data, TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=lr,
                                                         weight_decay=0.0), torch.device("cpu"), seed=seed,
                      ckpt_path=ckpt, show_progress=False)
    return model, defenses, trainer


class PositiveEncoder(nn.Module):
    """Features that are never zero by themselves: every zero seen downstream was made by the defense."""

    def forward(self, x):
        return x.abs() + 1.0


# -- dropout ------------------------------------------------------------------------------------------------
def test_dropout_zeroes_at_the_rate_at_inference_and_the_attacker_sees_it(digits):
    stack = build_defenses({"name": "dropout", "rate": 0.3})
    stack.eval()
    z = torch.rand(64, 16, 8, 8) + 1.0
    out = stack.transform(z, training=False)
    zero = (out == 0).float().mean().item()
    assert abs(zero - 0.3) < 0.01                       # 65,536 values: 4 standard errors is ~0.007
    kept = out != 0
    assert torch.allclose(out[kept], z[kept] / 0.7)     # inverted dropout, same scale at training and inference
    out2 = stack.transform(z, training=False)
    assert not torch.equal(out == 0, out2 == 0)         # fresh mask every call
    no_scale = build_defenses({"name": "dropout", "rate": 0.5, "rescale": False}).transform(z, False)
    assert torch.equal(no_scale[no_scale != 0], z[no_scale != 0])
    # the deployed edge (eval mode) sends dropped features: that is what an attacker is given
    edge = Edge(PositiveEncoder(), stack).eval()
    z_att, _ = transmitted(edge, digits, digits.aux, torch.device("cpu"), seed=0)
    assert abs((z_att == 0).float().mean().item() - 0.3) < 0.02
    with pytest.raises(ConfigError, match="rate"):
        build_defenses({"name": "dropout", "rate": 1.0})


# -- nopeek ---------------------------------------------------------------------------------------------------
def dcor_reference(x, z):
    """Distance correlation written out pair by pair (float64): the textbook definition."""
    x = x.reshape(len(x), -1).double()
    z = z.reshape(len(z), -1).double()
    n = len(x)

    def centred(v):
        d = [[math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(v[i], v[j]))) for j in range(n)] for i in range(n)]
        row = [sum(r) / n for r in d]
        tot = sum(row) / n
        return [[d[i][j] - row[i] - row[j] + tot for j in range(n)] for i in range(n)]

    A, B = centred(x), centred(z)
    cov = lambda P, Q: sum(P[i][j] * Q[i][j] for i in range(n) for j in range(n)) / n ** 2  # noqa: E731
    return math.sqrt(cov(A, B) / math.sqrt(cov(A, A) * cov(B, B)))


def test_nopeek_distance_correlation_matches_reference_and_limits():
    g = torch.Generator().manual_seed(0)
    for n in (5, 9):
        x = torch.randn(n, 2, 3, 3, generator=g)
        z = torch.tanh(x.flatten(1)[:, :7] * 2) + 0.3 * torch.randn(n, 7, generator=g)
        assert abs(float(distance_correlation(x, z)) - dcor_reference(x, z)) < 1e-5
        assert abs(float(distance_correlation(x.double(), z.double())) - dcor_reference(x, z)) < 1e-10
    # 1 for z = a Q x + b (any scale a != 0, orthogonal Q, shift b)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert abs(float(distance_correlation(x, -3.0 * x @ q + 5.0)) - 1.0) < 1e-9
    # 0 when one side is constant (no information at all), and finite
    assert float(distance_correlation(x, torch.ones(64, 4, dtype=torch.float64))) == 0.0
    # independent samples: shrinks towards 0 as n grows
    small = [float(distance_correlation(torch.randn(32, 1, generator=g), torch.randn(32, 1, generator=g))) for _ in range(5)]
    big = float(distance_correlation(torch.randn(3000, 1, generator=g), torch.randn(3000, 1, generator=g)))
    assert big < 0.08 and big < sum(small) / len(small)
    # differentiable without NaNs (zero distances on the diagonal)
    zz = torch.randn(16, 5, requires_grad=True)
    distance_correlation(torch.randn(16, 3, 4, 4), zz).backward()
    assert torch.isfinite(zz.grad).all() and zz.grad.abs().sum() > 0


def test_nopeek_training_lowers_dcor(digits):
    def dcor_after(spec):
        model, defenses, trainer = make(digits, spec, epochs=1, lr=1e-2)
        trainer.fit()
        model.eval()
        x, _ = next(digits.batches(digits.test, 256, "cpu"))
        with torch.no_grad():
            return float(distance_correlation(x, defenses.transform(model.encoder(x), False))), trainer

    plain, _ = dcor_after({"name": "none"})
    defended, tr = dcor_after({"name": "nopeek", "alpha": 20.0})
    assert defended < plain - 0.05, (defended, plain)
    assert "loss.dcor" not in tr.history[0] and "loss.nopeek.dcor" in tr.history[0]


# -- label smoothing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.1, -0.05, 0.1, 0.5])
def test_label_smoothing_targets_follow_the_formula(alpha):
    y = torch.tensor([0, 3, 9, 3])
    stack = build_defenses({"name": "label_smoothing", "alpha": alpha})
    t = stack.targets(y, 10)
    assert torch.allclose(t.sum(1), torch.ones(4), atol=1e-6)
    for i, c in enumerate(y.tolist()):
        assert t[i, c].item() == pytest.approx(1 - alpha + alpha / 10)
        others = torch.cat([t[i, :c], t[i, c + 1:]])
        assert torch.allclose(others, torch.full((9,), alpha / 10))
    if alpha < 0:
        assert (t.max(1).values > 1).all() and (t.min(1).values < 0).all()   # LS- sharpens beyond one-hot
    assert torch.equal(t, smooth_targets(y, 10, alpha))


def test_label_smoothing_loss_and_alpha_zero_is_plain_cross_entropy(digits):
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    _, _, tr0 = make(digits, {"name": "label_smoothing", "alpha": 0.0})
    assert torch.equal(tr0.task_loss(logits, y), F.cross_entropy(logits, y))   # bit for bit
    _, _, tr = make(digits, {"name": "label_smoothing", "alpha": 0.2})
    manual = -(((0.8 * F.one_hot(y, 10) + 0.02) * F.log_softmax(logits, 1)).sum(1)).mean()
    assert torch.allclose(tr.task_loss(logits, y), manual, atol=1e-6)
    assert torch.allclose(tr.task_loss(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2), atol=1e-6)
    for bad in (-0.2, 0.6):
        with pytest.raises(ConfigError, match=r"defense.label_smoothing: alpha: must be in \[-0.1, 0.5\]"):
            build_defenses({"name": "label_smoothing", "alpha": bad})


# -- top-k pruning ------------------------------------------------------------------------------------------
def test_topk_prune_zeroes_the_smallest_fraction_of_each_map():
    z = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    out = build_defenses({"name": "topk_prune", "fraction": 0.4}).transform(z, training=False)
    per_map = (out == 0).flatten(2).sum(2)
    assert (per_map == 10).all()                         # floor(0.4 * 25) in every map of every image
    for i in range(4):
        for c in range(3):
            kept, dropped = z[i, c][out[i, c] != 0].abs(), z[i, c][out[i, c] == 0].abs()
            assert kept.min() >= dropped.max()          # the zeroed ones are the smallest in magnitude
    assert torch.equal(out[out != 0], z[out != 0])
    m = topk_mask(z, 0.5, per="sample")
    assert (m.flatten(1).sum(1) == 75 - 37).all()
    z.requires_grad_(True)
    build_defenses({"name": "topk_prune", "fraction": 0.4}).transform(z, True).sum().backward()
    assert torch.equal(z.grad, (out != 0).float())     # gradient flows through the kept values only


# -- patrol ---------------------------------------------------------------------------------------------------
def test_patrol_prunes_channels_and_flops_and_checkpoint_loads_back(digits, tmp_path):
    ckpt = tmp_path / "ck.pt"
    spec = {"name": ["gaussian_noise", "patrol"], "sigma": 0.05, "patrol": {"amount": 0.5, "prune_epoch": 1}}
    model, defenses, trainer = make(digits, spec, bottleneck=4, epochs=2, ckpt=ckpt)
    shape_before = model.feature_shape
    trainer.fit()
    info = defenses.info()["patrol"]
    assert info["pruned"] and info["pruned_at_epoch"] == 1
    assert info["channels_before"] == [8, 16] and info["channels_after"] == [4, 8]
    assert info["total_channels_after"] < info["total_channels_before"]
    assert info["encoder_flops_after"] < 0.6 * info["encoder_flops_before"]
    assert info["encoder_params_after"] < info["encoder_params_before"]
    conv1 = model.encoder.conv1[0]
    assert conv1.out_channels == 4 and model.encoder.conv2[0].in_channels == 4
    assert model.encoder.conv1[1].num_features == 4
    # the split still works: same transmitted shape, the pipeline classifies well above chance
    assert model.feature_shape == shape_before
    assert trainer.evaluate("test") > 0.15                # chance is 0.1
    # the pruned structure is in the optimizer (the model trained after pruning)
    opt_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(conv1.weight) in opt_ids
    # a fresh (unpruned) model + defense loads the checkpoint (weights_only=True inside Trainer.load)
    model2, defenses2, trainer2 = make(digits, spec, bottleneck=4, epochs=2, ckpt=ckpt)
    assert model2.encoder.conv1[0].out_channels == 8
    trainer2.load(ckpt)
    assert model2.encoder.conv1[0].out_channels == 4 and trainer2.epoch == 2
    model.eval(), model2.eval()
    x, _ = next(digits.batches(digits.test, 32, "cpu"))
    with torch.no_grad():
        assert torch.allclose(model(x), model2(x), atol=1e-6)
    assert defenses2.info()["patrol"]["channels_after"] == [4, 8]
    torch.load(ckpt, weights_only=True)   # plain tensors and numbers only


def test_patrol_prune_output_shrinks_the_transmitted_channels(digits):
    model, defenses, trainer = make(digits, {"name": "patrol", "amount": 0.5, "prune_epoch": 1,
                                             "prune_output": True}, bottleneck=8, epochs=2)
    trainer.fit()
    info = defenses.info()["patrol"]
    assert info["channels_before"] == [8, 16, 8] and info["channels_after"] == [4, 8, 4]
    assert model.feature_shape[0] == 4 and model.decoder.bottleneck_up.body[0].in_channels == 4
    assert 0.0 <= trainer.evaluate("test") <= 1.0


def test_patrol_rejects_what_it_cannot_prune(digits):
    with pytest.raises(ConfigError, match="not a plain conv"):
        torch.manual_seed(0)
        model = build_split_model(ModelConfig(name="resnet20", cut=2, width=0.25), 10, digits.image_shape)
        build_defenses({"name": "patrol"}).setup(model, digits, torch.device("cpu"))
    with pytest.raises(ConfigError, match="prune_epoch"):
        build_defenses({"name": "patrol", "prune_epoch": 0})
    _, single, _ = make(digits, {"name": "patrol"}, cut=1)   # the only conv is the transmitted one: nothing to prune
    info = single.info()["patrol"]
    assert info["layers"] == [] and not info["pruned"] and "nothing to prune" in info["note"]
    _, _, trainer = make(digits, {"name": "patrol", "prune_epoch": 3}, epochs=2)
    with pytest.raises(ConfigError, match="prune_epoch: 3 is not below train.epochs"):
        trainer.fit()


# -- noise_arl ------------------------------------------------------------------------------------------------
def test_noise_arl_raises_the_simulated_decoders_error(digits):
    common = {"pretrain_epochs": 0, "channels": 16, "decoder_steps": 1}

    def curve(weight):
        _, defenses, trainer = make(digits, {"name": ["gaussian_noise", "noise_arl"], "sigma": 0.05,
                                             "noise_arl": {**common, "weight": weight}}, epochs=2)
        trainer.fit()
        decoder = defenses.get("noise_arl").decoder
        assert not {id(p) for p in decoder.parameters()} & {id(p) for p in trainer.parameters()}
        return defenses.get("noise_arl").decoder_mse, trainer.history

    without, _ = curve(0.0)      # the same decoder and schedule, no privacy term
    with_arl, hist = curve(5.0)
    assert len(with_arl) == len(without) == 2
    assert without[1] < 0.5 * without[0]               # undefended: the decoder learns to invert
    assert with_arl[0] > without[0] and with_arl[1] > 1.2 * without[1], (with_arl, without)
    assert hist[-1]["loss.noise_arl.adv"] > 0          # the decoder's PSNR in bels, minimised by the encoder


def test_noise_arl_schedule_and_checkpoint(digits, tmp_path):
    ckpt = tmp_path / "ck.pt"
    spec = {"name": "noise_arl", "pretrain_epochs": 1, "channels": 8, "decoder_steps": 2, "objective": "ssim"}
    _, defenses, trainer = make(digits, spec, epochs=2, ckpt=ckpt)
    trainer.fit()
    assert "loss.noise_arl.adv" not in trainer.history[0] and "loss.noise_arl.adv" in trainer.history[1]
    arl = defenses.get("noise_arl")
    _, defenses2, trainer2 = make(digits, spec, epochs=2, ckpt=ckpt)
    trainer2.load(ckpt)
    arl2 = defenses2.get("noise_arl")
    assert arl2.decoder_mse == arl.decoder_mse
    s1, s2 = arl.optimizer.state_dict()["state"], arl2.optimizer.state_dict()["state"]
    assert s1[0]["step"] == s2[0]["step"] and torch.equal(s1[0]["exp_avg"], s2[0]["exp_avg"])


# -- composition ----------------------------------------------------------------------------------------------
def test_composition_and_its_errors():
    stack = build_defenses({"name": ["gaussian_noise", "noise_arl"], "sigma": 0.2, "noise_arl": {"weight": 0.5}})
    assert stack.names == ["gaussian_noise", "noise_arl"] and stack.get("noise_arl").params.weight == 0.5
    stack = build_defenses({"name": "gaussian_noise+patrol+topk_prune", "sigma": 0.1, "fraction": 0.2})
    assert stack.label == "gaussian_noise+patrol+topk_prune"
    # 'alpha' is a parameter of both nopeek and label_smoothing: flat reaches both, scoped reaches one
    stack = build_defenses({"name": ["nopeek", "label_smoothing"], "alpha": 0.1, "nopeek": {"alpha": 3.0}})
    assert stack.get("nopeek").params.alpha == 3.0 and stack.get("label_smoothing").params.alpha == 0.1
    with pytest.raises(ConfigError, match="'dropout' is listed twice"):
        build_defenses({"name": ["dropout", "gaussian_noise", "dropout"]})
    with pytest.raises(ConfigError, match="unknown field 'defense.fraction'"):
        build_defenses({"name": ["dropout"], "fraction": 0.3})
    with pytest.raises(ConfigError, match="parameters given for 'patrol', which is not in defense.name"):
        build_defenses({"name": ["dropout"], "patrol": {"amount": 0.3}})
    with pytest.raises(ConfigError, match="unknown field 'defense.patrol.amout'"):
        build_defenses({"name": ["patrol"], "patrol": {"amout": 0.3}})


# -- real data, end to end through `splitveil run` ------------------------------------------------------------
E2E = {
    "dropout": {"defense.name": "dropout", "defense.rate": 0.2},
    "nopeek": {"defense.name": "nopeek", "defense.alpha": 0.5},
    "label_smoothing": {"defense.name": "label_smoothing", "defense.alpha": -0.05},
    "patrol": {"defense.name": "[gaussian_noise, patrol]", "defense.sigma": 0.05, "defense.patrol.prune_epoch": 1,
               "train.epochs": 2},
    "noise_arl": {"defense.name": "[gaussian_noise, noise_arl]", "defense.sigma": 0.05,
                  "defense.noise_arl.pretrain_epochs": 0, "defense.noise_arl.channels": 16},
    "topk_prune": {"defense.name": "topk_prune", "defense.fraction": 0.5},
    "bottleneck": {"model.bottleneck_channels": 4},
}


@pytest.mark.parametrize("which", list(E2E))
def test_each_defense_runs_end_to_end_on_real_data(which, tmp_path, data_root):
    from splitveil.cli import main

    over = {"data.train_size": 256, "data.test_size": 64, "data.aux_size": 128, "model.cut": 2,
            "attacks.inverse_network.epochs": 1, **E2E[which]}
    argv = ["run", "--out", str(tmp_path), "--data-root", str(data_root)]
    cfg = tiny_config(**over)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.to_dict()))
    assert main(argv[:1] + [str(tmp_path / "c.yaml")] + argv[1:]) == 0
    [metrics_file] = list(tmp_path.glob("*/metrics.json"))
    m = json.loads(metrics_file.read_text())
    assert m["status"] == "finished" and 0.0 <= m["accuracy"] <= 1.0
    assert m["attacks"]["inverse_network"]["mse"] > 0 and m["cost"]["encoder_flops"] > 0
    from splitveil.experiments.store import ResultsStore
    assert ResultsStore(tmp_path / "results.sqlite").get(m["run_id"])["status"] == "finished"
    if which == "bottleneck":
        assert m["feature_shape"][0] == 4 and m["defense"] == "none"
    else:
        assert which in m["defense"].split("+")
        assert set(m["defense_info"]) == set(m["defense"].split("+"))
    if which == "patrol":
        info = m["defense_info"]["patrol"]
        assert info["pruned"] and info["encoder_flops_after"] < info["encoder_flops_before"]
        assert m["cost"]["encoder_flops"] == info["encoder_flops_after"]   # the run measured the pruned edge
    if which == "noise_arl":
        assert len(m["defense_info"]["noise_arl"]["decoder_mse_per_epoch"]) == 1
