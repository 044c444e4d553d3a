"""Samplers: plain functions over a GaussianDiffusion and a network callable.

- ``sample``: ancestral sampling, DDPM Algorithm 2, with predicted x_0 clipped to
  [-1, 1] and no noise added at the last step (as in the official code). It can
  start from any step with a given x_t, which gives Fig. 7 (samples sharing x_t)
  and Fig. 8 (interpolation in x_t), and can record the predicted x_0 along the
  chain (progressive generation, Fig. 6).
- ``interpolate``: Fig. 8, encode two images with q(x_t | x_0), mix the latents
  linearly, decode with the reverse process.
Reproducible under a seed: all randomness comes from the ``generator`` passed in.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from .diffusion import GaussianDiffusion, Model


def _randn(shape, generator, device, dtype=torch.float32):
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def p_sample(diffusion: GaussianDiffusion, model: Model, xt, t, generator=None,
             clip_x0: bool = True, var_type=None, noise=None):
    """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t=1.
    ``noise`` (z) is drawn from ``generator`` unless given."""
    out = diffusion.p_mean_variance(model(xt, t), xt, t, clip_x0=clip_x0, var_type=var_type)
    if noise is None:
        noise = _randn(xt.shape, generator, xt.device, xt.dtype)
    nonzero = (t != 0).to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))  # no noise at index 0
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_var"]) * noise, out["pred_x0"]


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model: Model, shape, generator: Optional[torch.Generator] = None,
           device="cpu", x_start: Optional[torch.Tensor] = None, t_start: Optional[int] = None,
           clip_x0: bool = True, var_type=None, record: Iterable[int] = (), progress: bool = False):
    """DDPM Algorithm 2 (ancestral sampling).

    shape: [B, C, H, W] of the samples.
    x_start, t_start: start from x_t at 0-based index ``t_start`` (default: x_T ~ N(0, I)
        at index T-1). The chain then runs indices t_start, ..., 0.
    record: 0-based indices at which to keep the predicted x_0 (Fig. 6); returned as
        a dict {index: [B, C, H, W]} under ``pred_x0``, together with x_t itself
        (before the step at that index) under ``xt``.
    Returns (x_0 [B, C, H, W], {"pred_x0": {...}, "xt": {...}}).
    """
    T = diffusion.T
    t_start = T - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < T:
        raise ValueError(f"t_start must be in [0, {T - 1}], got {t_start}")
    if x_start is None:
        x = _randn(tuple(shape), generator, device)
    else:
        assert tuple(x_start.shape) == tuple(shape), (x_start.shape, shape)
        x = x_start.to(device)
    record = set(int(i) for i in record)
    trace = {"pred_x0": {}, "xt": {}}
    steps = range(t_start, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", unit="step", leave=False)
    for i in steps:
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        if i in record:
            trace["xt"][i] = x.cpu()
        x, pred_x0 = p_sample(diffusion, model, x, t, generator, clip_x0, var_type)
        if i in record:
            trace["pred_x0"][i] = pred_x0.cpu()
    return x, trace


@torch.no_grad()
def interpolate(diffusion: GaussianDiffusion, model: Model, x0_a, x0_b, t: int, lambdas,
                generator: Optional[torch.Generator] = None, var_type=None, progress=False):
    """Fig. 8: x_t^a, x_t^b ~ q(x_t | x_0) (shared noise draw per pair), then decode
    (1 - lambda) x_t^a + lambda x_t^b for each lambda with the reverse process.

    x0_a, x0_b: [C, H, W] images in [-1, 1]. Returns [len(lambdas), C, H, W].
    As in the paper, the same reverse-process noise is used for every lambda, so the
    row varies only through the latent.
    """
    lambdas = torch.as_tensor(list(lambdas), dtype=x0_a.dtype, device=x0_a.device)
    n = len(lambdas)
    tt = torch.full((2,), t, device=x0_a.device, dtype=torch.long)
    noise = _randn((2, *x0_a.shape), generator, x0_a.device, x0_a.dtype)
    xt = diffusion.q_sample(torch.stack([x0_a, x0_b]), tt, noise)
    lam = lambdas.view(-1, 1, 1, 1)
    x_mix = (1 - lam) * xt[0:1] + lam * xt[1:2]

    out = x_mix
    steps = range(t, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="interpolating", unit="step", leave=False)
    for i in steps:
        ti = torch.full((n,), i, device=out.device, dtype=torch.long)
        # The same reverse noise for the whole row: drawn once, broadcast.
        z = _randn((1, *out.shape[1:]), generator, out.device, out.dtype).expand_as(out)
        out, _ = p_sample(diffusion, model, out, ti, var_type=var_type, noise=z)
    return out
