"""CEM defenses (issues 4 and 11): the refit and the released loss against hand computations, the reference
lambda schedule against a literal two-backward update, the non-finite guard, float32 statistics, the config
checks, the attention surrogates' design, and that every surrogate rewards contraction, not shrinking."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from splitveil.defenses import DEFENSES, StepContext, build_defenses
from splitveil.defenses.cem_common import (class_masks, component_stats, feature_diagnostics, grad_reverse,
                                           reference_lambda_factor, threshold, weighted_stats)
from splitveil.defenses.cem_gated_pool import pooled_hinge
from splitveil.defenses.cem_gmm import gmm_surrogate, reference_surrogate
from splitveil.params import ConfigError

from conftest import tiny_config

VARIANTS = ["cem_gmm", "cem_slot_cross", "cem_gated_pool"]
# test defaults: the defense adds its own noise (CEM needs noise), no warm-up, no early shut-off
TEST_DEFAULTS = {"cem_gmm": {"noise": True}, "cem_slot_cross": {"noise": True, "warmup_epochs": 0, "shutoff_steps": 0},
                 "cem_gated_pool": {"noise": True, "warmup_epochs": 0}}


def make(name, num_classes, dim, **params):
    d = build_defenses({"name": name, **TEST_DEFAULTS[name], **params}).get(name)
    d.allocate(num_classes, dim)
    d._protect()
    return d


def step_of(z, y, epoch=0, step=1000):
    n = len(y)
    return StepContext(x=torch.zeros(n, 1), y=y, z=z, z_sent=z, logits=torch.zeros(n, 2), epoch=epoch, step=step)


# -- defaults and configuration errors ---------------------------------------------------------------------
def test_paper_defaults_and_param_routing():
    g = build_defenses({"name": ["gaussian_noise", "cem_gmm"], "sigma": 0.025}).get("cem_gmm").params
    assert (g.sigma, g.lambda_, g.var_threshold, g.gamma, g.k) == (0.025, 16.0, 0.125, 0.01, 5)
    assert (g.form, g.lambda_schedule, g.kmeans_iters, g.refit_per_class) == ("reference", "reference", 50, None)
    s = build_defenses({"name": ["gaussian_noise", "cem_slot_cross"], "sigma": 0.025}).get("cem_slot_cross").params
    assert (s.beta, s.warmup_epochs, s.mass_power, s.mass_renorm, s.shutoff_steps) == (20.0, 3, 2.5, True, 100)
    a = build_defenses({"name": ["gaussian_noise", "cem_gated_pool"], "sigma": 0.025}).get("cem_gated_pool").params
    assert a.warmup_epochs == 5
    scoped = build_defenses({"name": ["gaussian_noise", "cem_slot_cross"], "sigma": 0.1,
                             "cem_slot_cross": {"lambda": 2.0, "slots": 4}}).get("cem_slot_cross")
    assert (scoped.params.lambda_, scoped.params.slots, scoped.params.sigma) == (2.0, 4, 0.1)
    assert threshold(0.025, 0.125, 0.01) == pytest.approx(0.125 * 0.025 ** 2 + 0.01)
    with pytest.raises(ConfigError, match="heads"):
        build_defenses({"name": "cem_slot_cross", "noise": True, "slot_dim": 10, "heads": 4})


@pytest.mark.parametrize("name", VARIANTS)
def test_meaningless_settings_are_config_errors_naming_the_field(name):
    with pytest.raises(ConfigError, match=rf"defense.{name}: sigma: is 0 with lambda"):
        build_defenses({"name": ["gaussian_noise", name], "sigma": 0.0})
    with pytest.raises(ConfigError, match=rf"defense.{name}.lambda: .* no defense adds noise"):
        build_defenses({"name": name, "sigma": 0.1})
    with pytest.raises(ConfigError, match=rf"defense.{name}.sigma: 0.05 differs from defense.gaussian_noise.sigma: 0.1"):
        build_defenses({"name": ["gaussian_noise", name], "gaussian_noise": {"sigma": 0.1}, name: {"sigma": 0.05}})
    with pytest.raises(ConfigError, match=rf"defense.{name}.noise: true adds the noise a second time"):
        build_defenses({"name": ["gaussian_noise", name], "sigma": 0.1, name: {"noise": True}})
    # meaningful: lambda 0 without noise (CEM off), the same sigma, or the defense's own noise
    build_defenses({"name": name, "lambda": 0, "sigma": 0.0})
    build_defenses({"name": ["gaussian_noise", name], "sigma": 0.1})
    build_defenses({"name": name, "sigma": 0.1, "noise": True})


# -- the refit --------------------------------------------------------------------------------------------
MEANS = torch.tensor([[[0., 0, 0, 0], [12, 12, 0, 0]], [[0, 12, 12, 0], [12, 0, 0, 12]]], dtype=torch.float64)
STDS = torch.tensor([[[0.5, 1.0, 0.2, 0.3], [1.0, 0.4, 0.6, 0.8]], [[0.3, 0.3, 0.9, 0.5], [0.7, 1.2, 0.4, 0.2]]],
                    dtype=torch.float64)
WEIGHTS = torch.tensor([[0.3, 0.7], [0.5, 0.5]], dtype=torch.float64)


def mixture_sample(n_per_class=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs, ys, comps = [], [], []
    for c in range(2):
        comp = torch.multinomial(WEIGHTS[c], n_per_class, replacement=True, generator=g)
        zs.append(MEANS[c][comp] + STDS[c][comp] * torch.randn(n_per_class, 4, generator=g, dtype=torch.float64))
        ys.append(torch.full((n_per_class,), c))
        comps.append(comp)
    return torch.cat(zs), torch.cat(ys), torch.cat(comps)


def test_refit_recovers_the_mixture_and_matches_sklearn_kmeans():
    from sklearn.cluster import KMeans

    z, y, comp = mixture_sample()
    d = make("cem_gmm", 2, 4, k=2)
    d.double()
    d.fit_features(z, y, generator=torch.Generator().manual_seed(1))
    mix = d.mixture()
    assert mix["fitted"].tolist() == [True, True]
    for c in range(2):
        order = torch.argsort(mix["means"][c, :, 0] * 100 + mix["means"][c, :, 1])
        true_order = torch.argsort(MEANS[c, :, 0] * 100 + MEANS[c, :, 1])
        w, mu, var = mix["weights"][c, order], mix["means"][c, order], mix["variances"][c, order]
        assert torch.allclose(w, WEIGHTS[c, true_order], atol=0.03)
        assert torch.allclose(mu, MEANS[c, true_order], atol=0.1)
        # the reference's cluster variance: mean over points and dimensions of the squared distance
        assert torch.allclose(var, (STDS[c, true_order] ** 2).mean(1), rtol=0.1)
        exact = torch.stack([((z[(y == c) & (comp == j)] - mu[i]) ** 2).mean() for i, j in enumerate(true_order)])
        assert torch.allclose(var, exact, rtol=1e-9)
        km = KMeans(2, n_init=4, random_state=0).fit(z[y == c].numpy())
        sk = np.argsort(km.cluster_centers_[:, 0] * 100 + km.cluster_centers_[:, 1])
        assert np.allclose(mu.numpy(), km.cluster_centers_[sk], atol=1e-6)


def test_refit_warm_starts_from_the_previous_centroids():
    """Two blobs per class: whatever order the previous centroids have, the refit keeps it (a fresh k-means++
    start cannot know it), and a drift of the data moves each centroid with its blob."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([5.0, 5.0, 0.0])
    z = torch.cat([a + 0.1 * torch.randn(40, 3, generator=g), b + 0.1 * torch.randn(40, 3, generator=g)])
    y = torch.zeros(80, dtype=torch.long)
    for first, second in [(a, b), (b, a)]:
        d = make("cem_gmm", 1, 3, k=2)
        d.centroids[0] = torch.stack([first, second])
        d.fitted[0] = True
        for seed in range(3):
            d.fit_features(z, y, generator=torch.Generator().manual_seed(seed))
            assert torch.allclose(d.centroids[0, 0], first, atol=0.05)
            assert torch.allclose(d.centroids[0, 1], second, atol=0.05)
        assert d.refit_iterations[-1] <= 2                 # already converged: one update, then no change
        d.fit_features(z + torch.tensor([0.5, 0.0, 0.0]), y, generator=torch.Generator().manual_seed(9))
        assert torch.allclose(d.centroids[0, 0], first + torch.tensor([0.5, 0, 0]), atol=0.05)


