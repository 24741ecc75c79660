"""Equal-utility privacy gain (report/equal_utility.py) on synthetic points with a known answer."""
import math

import numpy as np
import pytest

from splitveil.report.equal_utility import (WIDE_SEGMENT, Frontier, Level, RunSample, equal_utility_gains,
                                            t_quantile)


def run(acc, mse, per_image=None, std=None, n=None, n_test=None, attacks=None, seed=None):
    atk = attacks or {"inverse_network": {"mse": mse, "mse_std": std, "n": n,
                                          "per_image": None if per_image is None else np.asarray(per_image)}}
    return RunSample(acc, n_test, atk, seed=seed)


def frontier_mse(acc):
    """True reference frontier: log MSE = -2 - 4 (acc - 0.6), i.e. less MSE at more accuracy."""
    return math.exp(-2.0 - 4.0 * (acc - 0.6))


def reference(accs=(0.6, 0.7, 0.8, 0.9), seeds=3):
    return [Level(f"noise{i}", [run(a, frontier_mse(a)) for _ in range(seeds)], key=f"noise{i}") for i, a in enumerate(accs)]


def test_gain_is_zero_on_the_reference_and_positive_for_a_dominating_defense():
    ref = reference()
    better = Level("cem", [run(0.75, 1.5 * frontier_mse(0.75))] * 3, key="cem")
    worse = Level("bad", [run(0.75, 0.5 * frontier_mse(0.75))] * 3, key="bad")
    res = equal_utility_gains(ref, ref + [better, worse], n_boot=0)
    gains = {g.key: g for g in res.gains}
    for lv in ref:
        assert gains[lv.key].gain == pytest.approx(0.0, abs=1e-12) and gains[lv.key].where == "inside"
    assert gains["cem"].gain == pytest.approx(math.log(1.5), abs=1e-12) and gains["cem"].mse_ratio == pytest.approx(1.5)
    assert gains["bad"].gain == pytest.approx(math.log(0.5), abs=1e-12)


def test_interpolation_is_linear_in_log_mse_between_reference_levels():
    # two levels only: the frontier between them is the straight line in (accuracy, log MSE)
    ref = [Level("a", [run(0.6, 0.2)]), Level("b", [run(0.8, 0.05)])]
    p = Level("p", [run(0.7, 0.1)])
    g = equal_utility_gains(ref, [p], n_boot=0).gains[0]
    assert g.gain == pytest.approx(math.log(0.1) - 0.5 * (math.log(0.2) + math.log(0.05)))


def test_points_outside_the_reference_accuracy_range_are_flagged_not_extrapolated():
    ref = reference()
    hi = Level("hi", [run(0.95, 1.0)] * 3)          # would be a huge "gain" if the line were extended
    lo = Level("lo", [run(0.5, 1e-4)] * 3)
    res = equal_utility_gains(ref, [hi, lo], n_boot=200)
    assert [g.where for g in res.gains] == ["above", "below"]
    assert all(g.gain is None and g.ci is None for g in res.gains)
    assert res.frontier(0.95) is None and res.frontier(0.5) is None and res.frontier(0.6) is not None


def test_frontier_is_monotone_when_the_measured_levels_are_not():
    # a noisy reference: the middle level has less MSE than the more accurate one
    f = Frontier.fit([0.6, 0.7, 0.8], [0.2, 0.05, 0.08], [1, 1, 1])
    assert np.all(np.diff(f.log_mse) <= 0)
    pooled = 0.5 * (math.log(0.05) + math.log(0.08))
    assert f.log_mse[1] == pytest.approx(pooled) and f.log_mse[2] == pytest.approx(pooled)
    assert f.where(0.59) == "below" and f.where(0.81) == "above" and f.where(0.7) == "inside"
    assert not Frontier.fit([0.7, 0.7], [0.1, 0.2]).usable     # one accuracy: no frontier, no gain


