"""The reverse process for t > 0: p_mean_variance against closed forms, and the whole
ancestral chain (Algorithm 2) against its exact variance under Gaussian data.

The one-point oracle of test_diffusion.py cannot see the chain: its predicted x_0 is
exact for any x_t, so a wrong step noise leaves its samples unchanged. Here the data is
x_0 ~ N(0, s^2) per pixel. Then x_t = a x_0 + b eps (a^2 = abar_t, b^2 = 1 - abar_t) is
N(0, v_t), v_t = a^2 s^2 + b^2, and the exact denoiser is linear:
    E[eps | x_t] = b x_t / v_t,    E[x_0 | x_t] = a s^2 x_t / v_t.
With it every step is x_{t-1} = A_t x_t + sigma_t z, A_t = coef1_t a s^2 / v_t + coef2_t
(the posterior mean of the predicted x_0, Eq. 7), so Var(x_0) after the chain follows
from V_{t-1} = A_t^2 V_t + sigma_t^2 (no noise at the last step), V_T = 1, in float64.
Everything here is computed from the betas alone, not from GaussianDiffusion's tables.
"""

import math

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, linear_betas
from ddpm.sampling import p_sample, sample

T = 50  # the linear schedule at T = 50: betas 0.002 .. 0.4 (endpoints scaled by 1000/T, as the code does)
S = 0.15  # data std: predicted x_0 stays far inside [-1, 1], so clipping never acts (checked below)


def schedule(T=T):
    """Independent float64 tables from the betas (Bayes' rule for the posterior)."""
    b = linear_betas(T)
    a = 1.0 - b
    ab = np.cumprod(a)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = b * (1 - ab_prev) / (1 - ab)  # beta-tilde; 0 at index 0
    return {"beta": b, "alpha": a, "abar": ab, "abar_prev": ab_prev, "post_var": post_var}


def posterior_mean(sc, x0, xt, i):
    """Mean of q(x_{t-1} | x_t, x_0) at 0-based index i by Bayes' rule: the product of
    q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) and q(x_t | x_{t-1}) =
    N(sqrt(alpha_t) x_{t-1}, beta_t). At index 0 (abar_{t-1} = 1) it is x_0 itself."""
    if i == 0:
        return x0
    p1 = 1.0 / (1.0 - sc["abar_prev"][i])
    p2 = sc["alpha"][i] / sc["beta"][i]
    return (math.sqrt(sc["abar_prev"][i]) * p1 * x0 + math.sqrt(sc["alpha"][i]) / sc["beta"][i] * xt) / (p1 + p2)


def step_gain(sc, i, s2=S ** 2):
    """A_t: the exact Gaussian-data denoiser makes the reverse mean A_t x_t."""
    ab = sc["abar"][i]
    v = ab * s2 + 1 - ab
    x0_gain = math.sqrt(ab) * s2 / v
    return float(posterior_mean(sc, x0_gain, 1.0, i)), x0_gain, v


def step_variance(sc, var_type, i):
    """sigma_t^2 of the sampler: beta_t (fixedlarge) or beta-tilde_t (fixedsmall); the
    index-0 value never matters (no noise there)."""
    return float(sc["beta"][i] if var_type == "beta" else sc["post_var"][i])


def chain_variance(var_type, T=T, s2=S ** 2):
    """(Var(x_0) after the whole chain from x_T ~ N(0, 1), max over steps of the std of
    the predicted x_0 along the chain)."""
    sc = schedule(T)
    V, max_std = 1.0, 0.0
    for i in range(T - 1, -1, -1):
        A, x0_gain, _ = step_gain(sc, i, s2)
        max_std = max(max_std, x0_gain * math.sqrt(V))
        V = A * A * V + (step_variance(sc, var_type, i) if i > 0 else 0.0)
    return V, max_std