def test_refit_is_chunked_and_seeded():
    z, y, _ = mixture_sample(200)
    z = z.float()
    big = make("cem_gmm", 2, 4, k=2)
    big.fit_features(z, y, generator=torch.Generator().manual_seed(3))
    small = make("cem_gmm", 2, 4, k=2, refit_chunk_elements=1)   # one class per chunk
    small.fit_features(z, y, generator=torch.Generator().manual_seed(3))
    def ordered(c):   # chunking changes the order of the k-means++ draws, not the clusters found
        return torch.stack([ci[torch.argsort(ci[:, 0] * 100 + ci[:, 1])] for ci in c])

    assert torch.allclose(ordered(big.centroids), ordered(small.centroids), atol=1e-5)
    again = make("cem_gmm", 2, 4, k=2)
    again.fit_features(z, y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.centroids, big.centroids)


# -- the per-batch losses -------------------------------------------------------------------------------------
def test_reference_loss_on_a_hand_made_case():
    """Two classes with different stored weights and variances (the released code's indexing bug would read
    class 0's for class 1), a cluster and a class missing from the batch, and both branches of a."""
    C, k, D = 3, 2, 2
    cent = torch.tensor([[[0.0, 0.0], [4.0, 0.0]], [[0.0, 4.0], [4.0, 4.0]], [[9.0, 9.0], [8.0, 8.0]]])
    weights = torch.tensor([[0.25, 0.75], [0.6, 0.4], [0.5, 0.5]])
    variances = torch.tensor([[0.02, 0.05], [0.3, 0.001], [0.1, 0.1]])
    class_count = torch.tensor([40.0, 100.0, 10.0])
    fitted = torch.ones(C, dtype=torch.bool)
    z = torch.tensor([[0.1, 0.2], [-0.2, 0.0], [4.3, 0.1],           # class 0: two in cluster 0, one in cluster 1
                      [0.1, 4.1], [0.0, 3.5], [0.2, 4.4], [-0.3, 4.0]])  # class 1: all four in cluster 0
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    sigma, vt, gamma = 0.05, 0.125, 0.01
    tau = vt * sigma ** 2 + gamma
    l_c, st = reference_surrogate(z, y, cent, fitted, weights, variances, class_count, tau, gamma)

    def term(points, c, j):
        n = len(points)
        pi, var_st = float(weights[c, j]), float(variances[c, j])
        a = 10 * n / (pi * float(class_count[c]))
        a = 0.99 if a >= 1 else a
        mean_d2 = sum(((p - cent[c, j]) ** 2).mean().item() for p in points) / n
        v = a * mean_d2 + (1 - a) * var_st
        return pi * max(0.0, math.log(v + gamma) - math.log(tau)), a

    t00, a00 = term(z[:2], 0, 0)     # a = 10*2/(0.25*40) = 2 -> 0.99
    t01, a01 = term(z[2:3], 0, 1)    # a = 10/(0.75*40) = 1/3
    t10, a10 = term(z[3:], 1, 0)     # a = 40/60 = 2/3; cluster (1, 1) absent
    assert (a00, a01) == (0.99, pytest.approx(1 / 3)) and a10 == pytest.approx(2 / 3)
    expected = ((t00 + t01) + t10) / 2                # class 2 absent: the mean is over classes 0 and 1
    assert t00 > 0 and t01 > 0 and t10 > 0
    assert float(l_c) == pytest.approx(expected, rel=1e-6)
    assert float(st["a"][0, 1]) == pytest.approx(1 / 3) and float(st["n"][1, 1]) == 0
    # the gradient reaches the features through the distances to the stored centroids
    zg = z.clone().requires_grad_(True)
    reference_surrogate(zg, y, cent, fitted, weights, variances, class_count, tau, gamma)[0].backward()
    assert torch.isfinite(zg.grad).all() and float(zg.grad.abs().sum()) > 0