def _coverage(seeds: int, acc_jitter: float, images: bool = True, studies: int = 40, true_gain: float = 0.25,
              n_boot: int = 150):
    covered, widths, method = 0, [], None
    for study in range(studies):
        rng = np.random.default_rng(100 + study)

        def noisy_run(acc, gain):
            a = acc + rng.normal(0, acc_jitter)
            per = frontier_mse(a) * math.exp(gain) * rng.lognormal(0.0, 0.5, 200) / math.exp(0.5 ** 2 / 2)
            return run(a, float(per.mean()), per_image=per)

        ref = [Level(f"n{i}", [noisy_run(a, 0.0) for _ in range(seeds)]) for i, a in enumerate((0.6, 0.7, 0.8, 0.9))]
        pt = Level("cem", [noisy_run(0.75, true_gain) for _ in range(seeds)])
        g = equal_utility_gains(ref, [pt], n_boot=n_boot, seed=study, images=images, method="bootstrap",
                                band_points=0).gains[0]
        method = g.ci_method
        covered += g.ci is not None and g.ci[0] <= true_gain <= g.ci[1]
        widths.append(g.ci[1] - g.ci[0] if g.ci else 0.0)
    return covered, float(np.median(widths)), method


def test_bootstrap_interval_with_per_image_mses_covers_the_true_gain():
    """The former default (method="bootstrap"). Per-image MSEs recorded, seeds scattered in accuracy: the 95% interval covers the true gain in most of
    40 independent synthetic studies and is not absurdly wide. With one seed per point only the image
    resampling gives an interval: a seeds-only bootstrap would have zero width and never cover."""
    covered, width, method = _coverage(seeds=3, acc_jitter=0.01)
    assert method == "seeds + images (resampled)"
    assert covered >= 34 and 0.02 < width < 0.6
    covered, width, _ = _coverage(seeds=1, acc_jitter=0.0)
    assert covered >= 34 and width > 0.02
    assert _coverage(seeds=1, acc_jitter=0.0, images=False, studies=5)[0] == 0   # what the images add


def test_worst_case_draw_uses_the_same_images_for_every_attack():
    per_a = np.array([0.1, 0.1, 0.5, 0.5])
    per_b = np.array([0.5, 0.5, 0.1, 0.1])
    r = run(0.8, None, attacks={"a": {"mse": 0.3, "mse_std": None, "n": 4, "per_image": per_a},
                                "b": {"mse": 0.3, "mse_std": None, "n": 4, "per_image": per_b}})
    assert r.mse == 0.3 and r.method == "images"
    rng = np.random.default_rng(0)
    for _ in range(20):
        acc, mse = r.draw(rng, images=True)
        assert mse <= 0.3 + 1e-12 and acc == 0.8     # min over attacks of means on one resampled image set
    assert r.draw(rng, images=False) == (0.8, 0.3)


def test_from_metrics_reads_attacks_and_falls_back_to_seeds_only():
    m = {"accuracy": 0.7, "sizes": {"test": 500},
         "attacks": {"inverse_network": {"mse": 0.03, "mse_std": 0.01, "n_images": 500},
                     "rmle": {"mse": 0.02}}}
    r = RunSample.from_metrics(m)
    assert r.mse == 0.02 and r.method == "none" and r.n_test == 500   # rmle has no std: seeds only
    r2 = RunSample.from_metrics(m, "inverse_network")
    assert r2.mse == 0.03 and r2.method == "normal"
    with pytest.raises(ValueError, match="gan"):
        RunSample.from_metrics(m, "gan")


# -- t intervals over seeds (the default) --------------------------------------------------------------------------

LEVELS = (0.50, 0.47, 0.44, 0.40, 0.36, 0.32)     # the noise frontier's settings, as mean accuracies


def true_frontier(a):
    """A curved frontier as steep as the CPU study's (log MSE falls ~0.08 per accuracy point)."""
    return np.log(0.03) - 8.0 * (a - 0.42) + 15.0 * (a - 0.42) ** 2


