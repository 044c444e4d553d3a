"""The diffusion math against independent computations (closed forms, scipy, Monte Carlo)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ddpm import diffusion as D
from ddpm.diffusion import GaussianDiffusion


def make(T=1000, schedule="linear", **kw):
    return GaussianDiffusion(D.make_betas(schedule, T), **kw)


# ------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_paper():
    betas = D.make_betas("linear", 1000)
    assert betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    # PAPER.md: alpha-bar_T about 4.0e-5 for the linear schedule
    assert np.prod(1 - betas) == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_schedule_follows_its_alpha_bar():
    T, s = 1000, 0.008
    betas = D.make_betas("cosine", T)
    assert betas.max() <= 0.999 and betas.min() > 0
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = np.cumprod(1 - betas)
    # Away from the clipped end, alpha-bar(t) = f(t) / f(0) (Nichol & Dhariwal Eq. 17).
    t = np.arange(1, T + 1)
    assert np.allclose(alpha_bar[:-5], (f(t) / f(0))[:-5], rtol=1e-9, atol=1e-12)


def test_linear_schedule_rejects_too_small_T():
    with pytest.raises(ValueError, match="too small"):
        D.make_betas("linear", 10)


# ---------------------------------------------------------------------- forward process


def test_q_sample_monte_carlo_matches_closed_form():
    d = make(T=1000)
    torch.manual_seed(0)
    x0 = torch.tensor([0.7, -0.3, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    n = 200_000
    for idx in (0, 99, 500, 999):
        t = torch.full((n,), idx, dtype=torch.long)
        xt = d.q_sample(x0.expand(n, 3, 1, 1), t)
        abar = np.prod(1 - d.betas[: idx + 1])  # independent of the module's cumprod
        mean_expected = math.sqrt(abar) * x0.view(3)
        var_expected = 1 - abar
        se_mean = math.sqrt(var_expected / n)
        assert torch.allclose(xt.mean(0).view(3), mean_expected, atol=5 * se_mean)
        assert torch.allclose(xt.var(0).view(3), torch.full((3,), var_expected, dtype=torch.float64),
                              rtol=0.02)


def test_posterior_matches_bayes_rule_float64():
    d = make(T=1000)
    rng = np.random.default_rng(0)
    idx = np.array([1, 2, 10, 500, 999])
    x0 = rng.normal(size=(len(idx), 1, 2, 2))
    xt = rng.normal(size=(len(idx), 1, 2, 2))
    mean, var, _ = d.q_posterior(torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(idx))
    betas = D.linear_betas(1000)
    for i, k in enumerate(idx):
        # Bayes: x_{t-1} | x0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}); x_t | x_{t-1} ~ N(sqrt(a_t) x_{t-1}, b_t)
        abar_prev = np.prod(1 - betas[:k])
        a_t, b_t = 1 - betas[k], betas[k]
        prec = 1 / (1 - abar_prev) + a_t / b_t
        v = 1 / prec
        m = v * (np.sqrt(abar_prev) * x0[i] / (1 - abar_prev) + np.sqrt(a_t) * xt[i] / b_t)
        assert np.allclose(mean[i].numpy(), m, rtol=1e-10, atol=1e-12)
        assert np.allclose(var[i].numpy(), v, rtol=1e-10)


def test_posterior_at_first_step_is_the_data_point():
    d = make(T=1000)
    x0, xt = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    mean, var, log_var = d.q_posterior(x0, xt, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(mean, x0) and (var == 0).all()
    # the clipped log-variance at index 0 is that of index 1 (official code)
    assert torch.allclose(log_var, torch.tensor(math.log(d.posterior_variance[1]), dtype=torch.float64))


def test_parameterization_conversions_round_trip():
    d = make(T=1000)
    x0 = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 5, 100, 400, 700, 998, 999])
    xt = d.q_sample(x0, t, eps)
    assert torch.allclose(d.x0_from_eps(xt, t, eps), x0, atol=1e-8)
    assert torch.allclose(d.eps_from_x0(xt, t, x0), eps, atol=1e-8)
    mu, _, _ = d.q_posterior(x0, xt, t)
    assert torch.allclose(d.x0_from_mu(xt, t, mu), x0, atol=1e-7)


# ------------------------------------------------------------------------ likelihoods


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=torch.float64), torch.randn(100, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2)))
    assert torch.allclose(D.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10)


def test_discretized_decoder_is_a_distribution_over_256_values():
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mean = float(torch.empty(1).uniform_(-1.3, 1.3, generator=g))
        log_scale = float(torch.empty(1).uniform_(math.log(1e-3), math.log(2.0), generator=g))
        logp = D.discretized_gaussian_log_likelihood(values, torch.full_like(values, mean), log_scale)
        p = torch.exp(logp)
        # bins at least 1e-12 each are clamped: tolerance covers 256 clamps
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
        # an interior bin equals Phi(upper) - Phi(lower) (scipy, independently)
        k = 100
        s = math.exp(log_scale)
        expected = stats.norm.cdf(values[k] + 1 / 255, mean, s) - stats.norm.cdf(values[k] - 1 / 255, mean, s)
        assert p[k].item() == pytest.approx(expected, rel=1e-6, abs=1.5e-12)  # clamp at 1e-12


def test_discretized_decoder_outer_bins_are_open():
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mean, s = torch.tensor([-5.0, 5.0], dtype=torch.float64), 0.5
    # far outside [-1, 1] the mean still gives (almost) all mass to the edge bins
    p = torch.exp(D.discretized_gaussian_log_likelihood(x, mean, math.log(s)))
    assert torch.allclose(p, torch.ones(2, dtype=torch.float64), atol=1e-6)


# ------------------------------------------------------------------ oracle: one point


def one_point_oracle(d, c):
    """The exact eps-predictor for data that is the single point c: eps = (x_t - sqrt(abar) c)/sqrt(1-abar)."""
    def model(xt, t):
        s_ab = d._extract(d.sqrt_alphas_cumprod, t, xt)
        s_1mab = d._extract(d.sqrt_one_minus_alphas_cumprod, t, xt)
        return (xt - s_ab * c) / s_1mab
    return model


@pytest.mark.parametrize("var_type", ["beta", "beta_tilde"])
def test_bound_with_oracle_matches_independent_computation(var_type):
    T = 200
    d = make(T=T, var_type=var_type)
    pix = torch.tensor([-1.0, -0.5, 0.0, 11 / 127.5 - 1, 1.0], dtype=torch.float64)  # on the pixel grid
    c = pix.view(1, 1, 1, 5)
    x0 = c.expand(3, 1, 1, 5).clone()
    out = d.calc_bpd_loop(one_point_oracle(d, c), x0, clip_x0=True, max_batch=64)

    betas = D.linear_betas(T)
    abar = np.cumprod(1 - betas)
    post_var = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # beta-tilde_t for index 1..T-1
    dim = 5
    # L_T: KL(N(sqrt(abar_T) c, 1 - abar_T) || N(0, 1)), per dim
    cv = pix.numpy()
    prior = 0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * cv ** 2)
    # L_{t-1}, t > 1: means agree exactly, so only the variances differ
    if var_type == "beta":
        kl = 0.5 * (np.log(betas[1:] / post_var) + post_var / betas[1:] - 1)
    else:
        kl = np.zeros(T - 1)
    # L_0: decoder centred on c with sigma^2 = beta-tilde_2 (index 1) for both variance types
    s = math.sqrt(post_var[0])
    p = np.where(cv < -0.999, stats.norm.cdf(-1 + 1 / 255, cv, s),
                 np.where(cv > 0.999, stats.norm.sf(1 - 1 / 255, cv, s),
                          stats.norm.cdf(cv + 1 / 255, cv, s) - stats.norm.cdf(cv - 1 / 255, cv, s)))
    l0 = -np.log(p)
    ln2 = math.log(2)
    assert np.allclose(out["prior_bpd_b"].numpy(), prior.mean() / ln2, rtol=1e-6)
    assert np.allclose(out["terms_bpd_bt"][:, 0].numpy(), l0.sum() / dim / ln2, rtol=1e-6)
    assert np.allclose(out["terms_bpd_bt"][0, 1:].numpy(), kl * dim / dim / ln2, rtol=1e-5, atol=1e-9)
    total = prior.mean() / ln2 + l0.sum() / dim / ln2 + kl.sum() / ln2
    assert np.allclose(out["total_bpd_b"].numpy(), total, rtol=1e-6)
    assert torch.allclose(out["mse_bt"], torch.zeros_like(out["mse_bt"]), atol=1e-12)


def test_sampler_with_oracle_returns_the_data_point():
    from ddpm.sampling import sample

    d = make(T=100)
    c = (torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    x, trace = sample(d, one_point_oracle(d, c), (6, 3, 4, 4), torch.Generator().manual_seed(0),
                      record=[50, 0])
    assert torch.allclose(x, c.expand_as(x), atol=1e-5)
    assert torch.allclose(trace["pred_x0"][50], c.expand_as(x), atol=1e-5)


def test_simple_loss_with_gaussian_data_oracle():
    """Data x0 ~ N(0, s^2): the optimal eps-predictor is E[eps | x_t] = sqrt(1-abar) x_t / (abar s^2 + 1 - abar),
    and its expected L_simple is 1 - (1 - abar) / (abar s^2 + 1 - abar) per dimension."""
    d = make(T=1000)
    s2, idx, n = 0.25, 300, 100_000
    abar = float(d.alphas_cumprod[idx])
    denom = abar * s2 + 1 - abar
    model = lambda xt, t: math.sqrt(1 - abar) * xt / denom
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, 1, 4, generator=g, dtype=torch.float64) * math.sqrt(s2)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    loss = d.training_losses(model, x0, torch.full((n,), idx), noise)["loss"]
    expected = 1 - (1 - abar) / denom
    assert loss.mean().item() == pytest.approx(expected, rel=0.02)
    # any other scaling of the predictor does worse
    worse = d.training_losses(lambda xt, t: 1.1 * model(xt, t), x0, torch.full((n,), idx), noise)["loss"]
    assert worse.mean() > loss.mean()


# ------------------------------------------------------------------------- losses


def test_mu_mse_is_weighted_eps_mse():
    """||mu-tilde - mu_theta||^2 for eps prediction = (beta_t / (sqrt(alpha_t) sqrt(1-abar_t)))^2 ||eps - eps_theta||^2."""
    d = make(T=1000, loss_type="mu_mse")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    err = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 500, 999])
    model = lambda xt, tt: noise + err
    loss = d.training_losses(model, x0, t, noise)["loss"]
    b = torch.from_numpy(d.betas)[t]
    w = b / (torch.sqrt(1 - b) * torch.sqrt(1 - torch.from_numpy(d.alphas_cumprod)[t]))
    assert torch.allclose(loss, w ** 2 * (err ** 2).mean(dim=(1, 2, 3)), rtol=1e-8)


@pytest.mark.parametrize("mean_type", ["eps", "mu", "x0"])
def test_simple_loss_is_zero_for_a_perfect_prediction(mean_type):
    d = make(T=100, mean_type=mean_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 50, 99])

    def perfect(xt, tt):
        return {"eps": noise, "x0": x0, "mu": d.q_posterior(x0, xt, tt)[0]}[mean_type]

    assert torch.allclose(d.training_losses(perfect, x0, t, noise)["loss"], torch.zeros(4, dtype=torch.float64),
                          atol=1e-20)
    assert (d.training_losses(lambda xt, tt: perfect(xt, tt) + 0.1, x0, t, noise)["loss"] > 0).all()


def test_vlb_loss_is_decoder_nll_at_first_step_and_kl_after():
    d = make(T=100, loss_type="vlb", var_type="beta_tilde")
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (2, 1, 2, 2), generator=g).double() / 127.5 - 1)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    pred = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 40])
    loss = d.training_losses(lambda xt, tt: pred, x0, t, noise)["loss"]
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(pred, xt, t)
    nll0 = -D.discretized_gaussian_log_likelihood(x0[0], out["mean"][0], 0.5 * out["log_var"][0]).sum()
    mu, _, lv = d.q_posterior(x0, xt, t)
    kl1 = D.normal_kl(mu[1], lv[1], out["mean"][1], out["log_var"][1]).sum()
    assert loss[0].item() == pytest.approx(nll0.item() / (4 * math.log(2)), rel=1e-10)
    assert loss[1].item() == pytest.approx(kl1.item() / (4 * math.log(2)), rel=1e-10)


def test_learned_variance_uses_the_extra_channels_and_trains_them():
    d = make(T=100, var_type="learned", loss_type="vlb")
    assert d.model_out_channels(3) == 6
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 10, 90])
    logv = torch.full((3, 3, 4, 4), -3.0, requires_grad=True)
    model = lambda xt, tt: torch.cat([torch.zeros_like(xt), logv], dim=1)
    out = d.p_mean_variance(model(x0, t), x0, t)
    assert torch.equal(out["log_var"], logv)
    d.training_losses(model, x0, t)["loss"].sum().backward()
    assert logv.grad is not None and logv.grad.abs().sum() > 0


def test_fixed_variances():
    d = make(T=1000)
    x = torch.zeros(3, 1, 1, 1)
    t = torch.tensor([0, 1, 999])
    out = d.p_mean_variance(torch.zeros_like(x), x, t, var_type="beta")
    expected = np.log([d.posterior_variance[1], d.betas[1], d.betas[999]])  # fixedlarge; t=1 exception
    assert np.allclose(out["log_var"].view(3).numpy(), expected, rtol=1e-6)
    out = d.p_mean_variance(torch.zeros_like(x), x, t, var_type="beta_tilde")
    expected = np.log([d.posterior_variance[1], d.posterior_variance[1], d.posterior_variance[999]])
    assert np.allclose(out["log_var"].view(3).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="learned"):
        d.p_mean_variance(torch.zeros_like(x), x, t, var_type="learned")


def test_invalid_combinations_and_names_are_rejected():
    with pytest.raises(ValueError, match="vlb"):
        make(var_type="learned", loss_type="simple")
    with pytest.raises(ValueError, match="vlb"):
        make(var_type="learned", loss_type="mu_mse")
    with pytest.raises(ValueError, match="valid: eps, mu, x0"):
        make(mean_type="epsilon")
    with pytest.raises(ValueError, match="valid: linear, cosine"):
        D.make_betas("quadratic", 1000)
    make(var_type="learned", loss_type="vlb", mean_type="mu")  # Table 2's learned-Sigma cell is valid


def test_bound_batching_over_timesteps_does_not_change_deterministic_terms():
    """With the oracle the terms do not depend on the noise, so any chunking gives equal results."""
    d = make(T=50, var_type="beta")
    c = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x0 = c.expand(4, 1, 2, 2).clone()
    a = d.calc_bpd_loop(one_point_oracle(d, c), x0, max_batch=4)  # one step per call
    b = d.calc_bpd_loop(one_point_oracle(d, c), x0, max_batch=1000)  # all steps in one call
    assert torch.allclose(a["terms_bpd_bt"], b["terms_bpd_bt"], rtol=1e-5, atol=1e-8)


def test_schedule_tables_are_copied_to_the_device_once():
    d = GaussianDiffusion(D.linear_betas(50))
    t, x = torch.tensor([3, 7]), torch.zeros(2, 1, 2, 2)
    a = d._extract(d.sqrt_alphas_cumprod, t, x)
    cached = dict(d._on_device)
    b = d._extract(d.sqrt_alphas_cumprod, t, x)
    assert torch.equal(a, b) and list(cached) == [("sqrt_alphas_cumprod", t.device)]
    assert d._on_device[("sqrt_alphas_cumprod", t.device)] is cached[("sqrt_alphas_cumprod", t.device)]
    assert torch.equal(a.flatten(), torch.tensor(d.sqrt_alphas_cumprod[[3, 7]], dtype=torch.float32))
    d._extract(np.ones(50), t, x)  # a table that is not the process's own is not kept
    assert len(d._on_device) == 1
