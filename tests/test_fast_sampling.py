"""Fewer-step samplers (respaced DDPM, DDIM) against independent computations.

- The respaced betas reproduce alpha-bar on the subsequence; with every step kept the
  respaced sampler IS Algorithm 2, and DDIM with eta = 1 is Algorithm 2 with
  sigma^2 = beta-tilde (the same noise draws give the same samples).
- DDIM encoding then decoding (eta = 0) reconstructs the input of a one-point oracle, through
  the latent its ODE predicts in closed form.
- Under the exact denoiser of Gaussian data (the one test_sampling_chain.py derives:
  E[eps | x_t] = b x_t / v_t) DDIM sampling, encoding and the round trip are linear maps
  with closed forms (float64), and the round trip approaches the identity with more steps.
"""

import numpy as np
import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, linear_betas
from ddpm.sampling import (ddim_encode, ddim_sample, respace, respaced_sample, sample, slerp,
                           timesteps)

T = 50
S = 0.15  # data std: predictions stay inside [-1, 1], clipping never acts


def gaussian_oracle(d: GaussianDiffusion, mean_type="eps", learned=False):
    """The exact denoiser of x_0 ~ N(0, S^2) per pixel, in the network's parameterization."""
    ab = torch.from_numpy(d.alphas_cumprod)

    def model(x, t):
        a2 = ab[t].to(x.dtype).view(-1, 1, 1, 1)
        v = a2 * S ** 2 + 1 - a2
        out = (1 - a2).sqrt() * x / v if mean_type == "eps" else a2.sqrt() * S ** 2 * x / v
        if learned:  # a log-variance 30% of the way from log beta-tilde_t to log beta_t
            lo = torch.from_numpy(d.posterior_log_variance_clipped)[t].to(x.dtype).view(-1, 1, 1, 1)
            hi = torch.from_numpy(np.log(d.betas))[t].to(x.dtype).view(-1, 1, 1, 1)
            out = torch.cat([out, (lo + 0.3 * (hi - lo)).expand_as(out)], 1)
        return out
    return model


def process(mean_type="eps", var_type="beta"):
    return GaussianDiffusion(linear_betas(T), mean_type, var_type, "vlb" if var_type == "learned" else "simple")