def simulated_studies(studies=200, seeds=3, gain=0.2, point_acc=0.455, shared=0.3, acc_sd=0.01, y_sd=0.045,
                      seed=2024, point_seeds=None):
    """``studies`` independent studies (vectorised, seeded): 6 noise levels and one defense point whose log MSE
    lies ``gain`` above the frontier, ``seeds`` runs each. Run-to-run spread as measured on the CPU study's
    18 settings (sd 0.045 in log MSE), a fraction ``shared`` of its variance common to the runs of one seed
    (the CPU study: ~0.3; seed s of every arm shares its data split); accuracy sd ``acc_sd`` with the same
    sharing; each run's MSE follows its own accuracy along the frontier; 10,000 test images, mse_std 0.45 MSE."""
    rng = np.random.default_rng(seed)
    acc_lv = np.array(LEVELS + (point_acc,))
    shape = (studies, len(acc_lv), seeds)

    def spread(sd):
        return (rng.normal(0, sd * math.sqrt(shared), (studies, 1, seeds))
                + rng.normal(0, sd * math.sqrt(1 - shared), shape))

    acc = acc_lv[None, :, None] + spread(acc_sd)
    log_mse = true_frontier(acc) + spread(y_sd)
    log_mse[:, -1, :] += gain
    mse = np.exp(log_mse)
    pseeds = point_seeds or list(range(seeds))
    out = []
    for s in range(studies):
        lv = [Level(f"l{k}", [run(float(acc[s, k, r]), float(mse[s, k, r]), std=0.45 * float(mse[s, k, r]), n=10000,
                                  n_test=10000, seed=(pseeds[r] if k == len(acc_lv) - 1 else r)) for r in range(seeds)])
              for k in range(len(acc_lv))]
        out.append((lv[:-1], lv[-1]))
    return out


def coverage(studies, gain=0.2, **kw):
    """(fraction of comparable studies whose interval covers ``gain``, comparable studies, median width)."""
    hits, inside, widths = 0, 0, []
    for ref, pt in studies:
        g = equal_utility_gains(ref, [pt], band_points=0, **kw).gains[0]
        if g.gain is None:          # the point fell outside the frontier's range: no comparison
            continue
        inside += 1
        hits += g.ci is not None and g.ci[0] <= gain <= g.ci[1]
        widths.append(np.inf if g.ci is None else g.ci[1] - g.ci[0])
    return hits / max(inside, 1), inside, float(np.median(widths))


def test_t_interval_covers_a_known_gain_with_three_seeds_and_the_seed_bootstrap_does_not():
    """Issue 24, section 3: 200 simulated studies with 3 seeds and a known gain. The t interval (paired by seed)
    covers it in >= 90% of them; the percentile bootstrap over the 3 seeds (10 distinct resamples) does not.
    Measured: t 0.94; seed bootstrap 0.87; the bootstrap with its image terms (normal approx. of each run's
    MSE, binomial accuracy) 0.98, wider, because it adds test-image noise that the seed spread already holds."""
    studies = simulated_studies()
    cov_t, inside, width_t = coverage(studies)
    assert inside >= 190
    assert cov_t >= 0.90, cov_t
    g = equal_utility_gains(*studies[0][:1], [studies[0][1]]).gains[0]
    assert g.ci_method == "t, paired by seed (df 2)" and g.df == 2 and g.ci_kept is None
    cov_boot, _, width_boot = coverage(studies, method="bootstrap", n_boot=60, images=False)
    assert cov_boot < 0.90, cov_boot
    assert width_boot < width_t


