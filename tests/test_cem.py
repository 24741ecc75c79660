"""CEM defenses (issue 4): the GMM surrogate against closed forms and scikit-learn, the attention surrogates'
invariances and edge cases, their effect on the within-class spread, composition, and end-to-end runs."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from splitveil.defenses import DEFENSES, StepContext, build_defenses
from splitveil.defenses.cem_common import grad_reverse, threshold, weighted_stats
from splitveil.defenses.cem_gmm import gmm_surrogate
from splitveil.metrics import mean_intra_class_radius
from splitveil.params import ConfigError

from conftest import tiny_config

VARIANTS = ["cem_gmm", "cem_slot_cross", "cem_gated_pool"]


def make(name, num_classes, dim, **params):
    d = build_defenses({"name": name, **params}).get(name)
    d.allocate(num_classes, dim)
    return d


def step_of(z, y, epoch=0):
    n = len(y)
    return StepContext(x=torch.zeros(n, 1), y=y, z=z, z_sent=z, logits=torch.zeros(n, 2), epoch=epoch, step=0)


# -- a known Gaussian mixture ------------------------------------------------------------------------------
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


def test_threshold_and_keyword_param_routing():
    assert threshold(0.1, 2.0, 1e-3) == pytest.approx(2 * 0.01 + 1e-3)
    stack = build_defenses({"name": ["gaussian_noise", "cem_gmm"], "sigma": 0.2, "lambda": 0.5})
    assert stack.get("gaussian_noise").params.sigma == 0.2
    assert stack.get("cem_gmm").params.sigma == 0.2 and stack.get("cem_gmm").params.lambda_ == 0.5
    scoped = build_defenses({"name": ["gaussian_noise", "cem_slot_cross"], "sigma": 0.1,
                             "cem_slot_cross": {"lambda": 2.0, "slots": 4}}).get("cem_slot_cross")
    assert (scoped.params.lambda_, scoped.params.slots) == (2.0, 4)
    with pytest.raises(ConfigError, match="lambda"):
        build_defenses({"name": "cem_gated_pool", "lambda": -1})
    with pytest.raises(ConfigError, match="heads"):
        build_defenses({"name": "cem_slot_cross", "slot_dim": 10, "heads": 4})


def test_gmm_refit_matches_truth_and_sklearn():
    from sklearn.mixture import GaussianMixture

    z, y, _ = mixture_sample()
    d = make("cem_gmm", 2, 4, k=2, bank_size=3000, kmeans_iters=30)
    d.double()
    d.fit_features(z, y, generator=torch.Generator().manual_seed(1))
    mix = d.mixture()
    for c in range(2):
        order = torch.argsort(mix["means"][c, :, 0] * 100 + mix["means"][c, :, 1])
        true_order = torch.argsort(MEANS[c, :, 0] * 100 + MEANS[c, :, 1])
        w, mu, var = mix["weights"][c, order], mix["means"][c, order], mix["variances"][c, order]
        # against the generating mixture (sampling error of 3000 points)
        assert torch.allclose(w, WEIGHTS[c, true_order], atol=0.03)
        assert torch.allclose(mu, MEANS[c, true_order], atol=0.1)
        assert torch.allclose(var, STDS[c, true_order] ** 2, rtol=0.1)
        # against scikit-learn's EM fit (diagonal covariances) on the same data
        gm = GaussianMixture(2, covariance_type="diag", random_state=0, reg_covar=1e-9).fit(z[y == c].numpy())
        sk = np.argsort(gm.means_[:, 0] * 100 + gm.means_[:, 1])
        assert np.allclose(w.numpy(), gm.weights_[sk], atol=1e-3)
        assert np.allclose(mu.numpy(), gm.means_[sk], atol=1e-3)
        assert np.allclose(var.numpy(), gm.covariances_[sk], rtol=1e-2)


@pytest.mark.parametrize("form", ["hinge", "logdet"])
def test_gmm_surrogate_closed_form(form):
    z, y, comp = mixture_sample()
    sigma, vt, gamma = 0.5, 1.0, 1e-3
    tau, s2 = threshold(sigma, vt, gamma), sigma ** 2 + gamma
    fitted = torch.ones(2, dtype=torch.bool)
    l_c, st = gmm_surrogate(z, y, MEANS, fitted, form, tau, s2, gamma)
    # exact: the same formula evaluated directly from the samples of each (class, component)
    exact, closed = [], []
    for c in range(2):
        tc, tcl = 0.0, 0.0
        for i in range(2):
            sel = z[(y == c) & (comp == i)]
            pi = len(sel) / int((y == c).sum())
            v = sel.var(0, unbiased=False)
            v_true = STDS[c, i] ** 2
            if form == "hinge":
                f = lambda var: torch.relu(torch.log(var + gamma) - math.log(tau)).mean()  # noqa: E731
                tc += pi * f(v)
                tcl += WEIGHTS[c, i] * f(v_true)
            else:
                f = lambda p, var: -p * math.log(p) + p * 0.5 * torch.log1p(var / s2).mean()  # noqa: E731
                tc += f(pi, v)
                tcl += f(float(WEIGHTS[c, i]), v_true)
        exact.append(tc)
        closed.append(tcl)
    assert torch.allclose(st["var"][0, 1], z[(y == 0) & (comp == 1)].var(0, unbiased=False), rtol=1e-9)
    assert float(l_c) == pytest.approx(float(sum(exact) / 2), rel=1e-9)
    # against the generating mixture's closed form: sampling error only
    assert float(l_c) == pytest.approx(float(sum(closed) / 2), rel=0.03)
    if form == "logdet":  # reduce=sum is the full log-det: D times the per-dim mean part
        l_sum, _ = gmm_surrogate(z, y, MEANS, fitted, form, tau, s2, gamma, reduce="sum")
        ent = sum(-float(w) * math.log(float(w)) for w in st["pi"].flatten()) / 2
        assert float(l_sum) - ent == pytest.approx(4 * (float(l_c) - ent), rel=1e-9)


def test_gmm_gathers_on_device_ring_buffer_and_warm_starts():
    d = make("cem_gmm", 3, 2, k=1, bank_size=4)
    z = torch.arange(12.0).view(6, 2)
    y = torch.tensor([0, 0, 0, 1, 0, 0])
    d.gather(z, y)
    assert d.bank_count.tolist() == [5, 1, 0]
    # class 0 wrote 5 rows into 4 slots: the 5th overwrote the 1st
    assert d.bank[0].tolist() == [[10, 11], [2, 3], [4, 5], [8, 9]]
    d.refit()
    assert d.fitted.tolist() == [True, True, False] and d.bank_count.tolist() == [0, 0, 0]
    assert d.centroids[0, 0].tolist() == [6.0, 7.0] and d.centroids[1, 0].tolist() == [6.0, 7.0]
    # before any refit the term is 0; a class not yet fitted does not count
    l_c, _ = gmm_surrogate(z, torch.full((6,), 2), d.centroids, d.fitted, "hinge", 0.01, 0.01, 1e-3)
    assert float(l_c) == 0.0


def test_reference_optimisation_order_equals_joint_backward():
    """Backpropagating L_C to the encoder first and adding the task gradient afterwards (the reference's
    order) gives the same encoder gradient as one backward of L_task + lambda L_C (what the trainer does)."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(6, 4), nn.Linear(4, 3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    d = make("cem_gated_pool", 3, 4, sigma=0.1, **{"lambda": 0.7})

    def terms():
        z = enc(x)
        return nn.functional.cross_entropy(dec(z), y), d.loss(step_of(z, y))["L_C"]

    task, lc = terms()
    (task + lc).backward()
    joint = enc.weight.grad.clone()
    enc.zero_grad()
    task, lc = terms()
    g_c = torch.autograd.grad(lc, enc.weight, retain_graph=True)[0]
    task.backward()
    assert torch.allclose(joint, enc.weight.grad + g_c, atol=1e-6)
    assert dec.weight.grad is not None and not torch.allclose(g_c, torch.zeros_like(g_c))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", VARIANTS)