@pytest.mark.parametrize("form", ["hinge_diag", "logdet"])
def test_batch_forms_closed_form(form):
    z, y, comp = mixture_sample()
    sigma, vt, gamma = 0.5, 1.0, 1e-3
    tau, s2 = threshold(sigma, vt, gamma), sigma ** 2
    fitted = torch.ones(2, dtype=torch.bool)
    l_c, st = gmm_surrogate(z, y, MEANS, fitted, form, tau, s2, gamma)
    exact = []
    for c in range(2):
        tc = 0.0
        for i in range(2):
            sel = z[(y == c) & (comp == i)]
            pi = len(sel) / int((y == c).sum())
            v = sel.var(0, unbiased=False)
            if form == "hinge_diag":
                tc += pi * torch.relu(torch.log(v + gamma) - math.log(tau)).mean()
            else:
                tc += -pi * math.log(pi) + pi * 0.5 * torch.log1p(v / s2).mean()
        exact.append(tc)
    assert torch.allclose(st["var"][0, 1].double(), z[(y == 0) & (comp == 1)].var(0, unbiased=False), rtol=1e-5)
    assert float(l_c) == pytest.approx(float(sum(exact) / 2), rel=1e-5)
    if form == "logdet":  # reduce=sum is the full log-det: D times the per-dim mean part
        l_sum, _ = gmm_surrogate(z, y, MEANS, fitted, form, tau, s2, gamma, reduce="sum")
        ent = sum(-float(w) * math.log(float(w)) for w in st["pi"].flatten()) / 2
        assert float(l_sum) - ent == pytest.approx(4 * (float(l_c) - ent), rel=1e-5)


def test_term_is_zero_before_the_first_refit():
    d = make("cem_gmm", 3, 4)
    z = torch.randn(12, 4, requires_grad=True)
    assert float(d.loss(step_of(z, torch.arange(12) % 3))["L_C"]) == 0.0


# -- the reference lambda schedule ---------------------------------------------------------------------------
def _tiny_split(seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Sigmoid())
    dec = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    x, y = torch.randn(48, 1, 4, 4), torch.arange(48) % 3
    return enc, dec, x, y