def test_t_interval_welch_when_seeds_are_not_paired_and_five_seeds():
    # the point's runs have other seeds than the reference's: independent samples, Welch df
    studies = simulated_studies(studies=100, shared=0.0, point_seeds=[10, 11, 12], seed=7)
    cov, inside, _ = coverage(studies)
    g = equal_utility_gains(studies[0][0], [studies[0][1]]).gains[0]
    assert g.ci_method.startswith("t, Welch") and 2 < g.df < 20
    assert inside >= 90 and cov >= 0.90, cov
    cov5, _, _ = coverage(simulated_studies(studies=100, seeds=5, seed=8))
    assert cov5 >= 0.90, cov5


def test_t_interval_matches_the_hand_computed_paired_interval():
    # two reference levels and a point midway: gain_s = (y_p - (y_0 + y_1) / 2)_s when accuracies are exact
    y0, y1, yp = np.log([0.2, 0.21, 0.19]), np.log([0.05, 0.06, 0.045]), np.log([0.15, 0.12, 0.13])
    ref = [Level("a", [run(0.6, float(np.exp(v)), seed=s) for s, v in enumerate(y0)]),
           Level("b", [run(0.8, float(np.exp(v)), seed=s) for s, v in enumerate(y1)])]
    pt = Level("p", [run(0.7, float(np.exp(v)), seed=s) for s, v in enumerate(yp)])
    g = equal_utility_gains(ref, [pt]).gains[0]
    # the estimate uses log of mean MSEs; the linearisation turns each run's MSE into (m_s - mean) / mean
    m0, m1, mp = (np.exp(v) for v in (y0, y1, yp))
    per_seed = (mp - mp.mean()) / mp.mean() - 0.5 * ((m0 - m0.mean()) / m0.mean() + (m1 - m1.mean()) / m1.mean())
    se = per_seed.std(ddof=1) / math.sqrt(3)
    est = math.log(mp.mean()) - 0.5 * (math.log(m0.mean()) + math.log(m1.mean()))
    assert g.gain == pytest.approx(est, abs=1e-12)
    assert g.se == pytest.approx(se, rel=1e-4)
    assert g.ci == pytest.approx((est - 4.302652729749 * se, est + 4.302652729749 * se), rel=1e-4)
    assert g.bridge == pytest.approx(0.2) and g.wide


def test_no_interval_from_one_seed_and_nothing_dropped():
    ref = reference(seeds=1)
    pt = Level("p", [run(0.75, frontier_mse(0.75))])
    g = equal_utility_gains(ref, [pt]).gains[0]
    assert g.gain is not None and g.ci is None and "one seed" in g.ci_method


def test_bridge_width_and_wide_segment_flag():
    ref = [Level("a", [run(0.60, 0.2, seed=s) for s in range(2)]), Level("b", [run(0.64, 0.1, seed=s) for s in range(2)]),
           Level("c", [run(0.80, 0.05, seed=s) for s in range(2)])]
    near = Level("near", [run(0.62, 0.15, seed=s) for s in range(2)])
    far = Level("far", [run(0.70, 0.08, seed=s) for s in range(2)])
    res = equal_utility_gains(ref, ref + [near, far])
    by = {g.label: g for g in res.gains}
    assert by["near"].bridge == pytest.approx(0.04) and not by["near"].wide
    assert by["far"].bridge == pytest.approx(0.16) and by["far"].wide
    assert by["a"].bridge == 0.0 and not by["a"].wide      # on a level: nothing bridged
    assert WIDE_SEGMENT == 0.05
    boot = equal_utility_gains(ref, [far], method="bootstrap", n_boot=50).gains[0]
    assert boot.bridge == pytest.approx(0.16) and boot.wide
    with pytest.raises(ValueError, match="interval method"):
        equal_utility_gains(ref, [far], method="percentile")


def test_t_quantile_known_values():
    for df, q in ((1, 12.7062047362), (2, 4.3026527297), (4, 2.7764451052), (30, 2.0422724563), (2.5, 3.5746548420)):
        assert t_quantile(0.975, df) == pytest.approx(q, rel=1e-9)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764451052, rel=1e-9)