def test_timesteps_follow_the_ddim_papers_selections():
    assert np.array_equal(timesteps(T, T), np.arange(T))
    assert np.array_equal(timesteps(1000, 10), np.arange(0, 1000, 100))
    for K in range(1, 1001):  # exact integer floor of i T / K, never off by one
        assert np.array_equal(timesteps(1000, K), [i * 1000 // K for i in range(K)]), K
    q = timesteps(1000, 10, "quadratic")
    assert q[0] == 0 and np.all(np.diff(q) > 0) and q[-1] == int(0.8 * 1000)
    assert np.array_equal(q, np.floor((np.arange(10) * np.sqrt(800) / 9) ** 2).astype(int))
    for bad in ((T, 0, "uniform"), (T, T + 1, "uniform"), (T, 5, "cubic"), (T, T, "quadratic")):
        with pytest.raises(ValueError):
            timesteps(*bad)


@pytest.mark.parametrize("skip", ["uniform", "quadratic"])
def test_respaced_betas_reproduce_alpha_bar_on_the_subsequence(skip):
    d = GaussianDiffusion(linear_betas(1000))
    tau = timesteps(1000, 20, skip)
    short = respace(d, tau)
    np.testing.assert_allclose(short.alphas_cumprod, d.alphas_cumprod[tau], rtol=1e-12)
    assert short.T == 20 and np.isclose(short.betas[0], d.betas[0], rtol=1e-12)  # tau_0 = 0: the first beta kept


@pytest.mark.parametrize("mean_type,var_type", [("eps", "beta"), ("eps", "beta_tilde"), ("x0", "beta"),
                                                ("eps", "learned")])
def test_respaced_with_every_step_is_algorithm_2(mean_type, var_type):
    d = process(mean_type, var_type)
    model = gaussian_oracle(d, mean_type, learned=var_type == "learned")
    shape = (64, 1, 4, 4)
    ours = respaced_sample(d, model, shape, np.arange(T), torch.Generator().manual_seed(3))
    ref, _ = sample(d, model, shape, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("skip", ["uniform", "quadratic"])
def test_respaced_with_beta_tilde_on_fewer_steps_is_ddim_with_eta_1(skip):
    """On a subsequence the respaced process's posterior variance is DDIM's sigma at eta = 1
    and its posterior mean is Eq. 12's: the same noise gives the same samples."""
    d = process("eps", "beta_tilde")
    model = gaussian_oracle(d)
    tau = timesteps(T, 7, skip)
    ours = respaced_sample(d, model, (256, 1, 4, 4), tau, torch.Generator().manual_seed(2))
    ddim = ddim_sample(d, model, (256, 1, 4, 4), tau, eta=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, ddim, rtol=0, atol=1e-5)
    full = respaced_sample(d, model, (256, 1, 4, 4), np.arange(T), torch.Generator().manual_seed(2))
    assert (ours - full).abs().max() > 1e-3  # fewer steps really are another chain


def test_a_learned_variance_keeps_its_place_between_the_bounds_on_fewer_steps():
    d = process("eps", "learned")
    tau = timesteps(T, 5)
    seen = []
    for frac, expect in ((0.3, 0.3), (-2.0, 0.0), (5.0, 1.0)):  # inside, below, above the interval
        ab = torch.from_numpy(d.alphas_cumprod)

        def model(x, t, frac=frac):
            a2 = ab[t].to(x.dtype).view(-1, 1, 1, 1)
            eps = (1 - a2).sqrt() * x / (a2 * S ** 2 + 1 - a2)
            lo = torch.from_numpy(d.posterior_log_variance_clipped)[t].to(x.dtype).view(-1, 1, 1, 1)
            hi = torch.from_numpy(d.log_betas)[t].to(x.dtype).view(-1, 1, 1, 1)
            return torch.cat([eps, (lo + frac * (hi - lo)).expand_as(eps)], 1)

        x_T = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        # one respaced step from the last index: x = mean + sigma z, so sigma^2 = Var(x - mean)
        one = respaced_sample(d, model, x_T.shape, tau[-2:], torch.Generator().manual_seed(1), x_start=x_T)
        seen.append(one)
        from ddpm.sampling import _learned_fraction

        t = torch.full((4,), int(tau[-1]))
        got = _learned_fraction(d, model(x_T[:4], t)[:, 1:], t)
        assert torch.allclose(got, torch.full_like(got, expect), atol=1e-9), (frac, got.flatten())
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])


def test_a_fixed_variance_replaces_the_learned_one_in_the_respaced_process_too():
    d = process("eps", "learned")
    model = gaussian_oracle(d, "eps", learned=True)
    tau = timesteps(T, 10)
    a = respaced_sample(d.with_variance("beta_tilde"), model, (8, 1, 4, 4), tau, torch.Generator().manual_seed(1))
    b = respaced_sample(process("eps", "beta_tilde"), gaussian_oracle(d), (8, 1, 4, 4), tau,
                        torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)  # exactly the fixed-variance process: the learned channels are ignored
    with pytest.raises(ValueError, match="learned"):
        process("eps", "beta").with_variance("learned")


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), float("inf")])
def test_eta_outside_0_1_is_refused(eta):
    from ddpm.sampling import Sampler

    with pytest.raises(ValueError, match="eta"):
        Sampler("ddim", 5, eta)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(process(), gaussian_oracle(process()), (1, 1, 2, 2), timesteps(T, 5), eta=eta)