@pytest.mark.parametrize("lr", [0.05, 0.002, 5e-4, 4.1e-4, 4e-4, 1e-4])
def test_reference_schedule_equals_the_two_backward_reference_update(lr):
    """The trainer's single backward of L_task + lambda_t L_C gives every parameter the gradient of the released
    code's update: backward L_C alone, keep the encoder gradient, zero all, backward the task loss, then add
    lambda * g_C * (0.001 / lr if lr >= 4.1e-4 else 1) to the encoder's gradient."""
    enc, dec, x, y = _tiny_split()
    d = make("cem_gmm", 3, 32, sigma=0.05, k=2, **{"lambda": 16.0})
    with torch.no_grad():
        d.fit_features(enc(x) * 0.9 + 0.05, y, generator=torch.Generator().manual_seed(0))
    d.lr = lr
    params = list(enc.parameters()) + list(dec.parameters())

    torch.manual_seed(5)
    z = enc(x)
    logits = dec(d.transform(z, training=True))
    loss = nn.functional.cross_entropy(logits, y) + sum(d.loss(step_of(z, y)).values())
    loss.backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # the literal reference update
    torch.manual_seed(5)
    z = enc(x)
    logits = dec(d.transform(z, training=True))
    total_loss = nn.functional.cross_entropy(logits, y)
    rob_loss, _ = reference_surrogate(z.flatten(1), y, d.centroids, d.fitted, d.mix_weights, d.mix_vars,
                                      d.class_count, d.tau, d.params.gamma)
    rob_loss.backward(retain_graph=True)
    encoder_gradients = [p.grad.clone() for p in enc.parameters()]
    for p in params:
        p.grad = None
    total_loss.backward()
    for p, g in zip(enc.parameters(), encoder_gradients):
        if lr < 0.00041:
            p.grad += 16.0 * g
        else:
            p.grad += 16.0 * g * (0.001 / lr)
    assert float(rob_loss) > 0 and float(sum(g.abs().sum() for g in encoder_gradients)) > 0
    for a, b in zip(ours, [p.grad for p in params]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert d.lambda_t() == pytest.approx(16.0 * reference_lambda_factor(lr))


# -- the non-finite guard -------------------------------------------------------------------------------------
def _poison(d, name):
    if name == "cem_gmm":
        d.mix_vars[0, 0] = float("nan")                 # a NaN in the refit state
    elif name == "cem_slot_cross":
        with torch.no_grad():
            d.surrogate_net.to_k.weight[0, 0] = float("nan")
    else:
        with torch.no_grad():
            d.pool.V.weight[0, 0] = float("nan")


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("where", ["parameter", "feature"])
def test_nan_parameter_or_feature_leaves_every_encoder_gradient_finite(name, where):
    torch.manual_seed(0)
    enc = nn.Linear(6, 8)
    x, y = torch.randn(24, 6), torch.arange(24) % 3
    d = make(name, 3, 8, sigma=0.1, k=2, lambda_schedule="constant") if name == "cem_gmm" else \
        make(name, 3, 8, sigma=0.1, lambda_schedule="constant")
    if name == "cem_gmm":
        with torch.no_grad():
            d.fit_features(enc(x), y, generator=torch.Generator().manual_seed(0))
    z = enc(x)
    if where == "parameter":
        _poison(d, name)
    else:
        z = torch.where(torch.arange(8) == 3, torch.tensor(float("nan")), z)   # one feature dimension turns NaN
    terms = d.loss(step_of(z, y))
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    for p in enc.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for p in d.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    info = d.info()
    assert info["nonfinite_skipped"] >= 1 and info["nonfinite_grads_blocked"] >= 1


@pytest.mark.parametrize("name", ["cem_slot_cross", "cem_gated_pool"])
def test_surrogate_parameter_gradients_are_zeroed_where_not_finite_and_counted_once(name):
    d = make(name, 3, 8, sigma=0.1, lambda_schedule="constant")
    prms = [p for p in d.parameters() if p.requires_grad]
    a, b = prms[0], prms[1]
    poison = torch.ones_like(a)
    poison.view(-1)[0] = float("nan")
    ((a * poison).sum() + (b * float("inf")).sum() + (b * 0).sum()).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert float(a.grad.view(-1)[0]) == 0 and float(a.grad.view(-1)[-1]) == 1       # only the bad entry zeroed
    assert d.info()["nonfinite_grads_blocked"] == 1                                   # one backward pass, counted once
    for p in prms:
        p.grad = None
    (a.sum() + b.sum()).backward()
    assert d.info()["nonfinite_grads_blocked"] == 1                                   # finite: not counted


@pytest.mark.parametrize("name", VARIANTS)
def test_finite_terms_pass_the_guard_unchanged(name):
    torch.manual_seed(0)
    d = make(name, 3, 8, sigma=0.1, k=2, lambda_schedule="constant") if name == "cem_gmm" else \
        make(name, 3, 8, sigma=0.1, lambda_schedule="constant")
    z = torch.rand(24, 8, requires_grad=True)
    y = torch.arange(24) % 3
    if name == "cem_gmm":
        d.fit_features(z.detach(), y, generator=torch.Generator().manual_seed(0))
    terms = d.loss(step_of(z, y))
    sum(terms.values()).backward()
    g = z.grad.clone()
    z.grad = None
    raw, extra = d.surrogate(z, y, 0)
    (d.params.lambda_ * raw + sum(extra.values())).backward()
    assert torch.allclose(g, z.grad) and float(g.abs().sum()) > 0
    assert d.info()["nonfinite_skipped"] == 0 and d.info()["nonfinite_grads_blocked"] == 0


# -- float32 statistics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_statistics_are_float32_two_pass_for_reduced_precision_features(dtype):
    g = torch.Generator().manual_seed(0)
    z = (0.7 + 0.01 * torch.randn(256, 16, generator=g)).to(dtype)     # sigmoid-range features, small spread
    y = torch.arange(256) % 2
    w = class_masks(y, 2).unsqueeze(1)
    mass, mean, var = component_stats(z, w, y)
    assert var.dtype == torch.float32
    z64 = z.double()
    for c in range(2):
        true = z64[y == c].var(0, unbiased=False)
        assert torch.allclose(var[c, 0].double(), true, rtol=1e-3), (dtype, c)
    _, _, var2 = weighted_stats(z, class_masks(y, 2))
    assert torch.allclose(var2, var[:, 0], rtol=1e-4)


# -- the attention surrogates -------------------------------------------------------------------------------
def test_slot_cross_tokens_query_slots_and_is_permutation_invariant():
    torch.manual_seed(0)
    d = make("cem_slot_cross", 4, 16, sigma=0.1)
    net = d.surrogate_net
    z, y = torch.randn(40, 16), torch.randint(0, 4, (40,))
    perm = torch.randperm(40)
    r, slots, refined = net(z, y, class_masks(y, 4))
    r2, slots2, refined2 = net(z[perm], y[perm], class_masks(y[perm], 4))
    assert torch.allclose(r[:, :, perm], r2, atol=1e-5) and torch.allclose(refined[perm], refined2, atol=1e-5)
    # one refined vector per *token* (the tokens are the queries), the slots are the keys/values
    assert refined.shape == (40, d.params.slot_dim) and slots.shape == (4, d.params.slots, d.params.slot_dim)
    k, _ = net.tokens(z)
    _, att = net.cross(k, y, slots)
    assert att.shape == (40, d.params.slots) and torch.allclose(att.sum(1), torch.ones(40), atol=1e-5)
    # the tanh gates scale the cross-attention and the FFN: closed gates give back the plain tokens exactly
    assert d.params.gate_init == 0.1 and float((refined - k).detach().norm()) > 0
    with torch.no_grad():
        net.alpha_attn.zero_()
        net.alpha_ffn.zero_()
    assert torch.equal(net.cross(k, y, slots)[0], k)
    # assignments: a distribution over the own class's slots, zero for other classes
    assert torch.allclose(r.sum((0, 1)), torch.ones(40), atol=1e-5)
    assert float(r[(y.unsqueeze(0) != torch.arange(4).unsqueeze(1)).unsqueeze(1).expand_as(r)].abs().sum()) == 0


def test_slot_cross_snr_gate_is_relative_to_the_noise_not_the_mean():
    """Adding a constant to every feature changes neither spread nor noise: the term must not change (a gate on
    var / mu^2 would); features whose spread lies far below the noise get (almost) no penalty from the gate."""
    torch.manual_seed(0)
    d = make("cem_slot_cross", 2, 8, sigma=0.1, lambda_schedule="constant", dim_gate=False)
    z, y = 0.5 * torch.randn(32, 8), torch.arange(32) % 2
    base = float(d.loss(step_of(z, y))["L_C"])
    shifted = float(d.loss(step_of(z + 3.0, y))["L_C"])
    assert base > 0 and shifted == pytest.approx(base, rel=1e-4)
    quiet = make("cem_slot_cross", 2, 8, sigma=0.1, lambda_schedule="constant", dim_gate=False, var_threshold=1e-4,
                 gamma=1e-6, margin=-5.0)
    zq = 0.001 * torch.randn(32, 8)                   # spread 1e-6 << sigma^2 = 1e-2
    on = float(quiet.loss(step_of(zq, y))["L_C"])
    off = float(make("cem_slot_cross", 2, 8, sigma=0.1, lambda_schedule="constant", dim_gate=False,
                     var_threshold=1e-4, gamma=1e-6, margin=-5.0, snr_gate=False).loss(step_of(zq, y))["L_C"])
    assert off > 0.1 and on < 1e-3 * off


def test_slot_cross_schedule_and_switches():
    z, y = torch.randn(16, 8) * 3, torch.tensor([0] * 15 + [1])    # class 1: one sample (class and SNR gates)
    d = make("cem_slot_cross", 2, 8, sigma=0.1, warmup_epochs=3, shutoff_epoch=5, shutoff_steps=100)
    assert set(d.loss(step_of(z, y, epoch=2, step=10))) == {"fit"}      # warm-up: the surrogate still fits
    # early shut-off: the first 100 steps from the first active step (here 250), not from step 0
    assert float(d.loss(step_of(z, y, epoch=3, step=250))["L_C"]) == 0.0
    assert float(d.loss(step_of(z, y, epoch=3, step=349))["L_C"]) == 0.0
    assert float(d.loss(step_of(z, y, epoch=3, step=350))["L_C"]) > 0
    assert d.info()["first_active_step"] == 250 and d.info()["shutoff_until_step"] == 350
    assert "L_C" not in d.loss(step_of(z, y, epoch=5, step=600))
    with torch.no_grad():
        d.surrogate_net.alpha_attn.fill_(3.0)                            # gates widely open: off
    assert float(d.loss(step_of(z, y, epoch=3, step=500))["L_C"]) == 0.0
    assert d.info()["gate_open_steps"] == 1
    def value(**params):
        torch.manual_seed(0)
        return float(make("cem_slot_cross", 2, 8, sigma=0.1, **params).loss(step_of(z, y))["L_C"])

    # each switch changes the term (the class gate is seen once the SNR gate stops hiding the 1-sample class)
    for switch, base in [({"dim_gate": False}, {}), ({"snr_gate": False}, {}), ({"mass_gate": False}, {}),
                         ({"mass_renorm": False}, {}), ({"beta": 5.0}, {}),
                         ({"class_gate": False, "snr_gate": False}, {"snr_gate": False})]:
        v, b = value(**switch), value(**base)
        assert v > 0 and math.isfinite(v) and abs(v - b) > 1e-4 * b, (switch, v, b)


def _tiny_trainer(defense_spec, epochs, ckpt):
    from splitveil import DataConfig, ModelConfig, TrainConfig, Trainer, build_data, build_split_model
    data = build_data(DataConfig(name="digits", train_size=256, test_size=64, aux_size=64), seed=0)
    torch.manual_seed(0)
    model = build_split_model(ModelConfig(name="vgg11_bn", cut=1, width=0.125), data.num_classes, data.image_shape)
    stack = build_defenses(defense_spec)
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer="sgd", lr=0.05, schedule="none", precision="fp32")
    return Trainer(model, stack, data, cfg, torch.device("cpu"), ckpt_path=ckpt, show_progress=False), stack


