"""GPZ analysis: probe values against direct computations, zone detection on a model with a collapsing block,
the sweep / compare / CLI on a tiny model and real data, and the CIFAR-sized ViT."""
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from torch import nn

from splitveil.models.decoder import InversionDecoder, token_grid
from splitveil.experiments.gpz import (GPZSweep, detect_zone, label_form_defense, paper_fidelity_threshold, paper_zone,
                                      parse_cuts, run_compare, with_label_form)
from splitveil.results.gpz import label_smoothing_reading, mse_fraction, mse_zone, rule_check
from splitveil.metrics import decision_entropy_bound, feature_entropy_bound, probe_values
from splitveil.metrics.probes import bootstrap_mean_radius, bootstrap_probe, intra_class_radius
from splitveil.models import BlockModel, SplitModel, create_model
from splitveil.params import ConfigError
from splitveil.report.gpz import write_compare, write_sweep


# -- probe values --------------------------------------------------------------------------------------------
def test_probe_values_match_numpy_and_formulas():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(30, 2, 3, generator=g) * torch.tensor([1.0, 2.0, 0.5]) + 3.0
    y = torch.arange(30) % 3
    pv = probe_values(z, y, num_classes=4)
    zn, yn = z.reshape(30, -1).double().numpy(), y.numpy()
    rc = {c: float(np.mean(np.sum((zn[yn == c] - zn[yn == c].mean(0)) ** 2, axis=1))) for c in range(3)}
    for c in range(3):
        assert pv["rc2_per_class"][c] == pytest.approx(rc[c], rel=1e-10)
    vals = np.array(list(rc.values()))
    assert pv["rc2_mean"] == pytest.approx(vals.mean(), rel=1e-10)
    assert pv["rc2_std"] == pytest.approx(vals.std(), rel=1e-10)
    assert pv["rc2_max"] == pytest.approx(vals.max(), rel=1e-10)
    sigma2 = float(np.var(zn, axis=0).mean())
    assert pv["d"] == 6 and pv["num_classes"] == 4
    assert pv["sigma2"] == pytest.approx(sigma2, rel=1e-10)
    assert pv["within_fraction"] == pytest.approx(vals.mean() / (6 * sigma2), rel=1e-10)
    assert pv["h_feat_bound"] == pytest.approx(6 / 2 * math.log(2 * math.pi * math.e * sigma2), rel=1e-10)
    assert pv["h_dec_bound"] == pytest.approx(6 / 2 * math.log(2 * math.pi * math.e * vals.max() / 6) + math.log(4),
                                              rel=1e-10)
    # hand-computed values of the bound functions, and the degenerate (collapsed) case
    assert feature_entropy_bound(2, 1 / (2 * math.pi * math.e)) == pytest.approx(0.0, abs=1e-12)
    assert decision_entropy_bound(4, 4 / (2 * math.pi * math.e), 10) == pytest.approx(math.log(10))
    assert feature_entropy_bound(5, 0.0) == -math.inf and decision_entropy_bound(5, 0.0, 3) == -math.inf


# -- zone detection --------------------------------------------------------------------------------------------
class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


K = 4