def test_ddim_with_eta_1_and_every_step_is_algorithm_2_with_beta_tilde():
    d = process("eps", "beta")
    model = gaussian_oracle(d)
    shape = (64, 1, 4, 4)
    ours = ddim_sample(d, model, shape, np.arange(T), eta=1.0, generator=torch.Generator().manual_seed(5))
    ref, _ = sample(d.with_variance("beta_tilde"), model, shape, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    other, _ = sample(d, model, shape, torch.Generator().manual_seed(5))  # beta: a different chain
    assert (ours - other).abs().max() > 1e-3


def test_ddim_eta_0_is_the_closed_form_linear_map_of_the_gaussian_oracle():
    d = process()
    tau = timesteps(T, 7)
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddim_sample(d, gaussian_oracle(d), x_T.shape, tau, eta=0.0, x_start=x_T)
    # each step: x_prev = (sqrt(ab_p) a s^2 / v + sqrt(1 - ab_p) b / v) x  (x0 and eps both linear)
    ab = linear_betas(T)
    ab = np.cumprod(1 - ab)
    gain = 1.0
    for i in range(len(tau) - 1, -1, -1):
        a2, a2_prev = ab[tau[i]], (ab[tau[i - 1]] if i > 0 else 1.0)
        v = a2 * S ** 2 + 1 - a2
        x0_gain = np.sqrt(a2) * S ** 2 / v
        eps_gain = (1 - np.sqrt(a2) * x0_gain) / np.sqrt(1 - a2)  # eps consistent with x0_hat
        gain *= np.sqrt(a2_prev) * x0_gain + np.sqrt(1 - a2_prev) * eps_gain
    torch.testing.assert_close(out, gain * x_T, rtol=1e-9, atol=1e-12)


def test_ddim_encoding_then_decoding_reconstructs_the_input_of_a_one_point_oracle():
    d = process()
    tau = timesteps(T, 10)
    x_star = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.6 - 0.8
    ab = torch.from_numpy(d.alphas_cumprod)

    def oracle(x, t):  # the exact eps of data that is x_star: pred x_0 = x_star for any x_t
        a2 = ab[t].view(-1, 1, 1, 1)
        return (x - a2.sqrt() * x_star) / (1 - a2).sqrt()

    latent = ddim_encode(d, oracle, x_star, tau)
    # x_star taken as x at tau_0 has eps_0 = x_star (1 - sqrt(ab_0)) / sqrt(1 - ab_0); the ODE
    # keeps that eps, so the latent is sqrt(ab_K) x_star + sqrt(1 - ab_K) eps_0
    a0, aK = d.alphas_cumprod[tau[0]], d.alphas_cumprod[tau[-1]]
    eps0 = x_star * (1 - np.sqrt(a0)) / np.sqrt(1 - a0)
    torch.testing.assert_close(latent, np.sqrt(aK) * x_star + np.sqrt(1 - aK) * eps0, rtol=1e-10, atol=1e-12)
    back = ddim_sample(d, oracle, x_star.shape, tau, eta=0.0, x_start=latent, clip_x0=False)
    torch.testing.assert_close(back, x_star, rtol=1e-10, atol=1e-12)


def test_ddim_round_trip_under_gaussian_data_is_the_product_of_its_step_gains():
    """Encoding and decoding are both linear under the Gaussian oracle; the round trip is
    not the identity (each direction is a first-order step of the ODE) but its closed form,
    and it approaches the identity as the steps get finer."""
    ab_all = np.cumprod(1 - linear_betas(1000))

    def gains(a, a_other):  # one DDIM step from abar a to abar a_other: x -> gain * x
        v = a * S ** 2 + 1 - a
        g0 = np.sqrt(a) * S ** 2 / v
        return np.sqrt(a_other) * g0 + np.sqrt(1 - a_other) * (1 - np.sqrt(a) * g0) / np.sqrt(1 - a)

    d = GaussianDiffusion(linear_betas(1000))
    model = gaussian_oracle(d)
    x0 = S * torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for K in (20, 100, 1000):
        tau = timesteps(1000, K)
        a = ab_all[tau]
        latent = ddim_encode(d, model, x0, tau)
        enc = np.prod([gains(a[i], a[i + 1]) for i in range(K - 1)])
        torch.testing.assert_close(latent, enc * x0, rtol=1e-9, atol=1e-12)
        back = ddim_sample(d, model, x0.shape, tau, eta=0.0, x_start=latent, clip_x0=False)
        dec = np.prod([gains(a[i], a[i - 1] if i > 0 else 1.0) for i in range(K)])
        torch.testing.assert_close(back, dec * enc * x0, rtol=1e-9, atol=1e-12)
        errors.append(abs(dec * enc - 1))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors


def test_samplers_are_reproducible_under_a_seed():
    d = process()
    model = gaussian_oracle(d)
    tau = timesteps(T, 10)
    for run in (lambda g: ddim_sample(d, model, (4, 1, 4, 4), tau, eta=0.5, generator=g),
                lambda g: respaced_sample(d, model, (4, 1, 4, 4), tau, generator=g)):
        a = run(torch.Generator().manual_seed(7))
        assert torch.equal(a, run(torch.Generator().manual_seed(7)))
        assert not torch.equal(a, run(torch.Generator().manual_seed(8)))


def test_slerp_keeps_the_endpoints_and_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    b = b * a.norm() / b.norm()
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    assert abs(slerp(a, b, 0.5).norm() - a.norm()) < 1e-4 * a.norm()
    assert (slerp(a, b, 0.5).norm() - ((a + b) / 2).norm()) > 0.1 * a.norm()  # not linear