def test_slot_cross_early_shutoff_counts_from_the_first_active_step_in_a_real_trainer(tmp_path):
    """Through the Trainer's own step and epoch counters (4 steps per epoch): warm-up 2 epochs, so the term is
    first active at step 8; the shut-off mutes steps 8-13 and the term is on from step 14, also across a resume
    from the checkpoint written after epoch 3 (a shut-off counted from step 0 would be over before step 8)."""
    spec = {"name": ["gaussian_noise", "cem_slot_cross"], "sigma": 0.05,
            "cem_slot_cross": {"warmup_epochs": 2, "shutoff_steps": 6, "lambda_schedule": "constant"}}
    seen = []

    def spy(d):
        orig = d.loss

        def loss(step):
            out = orig(step)
            seen.append((step.epoch, step.step, float(out["L_C"]) if "L_C" in out else None))
            return out
        d.loss = loss

    ckpt = tmp_path / "ckpt.pt"
    trainer, stack = _tiny_trainer(spec, 3, ckpt)
    spy(stack.get("cem_slot_cross"))
    trainer.fit()
    trainer, stack = _tiny_trainer(spec, 5, ckpt)        # resume: epochs 4 and 5
    d = stack.get("cem_slot_cross")
    spy(d)
    trainer.fit(resume=True)
    assert [s for _, s, _ in seen] == list(range(20))
    assert all(v is None for e, _, v in seen if e < 2)                  # warm-up: no term
    assert all(v == 0.0 for _, s, v in seen if 8 <= s < 14)             # shut-off: 6 active steps
    assert all(v is not None and v > 0 for _, s, v in seen if s >= 14)
    info = d.info()
    assert (info["first_active_step"], info["shutoff_until_step"]) == (8, 14)
    assert [h["epoch"] for h in info["tanh_alpha_per_epoch"]] == [4, 5]   # after the resume
    assert info["tanh_alpha_init"] == pytest.approx(math.tanh(0.1))
    assert info["tanh_alpha_attn_end"] == pytest.approx(float(torch.tanh(d.surrogate_net.alpha_attn)))