def collapsing_model() -> BlockModel:
    """feat1, feat2: instance-level features; collapse: each class (the image mean) -> one point; head."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1)
    blocks = [("feat1", Fn(lambda x: x * 2.0)),
              ("feat2", Fn(lambda x: torch.cat([x, torch.tanh(conv(x))], 1))),
              ("collapse", Fn(lambda x: 3.0 * nn.functional.one_hot((x[:, 0].flatten(1).mean(1) / 2).round().long().clamp(0, K - 1), K).float())),
              ("head", nn.Linear(K, K))]
    return BlockModel(blocks, (1, 4, 4))


def test_zone_detector_on_a_collapsing_block():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(200) % K
    noise = torch.randn(200, 1, 4, 4, generator=g)
    x = y.view(-1, 1, 1, 1).float() + noise - noise.mean((1, 2, 3), keepdim=True)   # image mean == class exactly
    model = collapsing_model()
    rows = []
    with torch.no_grad():
        for k in range(1, 4):
            z = model.blocks[:k](x)
            boot = bootstrap_mean_radius(z, y, 50, seed=3).tolist()
            rows.append({"cut": k, "block": model.block_names[k - 1], "rc2_boot": boot, **probe_values(z, y, K)})
    assert rows[2]["rc2_mean"] == pytest.approx(0.0, abs=1e-12)       # the class points
    assert rows[0]["rc2_mean"] > 1.0
    zone = detect_zone(rows)
    assert zone["found"] and zone["rule"] == "paper"
    assert zone["zone_cuts"] == [3] and zone["zone_blocks"] == ["collapse"] and zone["max_drop"] == pytest.approx(1.0)
    assert zone["bootstrap"]["agreement"] == 1.0 and zone["bootstrap"]["first_cut_ci95"] == [3, 3]
    assert "largest drop" in zone["method"]


def test_paper_zone_rule_and_second_zone():
    cuts = [3, 8, 25, 40, 48, 49, 50]
    # one sharp drop (48 -> 49), the rest small: a single zone cut, the first cut after the drop
    rc = [10.0, 9.5, 9.0, 8.6, 8.3, 2.0, 1.9]
    z = paper_zone(cuts, rc)
    assert z["found"] and z["zone_cuts"] == [49]
    assert z["drops"][4] == pytest.approx((8.3 - 2.0) / 8.3)
    # two large drops with a drop >= 0.2 between them: the second-zone rule adds the second cut
    rc2 = [10.0, 5.0, 3.5, 3.4, 1.0, 0.9, 0.8]     # drops 0.5, 0.3, 0.029, 0.706, ...
    z2 = paper_zone(cuts, rc2)
    assert z2["zone_cuts"] == [48, 8]
    # the same two largest drops but only small drops between them: one zone cut
    rc3 = [10.0, 5.0, 4.9, 4.8, 1.0, 0.9, 0.85]
    assert paper_zone(cuts, rc3)["zone_cuts"] == [48]
    # relative, not absolute: a large absolute but small relative drop loses to a small absolute, large relative one
    z4 = paper_zone([1, 2, 3], [1000.0, 800.0, 0.5])
    assert z4["zone_cuts"] == [3]
    z5 = paper_zone([1, 2, 3], [1000.0, 100.0, 90.0])
    assert z5["zone_cuts"] == [2]
    # no drop at all (ViT-like growth): no zone
    flat = paper_zone([1, 2, 3, 4], [1.0, 1.1, 1.2, 1.3])
    assert not flat["found"] and flat["zone_cuts"] == []


def test_zone_is_the_same_at_every_cut_and_every_second_cut():
    # a smooth feature-level decline and one representational transition into cut 10: sweeping every cut or
    # every second cut (the transition cut is swept both times) gives the same zone
    cuts = list(range(1, 17))
    rc = [100.0 * 0.97 ** k for k in cuts[:9]] + [100.0 * 0.97 ** 9 * 0.1 * 0.98 ** (k - 10) for k in cuts[9:]]
    every = paper_zone(cuts, rc)
    second = paper_zone(cuts[1::2], rc[1::2])
    assert every["zone_cuts"] == second["zone_cuts"] == [10]
    rows = [{"cut": k, "block": f"b{k}", "rc2_mean": v} for k, v in zip(cuts, rc)]
    assert detect_zone(rows)["zone_cuts"] == detect_zone(rows[1::2])["zone_cuts"] == [10]


def test_fidelity_threshold_is_per_channel_and_singletons_are_excluded():
    assert paper_fidelity_threshold(3) == pytest.approx(0.02 / 3)
    assert paper_fidelity_threshold(1) == pytest.approx(0.02)
    rows = [{"cut": k, "block": f"b{k}", "rc2_mean": r, "mse": m}
            for k, r, m in [(1, 5.0, 0.004), (2, 4.0, 0.006), (3, 1.0, 0.010), (4, 0.9, 0.05)]]
    f = detect_zone(rows, channels=3)["fidelity"]
    assert f["high_fidelity_cuts"] == [1, 2] and f["deepest_high_fidelity_cut"] == 2   # 0.010 > 0.0067
    assert detect_zone(rows, channels=1)["fidelity"]["high_fidelity_cuts"] == [1, 2, 3]
    z = torch.tensor([[0.0], [2.0], [5.0], [1.0], [1.0]])
    y = torch.tensor([0, 0, 1, 2, 2])                        # class 1 has one sample: left out, not counted as 0
    assert intra_class_radius(z, y) == {0: 1.0, 2: 0.0}
    pv = probe_values(z, y)
    assert pv["rc2_mean"] == pytest.approx(0.5) and pv["rc2_classes"] == 2 and pv["rc2_excluded"] == 1


def test_bootstrap_radius_matches_direct_resampling():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 3, 2, generator=g)
    y = torch.arange(40) % 4
    y[0] = 9                                                  # a singleton class: left out of every resample
    boot = bootstrap_mean_radius(z, y, 30, seed=5)
    from splitveil.metrics.probes import bootstrap_class_groups
    groups = bootstrap_class_groups(y, 30, 5)
    assert len(groups) == 4
    zf = z.flatten(1).double()
    for b in (0, 7, 29):   # rebuild resample b explicitly and compute R_c^2 directly
        vals = []
        for idx, counts in groups:
            rep = torch.repeat_interleave(idx, counts[b].long())
            zc = zf[rep]
            n = len(idx)
            vals.append(float(((zc - zc.mean(0)) ** 2).sum(1).mean()) * n / (n - 1))
        assert boot[b].item() == pytest.approx(sum(vals) / len(vals), rel=1e-9)
    assert torch.equal(boot, bootstrap_mean_radius(z, y, 30, seed=5))      # deterministic
    # centred on the estimate: the bias correction makes the resample mean match it closely
    many = bootstrap_mean_radius(z, y, 4000, seed=1)
    assert many.std() > 0 and abs(many.mean().item() - probe_values(z, y)["rc2_mean"]) < 0.1 * many.std().item()


# -- the scale-free probe beside R_c^2 ------------------------------------------------------------------------------
class Scaled(nn.Module):
    """A block whose output is multiplied by a constant (the next block's normalisation undoes it)."""

    def __init__(self, block, c):
        super().__init__()
        self.block, self.c = block, c

    def forward(self, x):
        return self.c * self.block(x)


def _rescale_model(scale: float | None) -> BlockModel:
    """b1..b4 similarity maps (scale, rotation), b5 a batch standardisation (as a BatchNorm does), b6 shrinks the
    instance-level dimensions (the classes contract), b7 identity; block 4 optionally wrapped with ``Scaled``."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4)))
    keep = torch.tensor([1.0] * 4 + [0.1] * 4)
    b4 = Fn(lambda x: x)
    blocks = [("b1", Fn(lambda x: x)), ("b2", Fn(lambda x: 1.5 * x)), ("b3", Fn(lambda x: x @ q)),
              ("b4", Scaled(b4, scale) if scale is not None else b4),
              ("b5", Fn(lambda x: (x - x.mean(0)) / x.std())),
              ("b6", Fn(lambda x: (x @ q.T) * keep)), ("b7", Fn(lambda x: x)), ("head", nn.Linear(8, K))]
    return BlockModel(blocks, (8,))


def _rescale_rows(scale):
    g = torch.Generator().manual_seed(2)
    y = torch.arange(240) % K
    x = torch.cat([3.0 * nn.functional.one_hot(y, K).float() + 0.3 * torch.randn(240, K, generator=g),
                   torch.randn(240, 4, generator=g)], 1)
    model, rows = _rescale_model(scale), []
    with torch.no_grad():
        for k in range(1, 8):
            z = model.blocks[:k](x)
            bp = bootstrap_probe(z, y, 40, seed=1)
            rows.append({"cut": k, "block": f"b{k}", "rc2_boot": bp["rc2"].tolist(),
                         "frac_boot": bp["within_fraction"].tolist(), **probe_values(z, y, K)})
    return rows


def test_rescaling_one_layer_moves_the_raw_rule_and_not_the_scale_free_one():
    plain, scaled = _rescale_rows(None), _rescale_rows(0.02)
    zp, zs = detect_zone(plain), detect_zone(scaled)
    # without the rescaling both rules find the contraction into b6
    assert zp["zone_cuts"][0] == 6 and zp["scale_free"]["first_drop_cut"] == 6 and zp["disagreement"] is None
    # block 4's output x 0.02: R_c^2 falls 99.96% into cut 4 and the raw rule moves there ...
    assert scaled[3]["rc2_mean"] == pytest.approx(0.02 ** 2 * plain[3]["rc2_mean"], rel=1e-6)
    assert zs["first_drop_cut"] == 4 and zs["bootstrap"]["agreement"] == 1.0
    # ... the scale-free fraction (and its bootstrap) is the same at every cut, and so is its zone
    for a, b in zip(plain, scaled):
        assert b["within_fraction"] == pytest.approx(a["within_fraction"], rel=1e-6)
        assert b["between_within"] == pytest.approx(a["between_within"], rel=1e-6)
        assert np.allclose(b["frac_boot"], a["frac_boot"], rtol=1e-6)
    assert zs["scale_free"]["zone_cuts"] == zp["scale_free"]["zone_cuts"] and zs["scale_free"]["first_drop_cut"] == 6
    assert zs["scale_free"]["bootstrap"]["agreement"] == zp["scale_free"]["bootstrap"]["agreement"]
    # the downstream normalisation undoes the scale: deeper cuts are unchanged
    assert scaled[5]["rc2_mean"] == pytest.approx(plain[5]["rc2_mean"], rel=1e-6)
    # the disagreement line names both cuts and what the raw drop is made of
    line = zs["disagreement"]
    assert "cut 4" in line and "cut 6" in line and "tr(Sigma) falls 100%" in line and "within-class fraction only 0%" in line


def test_bootstrap_probe_matches_direct_resampling_and_is_scale_free():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 4
    y[0] = 9                                                        # a singleton: fixed in every resample
    z = torch.randn(60, 3, 2, generator=g) + 2.0 * y.view(-1, 1, 1).float().clamp(max=3)
    bp = bootstrap_probe(z, y, 30, seed=5)
    assert torch.equal(bp["rc2"], bootstrap_mean_radius(z, y, 30, seed=5))    # the same resamples
    from splitveil.metrics.probes import bootstrap_class_groups
    groups = bootstrap_class_groups(y, 30, 5)
    zf, n_all = z.flatten(1).double(), len(y)
    for b in (0, 11, 29):   # rebuild resample b explicitly and compute its decomposed tr(Sigma) directly
        means, within, bias = [], 0.0, 0.0
        for idx, counts in groups:
            zc = zf[torch.repeat_interleave(idx, counts[b].long())]
            n, p = len(idx), len(idx) / n_all
            within += p * float(((zc - zc.mean(0)) ** 2).sum(1).mean()) * n / (n - 1)
            bias += p * (1 - p) * float(((zf[idx] - zf[idx].mean(0)) ** 2).sum(1).mean()) / n
            means.append((p, zc.mean(0)))
        means.append((1 / n_all, zf[0]))
        grand = sum(p * m for p, m in means)
        between = sum(p * float(((m - grand) ** 2).sum()) for p, m in means)
        assert bp["total"][b].item() == pytest.approx(within + between - bias, rel=1e-9)
        assert bp["within_fraction"][b].item() == pytest.approx(bp["rc2"][b].item() / bp["total"][b].item(), rel=1e-12)
    # chunking the columns changes nothing; a constant factor leaves the fraction alone
    assert torch.allclose(bootstrap_probe(z, y, 30, seed=5, chunk=1)["total"], bp["total"], rtol=1e-12)
    assert torch.allclose(bootstrap_probe(z * 40.0, y, 30, seed=5)["within_fraction"], bp["within_fraction"], rtol=1e-9)
    # centred on the sample's values (tr(Sigma) = sigma2 * d exactly at the sample)
    pv, many = probe_values(z, y), bootstrap_probe(z, y, 4000, seed=1)
    assert pv["total_variance"] == pytest.approx(pv["sigma2"] * 6, rel=1e-12)
    for key, est in (("total", pv["total_variance"]), ("within_fraction", pv["within_fraction"])):
        assert abs(many[key].mean().item() - est) < 0.1 * many[key].std().item(), key


# -- the zone by MSE, the localising check, the label-smoothing reading -----------------------------------------
def _mse_rows(fracs: dict[int, float], base: float = 0.06) -> list[dict]:
    return [{"cut": k, "block": f"conv{k}", "rc2_mean": 100.0 / k, "mse": f * base, "baseline_mse": base}
            for k, f in fracs.items()]


def test_zone_by_mse_is_the_largest_jump_of_the_baseline_fraction():
    rows = _mse_rows({2: 0.03, 8: 0.45, 9: 0.48, 10: 0.55, 11: 0.60, 12: 0.80, 13: 0.84, 16: 0.93})
    m = mse_zone(rows)
    assert m["found"] and m["zone_cut"] == 8 and m["from_cut"] == 2 and not m["localised"]     # 2 -> 8: a gap
    assert m["jumps"][0] == pytest.approx(0.42) and m["below_ceiling"] == [2, 8, 9, 10, 11]
    every = mse_zone([r for r in rows if r["cut"] >= 8])             # only the consecutive region 8..13, 16
    assert every["zone_cut"] == 12 and every["from_cut"] == 11 and every["localised"]
    assert every["max_jump"] == pytest.approx(0.20)
    # the check that replaces "MSE at the zone >= 4x MSE at cut 2": does the MSE jump at the rule's zone?
    hit = rule_check({"first_drop_cut": 12}, every)
    assert hit["matches_mse"] and hit["jump_rank"] == 1 and hit["fraction_before"] == pytest.approx(0.60)
    miss = rule_check({"first_drop_cut": 13}, every)
    assert miss["matches_mse"] is False and miss["jump"] == pytest.approx(0.04) and miss["jump_rank"] == 5
    gap = rule_check({"first_drop_cut": 16}, every)                  # cut 15 not attacked: no jump into 16
    assert "jump" not in gap and gap["matches_mse"] is False
    # no baseline, no zone; a falling fraction is no zone either
    assert not mse_zone([{**r, "baseline_mse": None} for r in rows])["found"]
    assert not mse_zone(_mse_rows({8: 0.9, 9: 0.8}))["found"]
    assert mse_fraction({"mse": 0.03, "baseline_mse": 0.06}) == pytest.approx(0.5)


def _ls_rows(seed: int, scale: float, frac_shift: float, mse_shift: float = 0.0) -> list[dict]:
    """Per-seed rows: R_c^2 = frac * tr(Sigma); the LS form multiplies tr(Sigma) by ``scale`` and moves the
    within-class fraction by ``frac_shift``."""
    jitter = [0.0, 0.004, -0.004][seed]
    rows = []
    for k, (tr, frac, mfrac) in enumerate([(400.0, 0.50, 0.45), (300.0, 0.48, 0.62), (200.0, 0.45, 0.85)], 1):
        t, f = tr * scale * (1 + jitter), frac + frac_shift + jitter
        rows.append({"cut": k, "block": f"b{k}", "rc2_mean": f * t, "within_fraction": f, "sigma2": t / 10, "d": 10,
                     "mse": 0.06 * (mfrac + mse_shift + jitter / 4), "baseline_mse": 0.06})
    return rows


def test_label_smoothing_reading_tells_contraction_from_rescaling():
    one = [_ls_rows(s, 1.0, 0.0) for s in range(3)]
    rescale = label_smoothing_reading({"onehot": one, "ls+0.3": [_ls_rows(s, 0.3, 0.0) for s in range(3)]})
    r = rescale["forms"]["ls+0.3"]
    assert r["verdict"] == "only rescales" and r["deepest_cut"] == 3
    assert r["per_cut"][2]["tr_ratio"] == pytest.approx(0.3) and r["per_cut"][2]["rc2_ratio"] == pytest.approx(0.3)
    assert r["per_cut"][2]["frac_diff"][1] < 0 < r["per_cut"][2]["frac_diff"][2]
    # MSE read only below its ceiling (70% of the baseline): cuts 1 and 2, not 3 (0.85)
    assert [m["cut"] for m in r["below_ceiling_mse"]] == [1, 2]
    assert all(m["verdict"] == "within seed spread" for m in r["below_ceiling_mse"])
    contract = label_smoothing_reading({"onehot": one, "ls+0.3": [_ls_rows(s, 0.3, -0.1, 0.05) for s in range(3)]})
    c = contract["forms"]["ls+0.3"]
    assert c["verdict"] == "contracts the classes"
    assert [m["verdict"] for m in c["below_ceiling_mse"]] == ["higher", "higher"]
    same = label_smoothing_reading({"onehot": one, "ls-0.05": [_ls_rows(s, 1.0, 0.0) for s in range(3)]})
    assert same["forms"]["ls-0.05"]["verdict"] == "does not shrink R_c^2"
    with pytest.raises(ValueError, match="no 'onehot' form"):
        label_smoothing_reading({"ls+0.3": one})
    from splitveil.report.gpz import ls_reading_markdown
    text = ls_reading_markdown(rescale)
    assert "ls+0.3 only rescales" in text and "cut 1 " in text and "(at the ceiling)" in text


def test_label_form_keeps_or_refuses_the_configured_defense():
    assert with_label_form({"name": "none"}, "ls+0.3") == {"name": "label_smoothing", "alpha": 0.3}
    noisy = {"name": "gaussian_noise", "sigma": 0.1}
    assert with_label_form(noisy, "onehot") == noisy
    both = with_label_form(noisy, "ls-0.05")
    assert both == {"name": ["gaussian_noise", "label_smoothing"], "sigma": 0.1, "label_smoothing": {"alpha": -0.05}}
    from splitveil.defenses import build_defenses
    stack = build_defenses(both)
    assert [d.name for d in stack.defenses] == ["gaussian_noise", "label_smoothing"]
    with pytest.raises(ConfigError, match="already uses label_smoothing"):
        with_label_form({"name": "label_smoothing", "alpha": 0.1}, "ls+0.3")


def test_parse_cuts_and_label_forms():
    names = ["conv1", "conv2", "conv3", "classifier"]
    assert parse_cuts("all", names) == [1, 2, 3]
    assert parse_cuts("3,1,conv2", names) == [1, 2, 3]
    with pytest.raises(ConfigError, match="out of range; valid cuts are 1..3"):
        parse_cuts("4", names)
    with pytest.raises(ConfigError, match="unknown cut 'fc9'"):
        parse_cuts("fc9", names)
    # ranges: inclusive, with '-' or ':', of cuts or block names, mixed with single cuts
    vgg = [f"conv{i}" for i in range(1, 17)] + ["classifier"]
    assert parse_cuts("8-16", vgg) == parse_cuts("8:16", vgg) == parse_cuts("conv8-conv16", vgg) == list(range(8, 17))
    assert parse_cuts("2,8-16", vgg) == [2] + list(range(8, 17))
    assert parse_cuts("2, 8 - 10, 9, conv12:conv13", vgg) == [2, 8, 9, 10, 12, 13]
    with pytest.raises(ConfigError, match="runs backwards; write it as 8-16"):
        parse_cuts("16-8", vgg)
    with pytest.raises(ConfigError, match="17 is out of range; valid cuts are 1..16"):
        parse_cuts("8-17", vgg)
    with pytest.raises(ConfigError, match="unknown cut 'fc1'"):
        parse_cuts("fc1-conv3", vgg)
    assert label_form_defense("onehot") == {"name": "none"}
    assert label_form_defense("ls+0.3") == {"name": "label_smoothing", "alpha": 0.3}
    assert label_form_defense("ls-0.05") == {"name": "label_smoothing", "alpha": -0.05}
    with pytest.raises(ConfigError, match="unknown label form 'soft'"):
        label_form_defense("soft")


def test_gpz_configs_resolve_the_shared_data_and_the_paper_configs_are_the_papers_setting():
    import os
    from pathlib import Path

    from splitveil.experiments.config import load_config
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("gpz_*.yaml"))
    assert len(files) >= 5
    for f in files:      # data.root is relative to the config file: ../../shared/data from configs/
        assert os.path.normpath(load_config(f).data.root) == os.path.normpath(root.parent / "shared" / "data"), f.name
    paper = {n: load_config(root / "configs" / f"gpz_{n}_cifar10.yaml") for n in ("vgg19", "ir152", "vit")}
    assert [c.model.name for c in paper.values()] == ["vgg19_bn", "ir152", "vit"]
    for c in paper.values():   # 64 px, full width, the full training set, 10,000 attacker images
        assert (c.data.image_size, c.model.width, c.data.train_size, c.data.aux_size) == (64, 1.0, None, 10000)
    vit = create_model("vit", 10, (3, 64, 64), 1.0, **paper["vit"].model.options)
    with torch.no_grad():
        assert tuple(vit.blocks[:7](torch.zeros(1, 3, 64, 64)).shape[1:]) == (257, 128)     # the paper's (257, 128)


# -- the CIFAR-sized ViT ---------------------------------------------------------------------------------------
def test_vit_blocks_tokens_and_token_decoder():
    m = create_model("vit", 10, (3, 32, 32), width=0.25)
    assert m.block_names == ["embed"] + [f"block{i}" for i in range(1, 7)] + ["classifier"]
    shapes = dict(m.block_shapes())
    assert shapes["embed"] == (65, 32) and shapes["block6"] == (65, 32) and shapes["classifier"] == (10,)
    sm = SplitModel(m, "block3")
    assert sm.feature_shape == (65, 32) and sm(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert token_grid(65) == 8 and token_grid(64) == 8 and token_grid(7) == 0
    dec = InversionDecoder((65, 32), (3, 32, 32), channels=16)
    assert dec(torch.randn(2, 65, 32)).shape == (2, 3, 32, 32)
    assert InversionDecoder((7, 5), (1, 28, 28), channels=16)(torch.randn(3, 7, 5)).shape == (3, 1, 28, 28)
    # FLOPs of one transformer block (T tokens, dim d, MLP 2d): every matmul is counted (a multiply-add is 2)
    from splitveil.metrics import flops_per_image
    bl = list(m.blocks.children())
    f1, f2 = (flops_per_image(nn.Sequential(*bl[:k]), (3, 32, 32)) for k in (1, 2))
    T, d = 65, 32
    assert f2 - f1 == 2 * T * d * 3 * d + 2 * T * d * d + 2 * 2 * T * T * d + 2 * 2 * T * d * 2 * d
    # patch tokens are laid out as the image's patch grid: token 1 + i*8 + j is patch (i, j)
    from splitveil.models.decoder import TokensToMap
    t = torch.arange(65, dtype=torch.float32).view(1, 65, 1).expand(1, 65, 2)
    grid = TokensToMap(65, 8)(t)
    assert grid.shape == (1, 2, 8, 8) and grid[0, 0, 2, 3] == 1 + 2 * 8 + 3


# -- sweep on real data -----------------------------------------------------------------------------------------
def _cfg(**over):
    base = {"attacks.inverse_network.epochs": 1, "attacks.inverse_network.channels": 16, "data.aux_size": 128,
            "data.test_size": 96, "eval.recon_images": 3}
    return tiny_config(**{**base, **over})


def test_sweep_rows_plots_and_resume(tmp_path, data_root, monkeypatch):
    cfg = _cfg()
    sweep = GPZSweep(cfg, tmp_path, probe_images=64)
    res = sweep.run("1,4,8", attack=True)
    write_sweep(res)      # the tables and figures (report/) of the sweep's result (experiments/)
    assert [r["cut"] for r in res["rows"]] == [1, 4, 8]
    for r in res["rows"]:
        assert r["d"] == math.prod(r["shape"]) and r["payload_bytes"] == 4 * r["d"]
        assert 0 < r["mse"] < 1 and r["psnr"] > 0 and len(r["rc2_per_class"]) == 10
        assert r["probe_images"] == 64
    shares = [r["edge_flops_share"] for r in res["rows"]]
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] <= 1.0
    run_dir = sweep.run_dir
    for f in ("gpz.png", "recon_strip.png", "gpz.md", "gpz.csv"):
        assert (run_dir / f).stat().st_size > 1000 or f.endswith(("md", "csv"))
    import matplotlib.image as mpimg
    img = mpimg.imread(run_dir / "gpz.png")
    assert img.shape[0] > 100 and img.std() > 0.01          # a drawn figure, not a blank canvas
    strip = mpimg.imread(run_dir / "recon_strip.png")
    assert strip.shape[0] > 100 and strip.std() > 0.01
    csv_lines = (run_dir / "gpz.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 3 and csv_lines[0].startswith("cut,block,shape,d")
    assert "zone_rule" in csv_lines[0] and "paper's rule" in (run_dir / "gpz.md").read_text()
    for r in res["rows"]:   # bootstrap interval around the class-mean R_c^2
        assert r["rc2_ci95"][0] <= r["rc2_mean"] * 1.05 and r["rc2_ci95"][1] >= r["rc2_mean"] * 0.95
        assert r["rc2_ci95"][0] < r["rc2_ci95"][1] and len(r["rc2_boot"]) == 200
    assert res["zone"]["bootstrap"]["resamples"] == 200
    assert res["zone"]["fidelity"]["threshold_per_element"] == pytest.approx(0.02)      # MNIST: one channel
    # the scale-free probe with its own bootstrap, the baseline with every MSE, both rules and the MSE zone
    for r in res["rows"]:
        assert r["total_variance"] == pytest.approx(r["sigma2"] * r["d"], rel=1e-9)
        assert r["frac_ci95"][0] < r["within_fraction"] < r["frac_ci95"][1] and len(r["frac_boot"]) == 200
        assert r["total_ci95"][0] < r["total_variance"] < r["total_ci95"][1]
        assert 0 < r["baseline_mse"] < 1 and r["baseline_mse"] != r["mse"]
    z = res["zone"]
    assert z["scale_free"]["bootstrap"]["resamples"] == 200 and z["mse"]["cuts"] == [1, 4, 8]
    assert set(z["checks"]) == {"raw", "scale_free"} and "disagreement" in z
    md = (run_dir / "gpz.md").read_text()
    assert "scale-free" in md and "zone by MSE" in md and "MSE / baseline" in md
    for f in ("gpz.pdf", "recon_strip.pdf"):                               # a PDF beside each figure
        assert (run_dir / f).read_bytes()[:5] == b"%PDF-"
    from PIL import Image
    with Image.open(run_dir / "gpz.png") as im:
        assert round(im.info["dpi"][0]) == 300

    # resumable: a second sweep over all cuts keeps the finished ones (no new attack; probes added for the rest)
    def boom(self, k):
        raise AssertionError(f"attack re-run at cut {k}")
    monkeypatch.setattr(GPZSweep, "attack", boom)
    again = GPZSweep(cfg, tmp_path, probe_images=64)
    res2 = again.run("all", attack=False)
    assert [r["cut"] for r in res2["rows"]] == list(range(1, 9))
    assert all("mse" not in r for r in res2["rows"])
    stored = json.loads((run_dir / "rows.json").read_text())
    assert sorted(map(int, stored)) == list(range(1, 9))
    assert stored["4"]["mse"] == pytest.approx(res["rows"][1]["mse"])      # attack results kept
    assert stored["4"]["rc2_mean"] == pytest.approx(res["rows"][1]["rc2_mean"])
    res3 = GPZSweep(cfg, tmp_path, probe_images=64).run("1,4,8", attack=True)  # nothing left to attack
    assert [r["mse"] for r in res3["rows"]] == [r["mse"] for r in res["rows"]]


def test_cli_gpz_and_probe(tmp_path, data_root, capsys):
    from splitveil.cli import main

    cfg = _cfg()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "runs"
    assert main(["gpz", str(path), "--out", str(out), "--cuts", "2,conv5", "--no-attack", "--probe-images", "64"]) == 0
    text = capsys.readouterr().out
    assert "| 2 | conv2 |" in text and "| 5 | conv5 |" in text and "paper's rule" in text
    rows = json.loads(next(out.glob("gpz-*/rows.json")).read_text())
    assert main(["probe", str(path), "--out", str(out), "--cut", "conv2", "--probe-images", "64"]) == 0
    text = capsys.readouterr().out
    assert f"| R_c^2 mean | {rows['2']['rc2_mean']:.6g} |" in text     # same trained model, same probe
    assert f"| d | {rows['2']['d']:,} |" in text
    assert main(["probe", str(path), "--out", str(out), "--cut", "99"]) == 2


def test_compare_label_forms(tmp_path, data_root):
    cfg = _cfg()
    res = run_compare(cfg, ["onehot", "ls+0.3"], tmp_path, cuts="1,8", attack=False, probe_images=64, seeds=[0, 1],
                      bootstrap=20)
    write_compare(res)    # the tables and the overlay figure (report/)
    one, ls = res["results"]["onehot"][0], res["results"]["ls+0.3"][0]
    assert one["defense"] == "none" and ls["defense"] == "label_smoothing"
    assert one["run_dir"] != ls["run_dir"]
    assert [r["cut"] for r in one["rows"]] == [1, 8] == [r["cut"] for r in ls["rows"]]
    assert one["rows"][1]["rc2_mean"] != ls["rows"][1]["rc2_mean"]         # two different trained models
    from pathlib import Path
    d = Path(res["dir"])
    assert (d / "compare.png").stat().st_size > 1000
    lines = (d / "compare.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 8 and lines[1].startswith("onehot,0,") and lines[-1].startswith("ls+0.3,1,")
    assert "| ls+0.3 |" in (d / "compare.md").read_text()
    one1 = res["results"]["onehot"][1]
    assert one1["run_dir"] != one["run_dir"] and one1["rows"][1]["rc2_mean"] != one["rows"][1]["rc2_mean"]
    cut8 = res["summary"]["onehot"]["per_cut"][1]
    vals = [one["rows"][1]["rc2_mean"], one1["rows"][1]["rc2_mean"]]
    assert cut8["rc2_mean"] == pytest.approx(np.mean(vals)) and cut8["rc2_seed_std"] == pytest.approx(np.std(vals, ddof=1))


def test_vit_sweep_attacks_token_features(tmp_path, data_root):
    cfg = _cfg(**{"model.name": "vit", "model.width": 0.25, "model.cut": "block2"})
    res = GPZSweep(cfg, tmp_path, probe_images=64).run("embed,block6", attack=True)
    assert [(r["block"], tuple(r["shape"])) for r in res["rows"]] == [("embed", (65, 32)), ("block6", (65, 32))]
    assert all(0 < r["mse"] < 1 for r in res["rows"])
    assert res["rows"][0]["payload_bytes"] == res["rows"][1]["payload_bytes"] == 65 * 32 * 4


def test_sweep_scores_the_worst_case_over_the_configured_suite(tmp_path, data_root):
    """Every configured attack runs at an attacked cut and the row keeps the strongest (lowest MSE): a nearly
    untrained first attack (lr 1e-9) must not become the cut's number."""
    cfg = _cfg(**{"attacks.inverse_network.lr": 1e-9, "attacks.inverse_network_plus.epochs": 2,
                  "attacks.inverse_network_plus.channels": 16, "attacks.inverse_network_plus.batch_size": 32})
    sweep = GPZSweep(cfg, tmp_path, probe_images=64)
    [row] = sweep.run("2", attack=True)["rows"]
    assert set(row["attack_mse"]) == {"inverse_network", "inverse_network_plus"}
    assert row["attack_mse"]["inverse_network_plus"] < row["attack_mse"]["inverse_network"]
    assert row["worst_attack"] == "inverse_network_plus"
    assert row["mse"] == pytest.approx(row["attack_mse"]["inverse_network_plus"])
    stored = json.loads((sweep.run_dir / "rows.json").read_text())["2"]
    assert stored["worst_attack"] == "inverse_network_plus" and stored["mse"] == pytest.approx(row["mse"])
    from splitveil.report.gpz import write_sweep
    write_sweep(sweep.run("2", attack=True))
    assert "worst-case attack" in (sweep.run_dir / "gpz.md").read_text()
    assert "| inverse_network_plus |" in (sweep.run_dir / "gpz.md").read_text()
    saved = torch.load(sweep.cut_dir(2) / "recon.pt")
    assert saved["attack"] == "inverse_network_plus" and saved["recon"].shape == saved["originals"].shape
