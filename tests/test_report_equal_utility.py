"""Equal-utility privacy gain (report/equal_utility.py) on synthetic points with a known answer."""
import math

import numpy as np
import pytest

from splitveil.report.equal_utility import Frontier, Level, RunSample, equal_utility_gains


def run(acc, mse, per_image=None, std=None, n=None, n_test=None, attacks=None):
    atk = attacks or {"inverse_network": {"mse": mse, "mse_std": std, "n": n,
                                          "per_image": None if per_image is None else np.asarray(per_image)}}
    return RunSample(acc, n_test, atk)


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


def _coverage(seeds: int, acc_jitter: float, images: bool = True, studies: int = 40, true_gain: float = 0.25):
    covered, widths, method = 0, [], None
    for study in range(studies):
        rng = np.random.default_rng(100 + study)

        def noisy_run(acc, gain):
            a = acc + rng.normal(0, acc_jitter)
            per = frontier_mse(a) * math.exp(gain) * rng.lognormal(0.0, 0.5, 200) / math.exp(0.5 ** 2 / 2)
            return run(a, float(per.mean()), per_image=per)

        ref = [Level(f"n{i}", [noisy_run(a, 0.0) for _ in range(seeds)]) for i, a in enumerate((0.6, 0.7, 0.8, 0.9))]
        pt = Level("cem", [noisy_run(0.75, true_gain) for _ in range(seeds)])
        g = equal_utility_gains(ref, [pt], n_boot=300, seed=study, images=images).gains[0]
        method = g.ci_method
        covered += g.ci is not None and g.ci[0] <= true_gain <= g.ci[1]
        widths.append(g.ci[1] - g.ci[0] if g.ci else 0.0)
    return covered, float(np.median(widths)), method


def test_bootstrap_interval_covers_the_true_gain_on_a_synthetic_study():
    """Per-image MSEs recorded, seeds scattered in accuracy: the 95% interval covers the true gain in most of
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