def test_slot_attention_softmax_is_over_the_slots():
    """Slot Attention's competition: each token's attention is a distribution over the slots (softmax over
    slots), zero outside its class; a softmax over the tokens would give each slot a distribution instead."""
    torch.manual_seed(0)
    d = make("cem_slot_cross", 3, 12, sigma=0.1)
    z, y = torch.randn(30, 12), torch.arange(30) % 3
    mask = class_masks(y, 3)
    k, v = d.surrogate_net.tokens(z)
    _, attn = d.surrogate_net.slot_attention(k, v, mask, return_attn=True)
    assert attn.shape == (3, d.params.slots, 30)
    assert torch.allclose(attn.sum(1), mask, atol=1e-5)
    assert not torch.allclose(attn.sum(2), torch.ones(3, d.params.slots), atol=1e-2)


def test_slot_cross_assignments_come_from_the_cross_attention_output():
    """r_ms = softmax_s(beta cos(y_m, slot_s)) with y_m the gated cross-attention's output: changing the
    cross-attention's output projection changes the assignments, and r equals that formula on the refined tokens."""
    torch.manual_seed(0)
    d = make("cem_slot_cross", 2, 12, sigma=0.1)
    net = d.surrogate_net
    z, y = torch.randn(24, 12), torch.arange(24) % 2
    mask = class_masks(y, 2)
    with torch.no_grad():
        net.alpha_attn.fill_(1.0)
        r, slots, refined = net(z, y, mask)
        sim = (nn.functional.normalize(refined, dim=-1).unsqueeze(1)
               * nn.functional.normalize(slots, dim=-1)[y]).sum(-1)
        expect = torch.softmax(d.params.beta * sim, dim=1).t().unsqueeze(0) * mask.unsqueeze(1)
        assert torch.allclose(r, expect, atol=1e-6)
        net.xo.weight.mul_(-3.0)
        r2, slots2, _ = net(z, y, mask)
    assert torch.equal(slots, slots2)                                   # the slots do not see xo
    assert float((r2 - r).abs().max()) > 1e-2


def test_slot_cross_dim_gate_receives_the_reversed_penalty_gradient():
    """In the default ``fit`` mode the per-dim gate maximises the penalty (its gradient is exactly minus the
    plain one) while the encoder's features receive the plain gradient."""
    torch.manual_seed(0)
    d = make("cem_slot_cross", 2, 8, sigma=0.05, lambda_schedule="constant", fit_weight=0.0, **{"lambda": 1.0})
    z, y = (0.5 * torch.randn(32, 8)).requires_grad_(True), torch.arange(32) % 2
    d.loss(step_of(z, y))["L_C"].backward()
    gate = dict(d.surrogate_net.gate_mlp.named_parameters())
    got = {n: p.grad.clone() for n, p in gate.items()}
    z_grad = z.grad.clone()
    d.zero_grad()
    zz = z.detach().clone().requires_grad_(True)
    mask = class_masks(y, 2)
    r, _, _ = d.surrogate_net(zz.detach(), y, mask)
    plain, _ = d.penalty(zz, y, r.detach(), mask, reverse_gate=False)
    plain.backward()
    assert float(plain) > 0
    for n, p in gate.items():
        assert float(p.grad.abs().sum()) > 0, n
        assert torch.allclose(got[n], -p.grad, atol=1e-7), n
    assert torch.allclose(z_grad, zz.grad, atol=1e-6)


def test_gated_pool_attention_maximises_the_term():
    """The attention network receives the negated gradient of L_C (it seeks the weighting under which the
    class looks most spread); the encoder receives the plain gradient."""
    torch.manual_seed(0)
    d = make("cem_gated_pool", 3, 6, sigma=0.1, lambda_schedule="constant", **{"lambda": 1.0})
    z, y = torch.randn(30, 6, requires_grad=True), torch.arange(30) % 3
    d.loss(step_of(z, y))["L_C"].backward()
    got = {n: p.grad.clone() for n, p in d.pool.named_parameters() if p.grad is not None}
    z_grad = z.grad.clone()
    d.zero_grad()
    zz = z.detach().clone().requires_grad_(True)
    mask = class_masks(y, 3)
    plain, _ = pooled_hinge(zz, y, d.pool.weights(zz.detach(), mask), mask, d.tau, d.params.gamma)
    plain.backward()
    assert float(plain) > 0 and len(got) >= 4
    for n, p in d.pool.named_parameters():
        if p.grad is not None and float(p.grad.abs().sum()) > 0:
            assert torch.allclose(got[n], -p.grad, atol=1e-6), n
    assert torch.allclose(z_grad, zz.grad, atol=1e-6)
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x) * 2).sum().backward()
    assert x.grad.tolist() == [-2.0, -2.0, -2.0]


def test_gated_pool_loss_term_by_term_against_the_slides():
    """The slides' gated attention pooling, computed by hand in float64 with the module's own weights:
    a_m = softmax_m(w^T [tanh(V x_m) * sigmoid(U x_m)]) over the class's samples (x_m = LayerNorm(z_m) for the
    scores), mu = sum a_m z_m, var = sum a_m (z_m - mu)^2 per dimension, L_c = mean_d max(0, log(var_d + gamma)
    - log tau), tau = var_threshold * sigma^2 + gamma, L_C = mean over the classes present, weighted by lambda.
    The spreads straddle tau, so a swapped sign, a dropped hinge, gamma, mu or the square of sigma all change it."""
    torch.manual_seed(0)
    sigma, vt, gamma, lam = 0.4, 0.125, 0.01, 3.0
    d = make("cem_gated_pool", 3, 6, sigma=sigma, var_threshold=vt, gamma=gamma, lambda_schedule="constant",
             **{"lambda": lam})
    with torch.no_grad():
        for prm in d.pool.parameters():
            prm.add_(0.3 * torch.randn_like(prm))         # non-trivial LayerNorm affine and biases
    y = torch.tensor([0] * 7 + [2] * 5)                # class 1 absent: not averaged in
    spread = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.4, 0.8])
    z = 1.0 + spread * torch.randn(12, 6)
    got = float(d.loss(step_of(z, y))["L_C"])

    pool, z64 = d.pool.double(), z.double()
    tau = vt * sigma ** 2 + gamma
    terms = []
    for c in (0, 2):
        zc = z64[y == c]
        x = nn.functional.layer_norm(zc, (6,), pool.norm.weight, pool.norm.bias, pool.norm.eps)
        e = pool.w(torch.tanh(pool.V(x)) * torch.sigmoid(pool.U(x))).squeeze(-1)
        a = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
        mu = (a.unsqueeze(1) * zc).sum(0)
        var = (a.unsqueeze(1) * (zc - mu) ** 2).sum(0)
        hinge = torch.clamp(torch.log(var + gamma) - math.log(tau), min=0)
        assert 0 < int((hinge > 0).sum()) < 6            # some dimensions above tau, some below
        terms.append(float(hinge.mean()))
    assert got == pytest.approx(lam * sum(terms) / 2, rel=1e-5)


