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

from splitveil.attacks.inverse_network import InversionDecoder, token_grid
from splitveil.experiments.gpz import GPZSweep, detect_zone, label_form_defense, parse_cuts, run_compare
from splitveil.metrics import decision_entropy_bound, feature_entropy_bound, probe_values
from splitveil.models import BlockModel, SplitModel, create_model
from splitveil.params import ConfigError


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
            rows.append({"cut": k, "block": model.block_names[k - 1], **probe_values(z, y, K)})
    assert rows[2]["rc2_mean"] == pytest.approx(0.0, abs=1e-12)       # the class points
    assert rows[0]["rc2_mean"] > 1.0 and rows[0]["within_fraction"] > 0.3
    zone = detect_zone(rows)
    assert zone["found"] and zone["signal"] == "probe"
    assert zone["end_cut"] <= 3 and zone["end_block"] in ("feat2", "collapse")
    assert zone["probe"]["max_drop_cut"] == 3
    assert "within-class fraction" in zone["method"]


def test_zone_detector_flat_probe_and_mse_signal():
    rows = [{"cut": k, "block": f"b{k}", "within_fraction": w, "mse": m}
            for k, w, m in [(1, 0.50, 0.010), (2, 0.49, 0.030), (3, 0.48, 0.015), (4, 0.47, 0.04), (5, 0.46, 0.05)]]
    z = detect_zone(rows)                       # ViT-like: no drop -> no zone from the probe
    assert not z["found"] and z["signal"] == "probe" and z["probe"]["max_drop"] < 0.10
    zm = detect_zone(rows, signal="mse")        # MSE stays >= 0.02 from cut 4 (cut 3 dips below)
    assert zm["found"] and zm["signal"] == "mse" and zm["mse"]["stays_above_cut"] == 4
    assert (zm["start_cut"], zm["end_cut"]) == (3, 4)
    no_attack = [{k: v for k, v in r.items() if k != "mse"} for r in rows]
    zf = detect_zone(no_attack, signal="mse")   # no attack: falls back to the probe and says so
    assert zf["signal"] == "probe" and "probe" in zf["note"]
    with pytest.raises(ConfigError, match="zone signal"):
        detect_zone(rows, signal="accuracy")


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
    from splitveil.attacks.inverse_network import TokensToMap
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
    assert "zone_signal" in csv_lines[0] and "signal:" in (run_dir / "gpz.md").read_text()

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
    assert "| 2 | conv2 |" in text and "| 5 | conv5 |" in text and "signal: probe" in text
    rows = json.loads(next(out.glob("gpz-*/rows.json")).read_text())
    assert main(["probe", str(path), "--out", str(out), "--cut", "conv2", "--probe-images", "64"]) == 0
    text = capsys.readouterr().out
    assert f"| R_c^2 mean | {rows['2']['rc2_mean']:.6g} |" in text     # same trained model, same probe
    assert f"| d | {rows['2']['d']:,} |" in text
    assert main(["probe", str(path), "--out", str(out), "--cut", "99"]) == 2


def test_compare_label_forms(tmp_path, data_root):
    cfg = _cfg()
    res = run_compare(cfg, ["onehot", "ls+0.3"], tmp_path, cuts="1,8", attack=False, probe_images=64)
    one, ls = res["results"]["onehot"], res["results"]["ls+0.3"]
    assert one["defense"] == "none" and ls["defense"] == "label_smoothing"
    assert one["run_dir"] != ls["run_dir"]
    assert [r["cut"] for r in one["rows"]] == [1, 8] == [r["cut"] for r in ls["rows"]]
    assert one["rows"][1]["rc2_mean"] != ls["rows"][1]["rc2_mean"]         # two different trained models
    from pathlib import Path
    d = Path(res["dir"])
    assert (d / "compare.png").stat().st_size > 1000
    lines = (d / "compare.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 4 and lines[1].startswith("onehot,") and lines[-1].startswith("ls+0.3,")
    assert "| ls+0.3 |" in (d / "compare.md").read_text()


def test_vit_sweep_attacks_token_features(tmp_path, data_root):
    cfg = _cfg(**{"model.name": "vit", "model.width": 0.25, "model.cut": "block2"})
    res = GPZSweep(cfg, tmp_path, probe_images=64).run("embed,block6", attack=True)
    assert [(r["block"], tuple(r["shape"])) for r in res["rows"]] == [("embed", (65, 32)), ("block6", (65, 32))]
    assert all(0 < r["mse"] < 1 for r in res["rows"])
    assert res["rows"][0]["payload_bytes"] == res["rows"][1]["payload_bytes"] == 65 * 32 * 4
