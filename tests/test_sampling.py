"""Samplers: reproducible, progressive, start from any step, interpolation."""

import torch

from ddpm import build_diffusion, build_model, get_preset
from ddpm.sampling import interpolate, sample


def tiny():
    cfg = get_preset("tiny", ["diffusion.T=30"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # a non-trivial network: open the zero-initialized output layer
        for p in model.conv_out.parameters():
            p.normal_(0, 0.1)
    return build_diffusion(cfg), model


def test_sampling_is_reproducible_under_a_seed():
    d, model = tiny()
    shape = (3, 1, 28, 28)
    a, _ = sample(d, model, shape, torch.Generator().manual_seed(7))
    b, _ = sample(d, model, shape, torch.Generator().manual_seed(7))
    c, _ = sample(d, model, shape, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_progressive_generation_records_pred_x0_in_range():
    d, model = tiny()
    x, trace = sample(d, model, (2, 1, 28, 28), torch.Generator().manual_seed(0), record=[29, 15, 0])
    assert sorted(trace["pred_x0"]) == [0, 15, 29] and sorted(trace["xt"]) == [0, 15, 29]
    for v in trace["pred_x0"].values():
        assert v.shape == (2, 1, 28, 28) and v.min() >= -1 and v.max() <= 1  # clipped
    # the last step adds no noise: the sample is the mean at index 0, which is the clipped pred_x0
    assert torch.allclose(x, trace["pred_x0"][0], atol=1e-6)


def test_start_from_a_given_x_t():
    d, model = tiny()
    xt = torch.randn(2, 1, 28, 28)
    a, _ = sample(d, model, xt.shape, torch.Generator().manual_seed(1), x_start=xt, t_start=10)
    b, _ = sample(d, model, xt.shape, torch.Generator().manual_seed(1), x_start=xt, t_start=10)
    assert torch.equal(a, b)
    # starting at index 0 from x_1 is one noiseless step: the posterior mean of the clipped x0
    c, tr = sample(d, model, xt.shape, torch.Generator().manual_seed(1), x_start=xt, t_start=0, record=[0])
    assert torch.allclose(c, tr["pred_x0"][0], atol=1e-6)


def test_interpolation_endpoints_and_shape():
    d, model = tiny()
    xa, xb = torch.rand(1, 28, 28) * 2 - 1, torch.rand(1, 28, 28) * 2 - 1
    rows = interpolate(d, model, xa, xb, t=20, lambdas=[0.0, 0.5, 1.0], generator=torch.Generator().manual_seed(0))
    assert rows.shape == (3, 1, 28, 28)
    assert rows.min() >= -1.0001 and rows.max() <= 1.0001
    assert not torch.allclose(rows[0], rows[2])


def test_interpolation_endpoints_are_each_image_decoded_alone_with_the_same_noise():
    """Fig. 8: the lambda = 0 (1) row is x_a (x_b) encoded with q(x_t | x_0) and decoded by
    Algorithm 2 on its own, with the same noise: the pair's encoding draw, then one reverse
    draw per step."""
    d, model = tiny()
    g = torch.Generator().manual_seed(3)
    xa, xb = torch.rand(1, 28, 28, generator=g) * 2 - 1, torch.rand(1, 28, 28, generator=g) * 2 - 1
    t = 12
    rows = interpolate(d, model, xa, xb, t=t, lambdas=[0.0, 0.25, 0.5, 1.0],
                       generator=torch.Generator().manual_seed(5))
    for row, k in ((0, 0), (3, 1)):
        g = torch.Generator().manual_seed(5)
        noise = torch.randn((2, 1, 28, 28), generator=g)
        xt = d.q_sample(torch.stack([xa, xb]), torch.full((2,), t), noise)[k:k + 1]
        alone, _ = sample(d, model, (1, 1, 28, 28), generator=g, x_start=xt, t_start=t)
        torch.testing.assert_close(rows[row], alone[0], rtol=0, atol=1e-5)
    assert (rows[0] - rows[3]).abs().max() > 0.1


def test_interpolation_shares_one_noise_draw_across_a_row():
    """With a linear denoiser (the exact one for Gaussian data, whose predicted x_0 is never
    clipped here) the decoder is affine in the latent plus the reverse noise. If the noise is
    shared across the row, each row is the same affine mix of the endpoint rows as its latent:
    out(lambda) = (1 - lambda) out(0) + lambda out(1). Independent noise per row breaks this."""
    from test_sampling_chain import T, gaussian_oracle

    from ddpm.diffusion import GaussianDiffusion, linear_betas

    d = GaussianDiffusion(linear_betas(T), "eps", "beta", "simple")
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(1, 8, 8, generator=g) * 0.15, torch.randn(1, 8, 8, generator=g) * 0.15
    lambdas = [0.0, 0.3, 0.5, 1.0]
    rows = interpolate(d, gaussian_oracle("eps"), xa, xb, t=10, lambdas=lambdas,
                       generator=torch.Generator().manual_seed(1))
    for k, lam in enumerate(lambdas):
        torch.testing.assert_close(rows[k], (1 - lam) * rows[0] + lam * rows[-1], rtol=0, atol=1e-6)
    assert (rows[0] - rows[-1]).abs().max() > 0.05