def test_gated_pool_warmup_is_five_epochs():
    d = make("cem_gated_pool", 2, 4, sigma=0.1, warmup_epochs=5)
    z, y = torch.randn(16, 4), torch.arange(16) % 2
    assert build_defenses({"name": ["gaussian_noise", "cem_gated_pool"], "sigma": 0.1}).get(
        "cem_gated_pool").params.warmup_epochs == 5
    assert all(d.loss(step_of(z, y, epoch=e)) == {} for e in range(5))   # no term, no surrogate work
    assert float(d.loss(step_of(z, y, epoch=5))["L_C"]) > 0


# -- contraction, not shrinking -------------------------------------------------------------------------------
def _toy_data():
    """Two classes, two modes each: class means differ along dims 0-1 only, the within-class spread lies in
    dims 2-3 only, so an encoder can contract the classes without touching what separates them."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(256) % 2
    mode = (torch.arange(256) // 2) % 2
    x = torch.zeros(256, 4)
    x[:, 0] = torch.where(y == 0, -1.5, 1.5)
    x[:, 1] = torch.where(y == 0, 1.0, -1.0)
    x[:, 2] = torch.where(mode == 0, -0.4, 0.4) + 0.15 * torch.randn(256, generator=g)
    x[:, 3] = 0.3 * torch.randn(256, generator=g)
    return x, y


@pytest.mark.parametrize("name", VARIANTS)
def test_surrogate_rewards_contraction_not_shrinking(name):
    """Trained on its term alone, the encoder must raise the scale-free between/within class spread ratio
    (a surrogate like mean(z^2) shrinks the dominant, class-separating directions and lowers it)."""
    x, y = _toy_data()
    torch.manual_seed(0)
    enc = nn.Linear(4, 4)
    with torch.no_grad():
        enc.weight.copy_(torch.eye(4))
        enc.bias.zero_()
    extra = {"k": 2} if name == "cem_gmm" else {}
    d = make(name, 2, 4, sigma=0.05, lambda_schedule="constant", **{"lambda": 1.0}, **extra)
    with torch.no_grad():
        before = feature_diagnostics(enc(x), y, 2, 0.05, d.tau)
    opt = torch.optim.Adam(list(enc.parameters()) + d.trainable_parameters(), lr=0.01)
    for i in range(40):
        if name == "cem_gmm" and i % 10 == 0:
            with torch.no_grad():
                d.fit_features(enc(x), y, generator=torch.Generator().manual_seed(i))
        loss = sum(d.loss(step_of(enc(x), y)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = feature_diagnostics(enc(x), y, 2, 0.05, d.tau)
    assert after["between_within_ratio"] > 1.3 * before["between_within_ratio"], (before, after)
    assert after["within_class_var"] < before["within_class_var"]


def test_feature_diagnostics_separate_shrinking_from_contraction():
    x, y = _toy_data()
    d0 = feature_diagnostics(x, y, 2, 0.05, 0.01)
    d_half = feature_diagnostics(0.5 * x, y, 2, 0.05, 0.01)
    assert d_half["std_z"] == pytest.approx(0.5 * d0["std_z"], rel=1e-5)
    assert d_half["snr"] == pytest.approx(d_half["std_z"] / 0.05)
    assert d_half["between_within_ratio"] == pytest.approx(d0["between_within_ratio"], rel=1e-4)
    contracted = x.clone()
    contracted[:, 2:] *= 0.5
    assert feature_diagnostics(contracted, y, 2, 0.05, 0.01)["between_within_ratio"] == \
        pytest.approx(4 * d0["between_within_ratio"], rel=2e-3)   # (class means differ slightly in dims 2-3)
    # within-class spread: dims 2-3 only; between: dims 0-1 only (per-dimension means over the 4 dims)
    assert d0["within_class_var"] == pytest.approx(float(x[:, 2:].var(0, unbiased=False).sum() / 4), rel=0.05)
    assert d0["between_class_var"] == pytest.approx((1.5 ** 2 + 1.0) / 4, rel=1e-3)
    cent = torch.stack([torch.stack([x[(y == c) & (x[:, 2] < 0)].mean(0), x[(y == c) & (x[:, 2] >= 0)].mean(0)])
                        for c in range(2)])
    dc = feature_diagnostics(x, y, 2, 0.05, 0.01, cent)
    assert dc["within_cluster_var"] < 0.5 * dc["within_class_var"]
    assert dc["within_cluster_var_over_tau"] == pytest.approx(dc["within_cluster_var"] / 0.01)


# -- device, composition, end to end ----------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", VARIANTS)
def test_training_step_has_no_host_sync_on_cuda(name):
    """The CEM term (reference lambda schedule included) and its backward run without a device-to-host copy."""
    d = make(name, 4, 32, sigma=0.1).to("cuda")
    d.lr = 0.05
    if name == "cem_gmm":
        d.fit_features(torch.rand(64, 32, device="cuda"), torch.arange(64, device="cuda") % 4,
                       generator=torch.Generator(device="cuda").manual_seed(0))
    z = torch.rand(64, 32, device="cuda", requires_grad=True)
    y = torch.arange(64, device="cuda") % 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = d.loss(step_of(z, y))
        sum(terms.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(z.grad).all()


def test_own_noise_option():
    d = make("cem_gated_pool", 2, 4, sigma=0.5, noise=True)
    z = torch.zeros(1000, 4)
    assert float(d.transform(z, training=False).std()) == pytest.approx(0.5, rel=0.1)
    assert d.noise_std() == 0.5
    assert build_defenses({"name": "cem_gated_pool", "lambda": 0}).get("cem_gated_pool").noise_std() is None


BASELINES = [n for n in ["dropout", "nopeek", "patrol", "noise_arl", "label_smoothing"] if n in DEFENSES]


@pytest.mark.slow
def test_cem_variants_end_to_end(tmp_path, data_root):
    """`splitveil run` with each CEM variant (noise + CEM, the reference bottleneck and sigmoid) writes a finished
    record with the feature-scale diagnostics."""
    from splitveil.experiments.run import run_experiment

    fast = {"data.train_size": 128, "data.test_size": 32, "data.aux_size": 64, "train.epochs": 2,
            "model.cut": 2, "model.bottleneck_channels": 4, "model.bottleneck_norm": False,
            "model.bottleneck_act": "none", "model.sigmoid": True,
            "attacks.inverse_network.epochs": 1, "defense.sigma": 0.05, "defense.lambda": 1.0}
    for name in VARIANTS:
        over = {"defense.name": f"[gaussian_noise, {name}]"}
        if name == "cem_slot_cross":
            over["defense.cem_slot_cross"] = {"warmup_epochs": 0, "shutoff_steps": 0}
        if name == "cem_gated_pool":
            over["defense.cem_gated_pool"] = {"warmup_epochs": 0}
        m = run_experiment(tiny_config(**fast, **over), tmp_path)
        assert m["status"] == "finished"
        assert m["history"][-1][f"loss.{name}.L_C"] > 0, name
        info = m["defense_info"][name]
        lr_last = m["history"][-2]["lr"]     # the learning rate the last epoch trained with (cosine schedule)
        assert info["nonfinite_skipped"] == 0 and info["lambda_last_epoch"] == pytest.approx(0.001 / lr_last)
        diag = m["defense_diagnostics"][name]
        assert 0 < diag["std_z"] < 0.5 and diag["snr"] == pytest.approx(diag["std_z"] / 0.05)
        assert diag["between_within_ratio"] > 0 and diag["within_cluster_var_over_tau"] > 0
        assert m["attacks"]["inverse_network"]["mse"] > 0
        assert info["tau"] == pytest.approx(0.125 * 0.05 ** 2 + 0.01)


@pytest.mark.slow
def test_cem_composes_with_baselines(tmp_path, data_root):
    """CEM as a plug-in on top of the baseline defenses: one run stacks every baseline and all three CEM
    variants; it trains with every loss term and records every defense."""
    from splitveil.experiments.run import run_experiment

    fast = {"data.train_size": 128, "data.test_size": 32, "data.aux_size": 32, "train.epochs": 2,
            "attacks": {}, "defense.sigma": 0.1,   # sigma: shared by the noise and every CEM variant by design
            # warmup_epochs is declared by every CEM variant: a flat key would be ambiguous, so per variant
            **{f"defense.{v}": {"warmup_epochs": 0} for v in VARIANTS},
            "defense.cem_slot_cross": {"shutoff_steps": 0, "warmup_epochs": 0}}
    names = ["gaussian_noise", *BASELINES, *VARIANTS]
    m = run_experiment(tiny_config(**fast, **{"defense.name": "[" + ", ".join(names) + "]"}), tmp_path)
    assert m["status"] == "finished"
    assert set(m["defense_info"]) == set(names)
    last = m["history"][-1]
    for cem in VARIANTS:
        assert last[f"loss.{cem}.L_C"] >= 0 and m["defense_info"][cem]["nonfinite_skipped"] == 0
    if "nopeek" in BASELINES:
        assert any(k.startswith("loss.nopeek.") for k in last)


def test_cem_reference_attacker_setting_and_the_paper_config():
    """The reference's attacker as named attacks (inference-time, 8 blocks x 64 channels, batch 256, last epoch,
    50 epochs; the GAN warm-started from such an inverse network), used by the Table-1 config (fp32 training)."""
    from splitveil.attacks import ATTACKS
    from splitveil.attacks.cem_reference import CEM_REFERENCE
    from splitveil.experiments.config import load_config
    from splitveil.params import coerce

    inv = coerce(ATTACKS.get("inverse_network_cem").Params, {})
    gan = coerce(ATTACKS.get("gan_cem").Params, {})
    for k, v in CEM_REFERENCE.items():
        assert getattr(inv, k) == v, k
        if k != "epochs":
            assert getattr(gan, k) == v, k
    assert gan.init_epochs == 50 and gan.adv_weight > 0
    assert (CEM_REFERENCE["mode"], CEM_REFERENCE["blocks"], CEM_REFERENCE["channels"], CEM_REFERENCE["batch_size"],
            CEM_REFERENCE["select"]) == ("inference-time", 8, 64, 256, "last")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "cifar10_vgg11_cem_paper.yaml")
    assert {"inverse_network_cem", "gan_cem"} <= set(cfg.attacks.names)
    assert cfg.train.precision == "fp32" and cfg.data.root.endswith("shared/data")