def gaussian_oracle(mean_type, T=T, s2=S ** 2):
    """The exact denoiser for x_0 ~ N(0, s2), in the parameterization ``mean_type``."""
    sc = schedule(T)
    coef = {"eps": [], "x0": [], "mu": []}
    for i in range(T):
        A, x0_gain, v = step_gain(sc, i, s2)
        coef["eps"].append(math.sqrt(1 - sc["abar"][i]) / v)
        coef["x0"].append(x0_gain)
        coef["mu"].append(A)
    table = torch.tensor(coef[mean_type], dtype=torch.float64)

    def model(xt, t):
        return (table[t].view(-1, *([1] * (xt.ndim - 1))) * xt.double()).to(xt.dtype)
    return model


# ---------------------------------------------------------------- the whole chain


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
@pytest.mark.parametrize("var_type", ["beta", "beta_tilde"])
def test_chain_variance_matches_closed_form(var_type, mean_type):
    d = GaussianDiffusion(linear_betas(T), mean_type, var_type, "simple")
    V, max_std = chain_variance(var_type)
    # Clipping of the predicted x_0 to [-1, 1] would break linearity: its std along the
    # chain is at most max_std, so the expected number of clipped values over all
    # n * T predictions is below n T P(|N(0,1)| > 1/max_std): negligible.
    n_chains = 64 * 16 * 16
    assert n_chains * T * math.erfc(1 / max_std / math.sqrt(2)) < 0.01
    x, _ = sample(d, gaussian_oracle(mean_type), (64, 1, 16, 16), torch.Generator().manual_seed(0))
    x = x.double().flatten()
    # The chains are independent N(0, V): the sample variance has standard error
    # V sqrt(2 / (n - 1)) (1.1% here); the mean has standard error sqrt(V / n).
    se_var = V * math.sqrt(2 / (n_chains - 1))
    assert abs(x.var().item() - V) < 4 * se_var, (x.var().item(), V, se_var)
    assert abs(x.mean().item()) < 4 * math.sqrt(V / n_chains)


def test_chain_closed_forms_are_far_apart():
    """The test above has power: the two fixed variances, and sigma^2 in place of sigma
    (each step's noise scaled by sigma_t^2), give variances many standard errors apart."""
    se = math.sqrt(2 / (64 * 16 * 16))
    v_beta, v_tilde = chain_variance("beta")[0], chain_variance("beta_tilde")[0]
    assert abs(v_beta / v_tilde - 1) > 20 * se
    sc = schedule()
    V = 1.0
    for i in range(T - 1, -1, -1):  # the chain with noise sigma_t^2 z
        V = step_gain(sc, i)[0] ** 2 * V + (step_variance(sc, "beta", i) ** 2 if i > 0 else 0.0)
    assert abs(V / v_beta - 1) > 20 * se


@pytest.mark.parametrize("var_type", ["beta", "beta_tilde"])
def test_each_step_adds_noise_of_std_sigma_t(var_type):
    """One ancestral step at every index at once, from a fixed x_t: x_{t-1} - A_t x_t must
    be N(0, sigma_t^2) (exactly 0 at index 0, the last step)."""
    d = GaussianDiffusion(linear_betas(T), "eps", var_type, "simple")
    sc = schedule()
    n = 64 * 64
    g = torch.Generator().manual_seed(1)
    # x_t at its marginal std sqrt(v_t): the predicted x_0 then has std <= S, never clipped
    v = torch.tensor([step_gain(sc, i)[2] for i in range(T)], dtype=torch.float64).view(T, 1, 1, 1)
    xt = torch.randn(T, 1, 64, 64, generator=g, dtype=torch.float64) * v.sqrt()
    t = torch.arange(T)
    x_prev, _ = p_sample(d, gaussian_oracle("eps"), xt, t, generator=g)
    A = torch.tensor([step_gain(sc, i)[0] for i in range(T)], dtype=torch.float64).view(T, 1, 1, 1)
    resid = (x_prev - A * xt).flatten(1)
    assert torch.allclose(resid[0], torch.zeros(n, dtype=torch.float64), atol=1e-12)  # no noise at index 0
    for i in range(1, T):
        s2 = step_variance(sc, var_type, i)
        # sample variance of n draws of N(0, s2) about the known mean 0: standard error s2 sqrt(2 / n)
        est = (resid[i] ** 2).mean().item()
        assert abs(est - s2) < 5 * s2 * math.sqrt(2 / n), (i, est, s2)
        assert abs(resid[i].mean().item()) < 5 * math.sqrt(s2 / n), i


