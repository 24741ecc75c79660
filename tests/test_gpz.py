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
from splitveil.metrics import decision_entropy_bound, feature_entropy_bound, probe_values
from splitveil.metrics.probes import bootstrap_mean_radius, intra_class_radius
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
    assert label_form_defense("onehot") == {"name": "none"}
    assert label_form_defense("ls+0.3") == {"name": "label_smoothing", "alpha": 0.3}
    assert label_form_defense("ls-0.05") == {"name": "label_smoothing", "alpha": -0.05}
    with pytest.raises(ConfigError, match="unknown label form 'soft'"):
        label_form_defense("soft")


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