def test_training_step_has_no_host_sync_on_cuda(name):
    """The CEM term, its backward and the GMM's gathering run without a device-to-host copy."""
    d = make(name, 4, 32, sigma=0.1)
    d.to("cuda")
    if name == "cem_gmm":
        d.fit_features(torch.randn(64, 32, device="cuda"), torch.arange(64, device="cuda") % 4)
    z = torch.randn(64, 32, device="cuda", requires_grad=True)
    y = torch.arange(64, device="cuda") % 4
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sum(d.loss(step_of(z, y)).values()).backward()
        if name == "cem_gmm":
            d.gather(z.detach(), y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(z.grad).all()


# -- the attention surrogates ----------------------------------------------------------------------------
def test_slot_module_permutation_invariant_and_gates_start_closed():
    torch.manual_seed(0)
    d = make("cem_slot_cross", 4, 16, sigma=0.1)
    z, y = torch.randn(40, 16), torch.randint(0, 4, (40,))
    perm = torch.randperm(40)
    from splitveil.defenses.cem_common import class_masks

    r, plain, refined = d.surrogate_net(z, class_masks(y, 4))
    r2, plain2, refined2 = d.surrogate_net(z[perm], class_masks(y[perm], 4))
    assert torch.allclose(r[:, :, perm], r2, atol=1e-5)
    assert torch.allclose(refined, refined2, atol=1e-5)
    l1, l2 = d.loss(step_of(z, y))["L_C"], d.loss(step_of(z[perm], y[perm]))["L_C"]
    assert float(l1.detach()) == pytest.approx(float(l2.detach()), rel=1e-5)
    # tanh gates at gate_init=0.01: the refined slots are within a few percent of the plain slots ...
    rel = (refined - plain).norm() / plain.norm()
    assert 0 < float(rel.detach()) < 0.05
    # ... and exactly equal to them with gates at 0
    with torch.no_grad():
        d.surrogate_net.alpha_attn.zero_()
        d.surrogate_net.alpha_ffn.zero_()
    _, plain0, refined0 = d.surrogate_net(z, class_masks(y, 4))
    assert torch.equal(plain0, refined0)
    # soft assignments are distributions over slots for present samples
    assert torch.allclose(r.sum((0, 1)), torch.ones(40), atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("case", ["single_sample", "missing_class", "constant"])
def test_finite_on_degenerate_batches(name, case):
    torch.manual_seed(0)
    d = make(name, 5, 12, sigma=0.1, k=2) if name == "cem_gmm" else make(name, 5, 12, sigma=0.1)
    z = torch.randn(20, 12, requires_grad=True)
    y = torch.tensor([0] * 10 + [1] * 9 + [2])            # class 2: one sample; classes 3, 4 missing
    if case == "missing_class":
        y = torch.tensor([0] * 20)
    if case == "constant":
        z = torch.full((20, 12), 0.7, requires_grad=True)
    if name == "cem_gmm":
        d.fit_features(torch.randn(60, 12), torch.arange(60) % 5)
    terms = d.loss(step_of(z, y))
    assert "L_C" in terms
    total = sum(terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(z.grad).all()
    assert int(d.nonfinite_skipped) == 0
    if case == "constant":
        assert float(terms["L_C"]) == pytest.approx(0.0, abs=1e-3)  # no spread: nothing above the floor


@pytest.mark.parametrize("name", VARIANTS)
def test_nonfinite_term_is_skipped_and_counted(name):
    d = make(name, 3, 6, sigma=0.1)
    if name == "cem_gmm":
        d.fit_features(torch.randn(30, 6), torch.arange(30) % 3)
    z = torch.randn(12, 6)
    z[3, 2] = float("nan")
    terms = d.loss(step_of(z, torch.arange(12) % 3))
    assert all(float(v) == 0.0 for v in terms.values())
    assert d.info()["nonfinite_skipped"] == len(terms) >= 1


def test_slot_warmup_shutoff_and_gate_switches():
    d = make("cem_slot_cross", 2, 8, sigma=0.1, warmup_epochs=2, shutoff_epoch=4)
    z, y = torch.randn(16, 8) * 3, torch.arange(16) % 2
    assert set(d.loss(step_of(z, y, epoch=1))) == {"fit"}        # warm-up: the surrogate still fits
    assert float(d.loss(step_of(z, y, epoch=2))["L_C"]) > 0
    assert "L_C" not in d.loss(step_of(z, y, epoch=4))
    values = {}
    for gate in ["dim_gate", "snr_gate", "mass_gate", "class_gate"]:
        torch.manual_seed(0)
        g = make("cem_slot_cross", 2, 8, sigma=0.1, **{gate: False})
        values[gate] = float(g.loss(step_of(z, y))["L_C"])
    torch.manual_seed(0)
    base = float(make("cem_slot_cross", 2, 8, sigma=0.1).loss(step_of(z, y))["L_C"])
    assert all(v > 0 and math.isfinite(v) for v in values.values())
    assert sum(abs(v - base) > 1e-6 for v in values.values()) >= 3   # each switch changes the term


def test_adversarial_attention_gets_reversed_gradient():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x) * 2).sum().backward()
    assert x.grad.tolist() == [-2.0, -2.0, -2.0]
    mass, mu, var = weighted_stats(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([[0.5, 0.5, 0.0]]))
    assert (float(mass[0]), float(mu[0, 0]), float(var[0, 0])) == (1.0, 2.0, 1.0)


# -- effect on the within-class spread ---------------------------------------------------------------------
def _train_toy(name, lam, steps=40):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 2
    y = torch.arange(256) % 4
    x = centers[y] + torch.randn(256, 8, generator=g)
    enc, head = nn.Linear(8, 16), nn.Linear(16, 4)
    torch.manual_seed(1)
    extra = {"k": 2} if name == "cem_gmm" else {}
    d = make(name, 4, 16, sigma=0.1, **{"lambda": lam}, **extra)
    if name == "cem_gmm":
        with torch.no_grad():
            d.fit_features(enc(x), y)
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()) + d.trainable_parameters(), lr=1e-2)
    for i in range(steps):
        idx = torch.arange(64) + 64 * (i % 4)
        z = enc(x[idx])
        loss = nn.functional.cross_entropy(head(z), y[idx])
        if lam > 0:
            loss = loss + sum(d.loss(step_of(z, y[idx])).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if name == "cem_gmm":
            d.gather(z.detach(), y[idx])
            if i % 4 == 3:
                d.refit()
    with torch.no_grad():
        return mean_intra_class_radius(enc(x), y)


@pytest.mark.parametrize("name", VARIANTS)
def test_surrogate_lowers_within_class_spread(name):
    without = _train_toy(name, 0.0)
    with_term = _train_toy(name, 1.0)
    assert with_term < 0.8 * without, (with_term, without)


# -- composition and end-to-end ----------------------------------------------------------------------------
def test_noise_option_and_double_noise_check():
    d = make("cem_gated_pool", 2, 4, sigma=0.5, noise=True)
    z = torch.zeros(1000, 4)
    assert float(d.transform(z, training=False).std()) == pytest.approx(0.5, rel=0.1)
    assert torch.equal(make("cem_gated_pool", 2, 4, sigma=0.5).transform(z, True), z)

    class T:
        model = data = device = None
        defenses = build_defenses({"name": ["gaussian_noise", "cem_gated_pool"], "cem_gated_pool": {"noise": True}})

    d2 = T.defenses.get("cem_gated_pool")
    d2.allocate(2, 4)
    d2.dim = 4
    import splitveil.defenses.cem_common as cc
    orig = cc.feature_dim
    cc.feature_dim = lambda m, data: 4
    try:
        with pytest.raises(ConfigError, match="second time"):
            d2.on_epoch_start(T, 0)
    finally:
        cc.feature_dim = orig


BASELINES = [n for n in ["dropout", "nopeek", "patrol", "noise_arl", "label_smoothing"] if n in DEFENSES]


@pytest.mark.slow
def test_cem_variants_end_to_end(tmp_path, data_root):
    """`splitveil run` with each CEM variant (noise + CEM, GMM after its first refit) writes a finished record."""
    from splitveil.experiments.run import run_experiment
    from splitveil.experiments.store import ResultsStore

    fast = {"data.train_size": 128, "data.test_size": 32, "data.aux_size": 64, "train.epochs": 2,
            "attacks.inverse_network.epochs": 1, "defense.sigma": 0.1, "defense.lambda": 1.0}
    for name in VARIANTS:
        m = run_experiment(tiny_config(**fast, **{"defense.name": f"[gaussian_noise, {name}]"}), tmp_path)
        assert m["status"] == "finished"
        assert ResultsStore(tmp_path / "results.sqlite").get(m["run_id"])["status"] == "finished"
        assert m["history"][-1][f"loss.{name}.L_C"] > 0
        assert m["defense_info"][name]["nonfinite_skipped"] == 0
        assert m["attacks"]["inverse_network"]["mse"] > 0
    assert m["defense_info"]["cem_gated_pool"]["tau"] == pytest.approx(0.1 ** 2 + 1e-3)


@pytest.mark.slow
def test_cem_composes_with_baselines(tmp_path, data_root):
    """CEM as a plug-in on top of the baseline defenses: one run stacks every baseline and all three CEM
    variants; it trains with every loss term and records every defense."""
    from splitveil.experiments.run import run_experiment

    fast = {"data.train_size": 128, "data.test_size": 32, "data.aux_size": 32, "train.epochs": 2,
            "attacks": {}, "defense.sigma": 0.1}
    names = ["gaussian_noise", *BASELINES, *VARIANTS]
    m = run_experiment(tiny_config(**fast, **{"defense.name": "[" + ", ".join(names) + "]"}), tmp_path)
    assert m["status"] == "finished"
    assert set(m["defense_info"]) == set(names)
    last = m["history"][-1]
    for cem in VARIANTS:
        assert last[f"loss.{cem}.L_C"] >= 0 and m["defense_info"][cem]["nonfinite_skipped"] == 0
    if "nopeek" in BASELINES:
        assert any(k.startswith("loss.nopeek.") for k in last)
