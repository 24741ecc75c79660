"""Figures checked the way a reviewer checks them, read from the matplotlib objects (not the pixels): both file
formats exist, no "None" in any label, no two series of an axes share colour and marker, every legend box lies
inside the figure, text readable at one column, and per figure what its issue asked (trade-off: compact key,
annotations that overlap nothing, accuracy axis <= 1, a band per reference; cost: an axis that varies or no
figure; ablation: numeric order, one-point series as markers, the error bars stated; reconstruction grid:
``none`` first, a note per row, the cap said)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from splitveil.report.aggregate import GroupedRun, group_runs
from splitveil.report.build import build, build_report
from splitveil.results import figures as F

from test_report import synthetic_study


def _close(fig):
    F.pyplot().close(fig)


def _pdf_width_in(pdf: bytes) -> float:
    box = re.search(rb"/MediaBox\s*\[\s*0 0 ([0-9.]+) ([0-9.]+)\s*\]", pdf)
    return float(box.group(1)) / 72


# -- the checker itself: it must catch what it claims to ------------------------------------------------------------
def test_figure_problems_catches_none_labels_shared_styles_and_a_legend_outside():
    plt = F.pyplot()
    with F.style():
        fig, ax = plt.subplots(figsize=(3.6, 2.5))
        ax.errorbar([1], [1], yerr=[0.1], fmt="o", color="tab:blue", label="lambda=None")
        ax.errorbar([2], [2], yerr=[0.1], fmt="o", color="tab:blue", label="b")
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.5))
    problems = F.figure_problems(fig)
    _close(fig)
    assert any("None" in p for p in problems)
    assert any("share colour" in p for p in problems)
    assert any("legend box" in p for p in problems)
    with F.style():
        fig, ax = plt.subplots(figsize=(3.6, 2.5))
        ax.errorbar([1], [1], yerr=[0.1], fmt="o", color="tab:blue", label="a")     # caps of one colour: no series
        ax.errorbar([2], [2], yerr=[0.1], fmt="s", color="tab:blue", label="b")
        ax.legend(loc="best")
        ax.set_xlabel("x")
    assert F.figure_problems(fig) == []
    _close(fig)


def test_series_styles_never_repeat_a_colour_or_a_pair():
    for n in (3, 10, 11, 20, 33):
        st = F.series_styles(range(n))
        assert len({tuple(np.round(c, 6)) for c, _ in st.values()}) == n
    fam = F.family_styles([(d, k) for d in range(5) for k in range(20)])   # 20 members > 14 markers
    pairs = {(tuple(np.round(c, 6)), m) for c, m in fam.values()}
    assert len(pairs) == 100


def test_log_ticks_label_a_narrow_range_with_enough_numbers():
    plt = F.pyplot()
    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(0.012, 0.06)
    F.log_ticks(ax.xaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    _close(fig)
    assert len(labels) >= 4 and all(not re.search(r"10\^|\$", x) for x in labels), labels
    # a range crossing a decade at column width: 0.008, 0.009, 0.01 must not print over each other
    with F.style():
        fig, ax = plt.subplots(figsize=(F.COLUMN_WIDTH, 2.5))
    ax.set_xscale("log")
    ax.set_xlim(0.0072, 0.041)
    F.log_ticks(ax.xaxis)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    assert len(ticks) >= 4 and F.overlapping_texts(ticks) == [], [t.get_text() for t in ticks]
    _close(fig)


def test_save_figure_writes_300_dpi_png_and_pdf(tmp_path):
    from PIL import Image

    plt = F.pyplot()
    with F.style():
        fig, ax = plt.subplots(figsize=(F.COLUMN_WIDTH, 2.5))
        ax.plot([1, 2], [1, 2])
    paths = F.save_figure(fig, tmp_path / "sub" / "f.png")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    with Image.open(paths[0]) as im:
        assert round(im.info["dpi"][0]) == 300 and im.size[0] == round(F.COLUMN_WIDTH * 300)
    assert paths[1].read_bytes()[:5] == b"%PDF-" and _pdf_width_in(paths[1].read_bytes()) == pytest.approx(3.6, abs=0.01)


# -- the trade-off figure ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return synthetic_study(tmp_path_factory.mktemp("study"), gain=0.3)


def test_tradeoff_figure_passes_the_reviewer_checks(study):
    from splitveil.report.plots import render, tradeoff_figure

    rep = build(study, figures=False, references=["gaussian_noise", "gaussian_noise+cem_gmm"], n_boot=50)
    sec = rep.sections[0]
    fig, _ = tradeoff_figure(sec.groups, "worst", analyses=sec.analyses, baseline_mse=0.06, undefended_acc=0.93)
    assert F.figure_problems(fig) == []
    ax = fig.axes[0]
    # one column wide; the key is compact (one entry per defense + reference lines), outside the axes, above them
    assert fig.get_size_inches()[0] == pytest.approx(F.COLUMN_WIDTH)
    (key,) = fig.legends
    texts = [t.get_text() for t in key.get_texts()]
    assert texts[:3] == ["gaussian_noise", "gaussian_noise+cem_gmm", "none"] and len(texts) <= 3 + 4
    renderer = fig.canvas.get_renderer()
    assert key.get_window_extent(renderer).y0 >= ax.get_window_extent(renderer).y1 - 1
    # accuracy axis never above 1; the log axis carries at least 3 numbers
    assert ax.get_ylim()[1] <= 1.0
    assert len([t for t in ax.get_xticklabels() if t.get_text()]) >= 3
    # parameter values and gains as annotations, overlapping neither each other nor any marker
    anns = list(ax.texts)
    assert {"λ=1 +0.30", "λ=4 +0.30", "λ=16 +0.30", "λ=0.5", "σ=0.01"} <= {t.get_text() for t in anns}
    assert F.overlapping_texts(anns) == []
    pts = [ax.transData.transform((c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0])) for c in ax.containers]
    for t in anns:
        bb = t.get_window_extent(renderer)
        assert not any(bb.x0 < x < bb.x1 and bb.y0 < y < bb.y1 for x, y in pts), t.get_text()
    # one band per reference, in that reference's colour, not one identical grey
    bands = [c for c in ax.collections if c.get_label().endswith("band")]
    assert len(bands) == 2 and len({tuple(np.round(b.get_facecolor()[0][:3], 3)) for b in bands}) == 2
    png, pdf = render(fig)
    assert png[:4] == b"\x89PNG" and _pdf_width_in(pdf) == pytest.approx(3.6, abs=0.01)


def test_tradeoff_key_stays_compact_with_many_groups(tmp_path):
    """33 groups (the issue's case): the key holds the defenses, not one entry per group, and fits the figure."""
    from splitveil.report.plots import tradeoff_figure

    runs = []
    for d in range(3):
        for k in range(11):
            runs.append(GroupedRun(f"r{d}-{k}", "cifar10", "vgg11_bn", "conv2", f"defense_{d}", 0, {},
                                   {"defense.lambda": 2.0 ** k, "seed": 0}, None,
                                   {"accuracy": 0.9 - 0.03 * k - 0.01 * d, "worst.mse": 0.01 * 1.2 ** k * (1 + 0.1 * d)}))
    groups = group_runs(runs)
    fig, _ = tradeoff_figure(groups, "worst")
    assert F.figure_problems(fig) == []
    assert len(fig.legends[0].get_texts()) <= 3 + 4
    assert fig.get_size_inches()[1] < 5
    _close(fig)


# -- cost ---------------------------------------------------------------------------------------------------------
def _groups(values: list[dict], defense="gaussian_noise", field="defense.sigma"):
    runs = [GroupedRun(f"r{i}", "cifar10", "vgg11_bn", "conv2", v.get("defense", defense), 0, {},
                       {field: v[field], "seed": 0} | ({"defense.k": v["k"]} if "k" in v else {}), None,
                       {k: x for k, x in v.items() if k not in (field, "defense", "k")}) for i, v in enumerate(values)]
    return group_runs(runs)


def test_cost_figure_falls_back_to_payload_and_is_skipped_when_nothing_varies():
    from splitveil.report.plots import cost_axis, cost_figure

    same = _groups([{"defense.sigma": s, "accuracy": 0.8, "worst.mse": 0.01 * (1 + s), "encoder_flops": 1e7,
                     "payload_bytes": 2048, "latency_ms": 0.5 + s} for s in (0.1, 0.2, 0.4)])
    assert cost_axis(same) is None and cost_figure(same, "worst") is None      # CEM / noise: constant cost
    payload = _groups([{"defense.sigma": s, "accuracy": 0.8, "worst.mse": 0.01 * (1 + s), "encoder_flops": 1e7,
                        "payload_bytes": 2048 * (1 + i)} for i, s in enumerate((0.1, 0.2, 0.4))])
    assert cost_axis(payload)[0] == "payload_bytes"
    fig = cost_figure(payload, "worst")
    assert fig.axes[0].get_xlabel().startswith("payload") and F.figure_problems(fig) == []
    _close(fig)


# -- ablation -----------------------------------------------------------------------------------------------------
def test_ablation_figure_numeric_order_distinct_series_no_none_and_stated_error_bars():
    from splitveil.report.plots import ablation_figure, render

    vals = []
    for d in range(12):                                   # 12 series: more than one palette of 10
        lams = (0.25, 16.0, 1.0, 4.0) if d else (4.0,)       # defense_0 has one point only
        for lam in lams:
            v = {"defense.lambda": lam, "defense": f"cem_{d:02d}", "accuracy": 0.9 - 0.01 * lam, "worst.mse": 0.01 * (1 + lam)}
            if d % 2:
                v["k"] = 5                                # a parameter the other defenses lack (None for them)
            vals.append(v)
    runs = []
    for i, v in enumerate(vals):
        for seed in (0, 1):
            cfg = {"defense.lambda": v["defense.lambda"], "defense.k": v.get("k"), "seed": seed}
            runs.append(GroupedRun(f"r{i}-{seed}", "cifar10", "vgg11_bn", "conv2", v["defense"], seed, {}, cfg, None,
                                   {"accuracy": v["accuracy"] + 0.01 * seed, "worst.mse": v["worst.mse"]}))
    groups = group_runs(runs)
    fig = ablation_figure(groups, "defense.lambda", "worst")
    assert F.figure_problems(fig) == []
    top = fig.axes[0]
    series = [c.lines[0] for c in top.containers]
    assert len(series) == 12
    from matplotlib.colors import to_rgba
    assert len({tuple(np.round(to_rgba(s.get_color()), 6)) for s in series}) == 12
    for s in series:
        xs = list(s.get_xdata())
        assert xs == sorted(xs)                                     # 0.25, 1, 4, 16: numeric, not as strings
        assert (s.get_linestyle() == "None") == (len(xs) == 1)      # one point: a marker, not a curve
    assert sorted(len(s.get_xdata()) for s in series)[0] == 1
    title = fig.legends[0].get_title().get_text()
    assert "std over seeds" in title and "n = 2" in title
    png, pdf = render(fig)
    assert png[:4] == b"\x89PNG" and pdf[:5] == b"%PDF-"


# -- reconstruction grid ------------------------------------------------------------------------------------------
def test_recon_figure_puts_none_first_notes_scores_and_says_when_capped(tmp_path):
    from splitveil.report.plots import recon_figure

    runs = []
    names = [f"noise_{i}" for i in range(5)] + ["none"]
    for i, d in enumerate(names):
        rd = tmp_path / d
        rd.mkdir()
        torch.save({"originals": torch.rand(4, 3, 8, 8), "recon": torch.rand(4, 3, 8, 8)}, rd / "recon_inverse_network.pt")
        metrics = {"attacks": {"inverse_network": {"mse": 0.01 * (i + 1), "ssim": 0.5,
                                                   "fit.val_curve": [0.1, 0.09, 0.08, 0.07, 0.05]}},
                   "baseline": {"mean_image": {"mse": 0.045}}}
        runs.append(GroupedRun(d, "cifar10", "vgg11_bn", "conv2", d, 0, metrics, {"seed": 0}, rd,
                               {"inverse_network.mse": 0.01 * (i + 1), "inverse_network.ssim": 0.5}))
    groups = group_runs(runs)
    fig = recon_figure(groups, "inverse_network", max_rows=4)
    assert F.figure_problems(fig) == []
    row_labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert row_labels[0] == "original" and row_labels[1].startswith("none\nMSE 0.06")
    assert "MSE 0.01  SSIM 0.500 (unconverged)" in row_labels[2]
    assert "MSE 0.05  SSIM 0.500 (weak, unconverged)" not in "".join(row_labels)     # capped before it
    assert "first 4 of 6 groups" in fig._suptitle.get_text()
    _close(fig)


def test_report_writes_png_and_pdf_for_every_figure(study, tmp_path):
    out = tmp_path / "rep"
    build_report(study, ["md"], out, references=["gaussian_noise"], n_boot=20)
    files = {p.name for p in (out / "report_files").iterdir()}
    pngs = {f for f in files if f.endswith(".png")}
    assert pngs and all(f[:-4] + ".pdf" in files for f in pngs), files
    assert any(f.startswith("ablation_") for f in pngs)