# ------------------------------------------------------------ p_mean_variance


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([0, 1, 7, 25, 49])
    xt = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) * 1.5
    out = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) * 1.5  # many predicted x0 outside [-1, 1]
    return xt, t, out


def _per_index(fn, xt, t, *args):
    return torch.stack([fn(int(i), xt[k], *(a[k] for a in args)) for k, i in enumerate(t)])


@pytest.mark.parametrize("clip", [False, True])
def test_reverse_mean_for_x0_prediction(clip):
    d = GaussianDiffusion(linear_betas(T), "x0", "beta", "simple")
    sc = schedule()
    xt, t, out = _inputs()
    res = d.p_mean_variance(out, xt, t, clip_x0=clip)
    x0 = out.clamp(-1, 1) if clip else out
    assert bool((out.abs() > 1).any())  # clipping acts on these inputs
    expected = _per_index(lambda i, x, o: posterior_mean(sc, o, x, i), xt, t, x0)
    torch.testing.assert_close(res["pred_x0"], x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(res["mean"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip", [False, True])
def test_reverse_mean_for_eps_prediction(clip):
    d = GaussianDiffusion(linear_betas(T), "eps", "beta_tilde", "simple")
    sc = schedule()
    xt, t, eps = _inputs(1)
    res = d.p_mean_variance(eps, xt, t, clip_x0=clip)
    ab = torch.from_numpy(sc["abar"])[t].view(-1, 1, 1, 1)
    x0 = (xt - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)  # Eq. 4 inverted
    assert bool((x0.abs() > 1).any())  # clipping acts on these inputs
    if clip:
        x0 = x0.clamp(-1, 1)
        # the mean is rebuilt from the clipped x_0 through the posterior (Eq. 7)
        expected = _per_index(lambda i, x, o: posterior_mean(sc, o, x, i), xt, t, x0)
    else:
        # Eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
        b = torch.from_numpy(sc["beta"])[t].view(-1, 1, 1, 1)
        expected = (xt - b / torch.sqrt(1 - ab) * eps) / torch.sqrt(1 - b)
    torch.testing.assert_close(res["pred_x0"], x0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res["mean"], expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("clip", [False, True])
def test_reverse_mean_for_mu_prediction(clip):
    """mu prediction (official 'xprev'): the output IS the mean, clipped or not; the predicted
    x_0 is the posterior mean inverted for x_0 (then clipped)."""
    d = GaussianDiffusion(linear_betas(T), "mu", "beta", "simple")
    sc = schedule()
    xt, t, mu = _inputs(2)
    res = d.p_mean_variance(mu, xt, t, clip_x0=clip)
    torch.testing.assert_close(res["mean"], mu, rtol=0, atol=0)

    def invert(i, x, m):  # solve posterior_mean(x0, x, i) = m for x0 (it is affine in x0)
        c0 = posterior_mean(sc, torch.zeros_like(x), x, i)
        c1 = posterior_mean(sc, torch.ones_like(x), x, i) - c0
        return (m - c0) / c1
    x0 = _per_index(invert, xt, t, mu)
    assert bool((x0.abs() > 1).any())
    torch.testing.assert_close(res["pred_x0"], x0.clamp(-1, 1) if clip else x0, rtol=1e-8, atol=1e-9)


def test_reverse_log_variance_at_every_index():
    sc = schedule()
    x = torch.zeros(T, 1, 1, 1, dtype=torch.float64)
    t = torch.arange(T)
    for var_type, sig2 in (("beta", np.append(sc["post_var"][1], sc["beta"][1:])),
                           ("beta_tilde", np.append(sc["post_var"][1], sc["post_var"][1:]))):
        d = GaussianDiffusion(linear_betas(T), "eps", var_type, "simple")
        lv = d.p_mean_variance(torch.zeros_like(x), x, t)["log_var"].view(T).numpy()
        np.testing.assert_allclose(lv, np.log(sig2), rtol=1e-12)
