"""Samplers: plain functions over a GaussianDiffusion and a network callable.

- ``sample``: ancestral sampling, DDPM Algorithm 2, with predicted x_0 clipped to
  [-1, 1] and no noise added at the last step (as in the official code). It can
  start from any step with a given x_t, which gives Fig. 7 (samples sharing x_t)
  and Fig. 8 (interpolation in x_t), and can record the predicted x_0 along the
  chain (progressive generation, Fig. 6).
- ``interpolate``: Fig. 8, encode two images with q(x_t | x_0), mix the latents
  linearly, decode with the reverse process.

Beyond the paper, fewer-step samplers on the same checkpoints (no retraining); every
paper number uses ``sample`` with all T steps:
- ``respaced_sample``: DDPM on a subsequence tau of the T steps (Nichol & Dhariwal 2021,
  Sec. 4): the betas of the subsequence are recomputed so that alpha-bar on it is the
  original's, and the reverse step is the posterior of that shorter process.
- ``ddim_sample``: DDIM (Song, Meng & Ermon 2021, Eq. 12) with eta (eta = 1: DDPM's
  beta-tilde variance on the subsequence; eta = 0: deterministic); ``ddim_encode`` runs
  the deterministic ODE the other way (x_0 -> x_T), and ``slerp`` interpolates latents.
- ``timesteps``: the subsequence, ``uniform`` or ``quadratic`` as in the DDIM paper.
Reproducible under a seed: all randomness comes from the ``generator`` passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .diffusion import GaussianDiffusion, Model, VarType


def _randn(shape, generator, device, dtype=torch.float32):
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _steps(steps, progress: bool, desc: str):
    """``steps`` with a progress bar when asked."""
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=desc, unit="step", leave=False)
    return steps


@torch.inference_mode()
def p_sample(diffusion: GaussianDiffusion, model: Model, xt, t, generator=None,
             clip_x0: bool = True, var_type=None, noise=None):
    """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t=1.
    ``noise`` (z) is drawn from ``generator`` unless given."""
    out = diffusion.p_mean_variance(model(xt, t), xt, t, clip_x0=clip_x0, var_type=var_type)
    if noise is None:
        noise = _randn(xt.shape, generator, xt.device, xt.dtype)
    nonzero = (t != 0).to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))  # no noise at index 0
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_var"]) * noise, out["pred_x0"]


@torch.inference_mode()
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
    for i in _steps(range(t_start, -1, -1), progress, "sampling"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        if i in record:
            trace["xt"][i] = x.cpu()
        x, pred_x0 = p_sample(diffusion, model, x, t, generator, clip_x0, var_type)
        if i in record:
            trace["pred_x0"][i] = pred_x0.cpu()
    return x, trace


@torch.inference_mode()
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
    for i in _steps(range(t, -1, -1), progress, "interpolating"):
        ti = torch.full((n,), i, device=out.device, dtype=torch.long)
        # The same reverse noise for the whole row: drawn once, broadcast.
        z = _randn((1, *out.shape[1:]), generator, out.device, out.dtype).expand_as(out)
        out, _ = p_sample(diffusion, model, out, ti, var_type=var_type, noise=z)
    return out


# ----------------------------------------------------------- fewer-step samplers

SKIP_TYPES = ("uniform", "quadratic")


def timesteps(T: int, K: int, skip_type: str = "uniform") -> np.ndarray:
    """K of the T 0-based indices, increasing, as the DDIM paper selects them:
    uniform tau_i = floor(c i) with c = T / K; quadratic tau_i = floor(c i^2) with
    c = 0.8 T / (K - 1)^2 (both start at index 0, the step that outputs x_0)."""
    if not 1 <= K <= T:
        raise ValueError(f"the number of steps must be in [1, {T}], got {K}")
    if skip_type == "uniform":
        tau = (np.arange(K) * T) // K  # exact integer floor
    elif skip_type == "quadratic":
        tau = np.floor(np.linspace(0, np.sqrt(0.8 * T), K) ** 2)
    else:
        raise ValueError(f"unknown step selection {skip_type!r}; valid: {', '.join(SKIP_TYPES)}")
    tau = tau.astype(np.int64)
    if len(np.unique(tau)) != K:
        raise ValueError(f"{skip_type} selection of {K} of {T} steps repeats a step; use uniform or fewer steps")
    return tau


def respace(diffusion: GaussianDiffusion, tau: Sequence[int]) -> GaussianDiffusion:
    """The process on the subsequence ``tau``: beta_i = 1 - abar(tau_i) / abar(tau_{i-1})
    (abar(tau_{-1}) = 1), so alpha-bar on it is the original's; same mean type and
    variance (the trained one, and the sampling variance chosen with with_variance)."""
    tau = np.asarray(tau, dtype=np.int64)
    ac = diffusion.alphas_cumprod[tau]
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    short = GaussianDiffusion(betas, diffusion.mean_type, diffusion.var_type, diffusion.loss_type)
    short.sampling_var = diffusion.sampling_var
    return short


def _learned_fraction(diffusion: GaussianDiffusion, log_var, t):
    """Where a learned log-variance lies between log beta-tilde_t and log beta_t, clamped to
    [0, 1]: what carries over to a respaced step (as improved-diffusion's learned range). Our
    learned head is unconstrained; outside the interval a fraction would be extrapolated over
    the much wider interval of the respaced step (e.g. 1% above beta_t at t = 100 of 1000
    became 47x the respaced beta at K = 10), so it is clamped to the interval's ends."""
    lo = diffusion._extract(diffusion.posterior_log_variance_clipped, t, log_var)
    hi = diffusion._extract(diffusion.log_betas, t, log_var)
    return ((log_var - lo) / (hi - lo)).clamp(0.0, 1.0)


def _pred_x0(diffusion, model, x, t_orig, clip_x0):
    out = diffusion.p_mean_variance(model(x, t_orig), x, t_orig, clip_x0=clip_x0)
    return out["pred_x0"], out["log_var"]


def _loop(tau, progress, desc):
    return _steps(range(len(tau) - 1, -1, -1), progress, desc)


@torch.inference_mode()
def respaced_sample(diffusion: GaussianDiffusion, model: Model, shape, tau: Sequence[int],
                    generator: Optional[torch.Generator] = None, device="cpu", x_start=None,
                    clip_x0: bool = True, progress: bool = False):
    """Ancestral sampling (Algorithm 2) of the respaced process on ``tau``: the network is
    asked at the original index tau_i; its x_0 prediction (clipped) gives the posterior
    mean of the shorter process, with that process's beta / beta-tilde (the learned
    variance keeps its place between the two). No noise at the last step. With tau =
    0..T-1 this is ``sample`` exactly."""
    short = respace(diffusion, tau)
    tau_t = torch.as_tensor(np.asarray(tau), device=device)
    x = _randn(tuple(shape), generator, device) if x_start is None else x_start.to(device)
    for i in _loop(tau, progress, "respaced sampling"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        pred_x0, log_var = _pred_x0(diffusion, model, x, tau_t[t], clip_x0)
        mean, _, _ = short.q_posterior(pred_x0, x, t)
        if short.sampling_var == VarType.LEARNED:
            frac = _learned_fraction(diffusion, log_var, tau_t[t])
            lo = short._extract(short.posterior_log_variance_clipped, t, x)
            log_var = lo + frac * (short._extract(short.log_betas, t, x) - lo)
        else:
            log_var = short._fixed_log_variance(short.sampling_var, t, x)
        noise = _randn(x.shape, generator, x.device, x.dtype)
        x = mean + (i > 0) * torch.exp(0.5 * log_var) * noise
    return x


@torch.inference_mode()
def ddim_sample(diffusion: GaussianDiffusion, model: Model, shape, tau: Sequence[int], eta: float = 0.0,
                generator: Optional[torch.Generator] = None, device="cpu", x_start=None,
                clip_x0: bool = True, progress: bool = False):
    """DDIM, Song et al. 2021, Eq. 12, on the subsequence ``tau`` (prev = the step before):
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    x0_hat is the network's prediction (clipped), eps_hat the noise consistent with it;
    at the last step abar_prev = 1, so the output is x0_hat."""
    if not 0.0 <= eta <= 1.0:  # also rejects nan
        raise ValueError(f"eta must be in [0, 1] (0: DDIM, 1: DDPM's beta-tilde), got {eta}")
    tau = np.asarray(tau, dtype=np.int64)
    ac = diffusion.alphas_cumprod[tau]
    ac_prev = np.append(1.0, ac[:-1])
    x = _randn(tuple(shape), generator, device) if x_start is None else x_start.to(device)
    for i in _loop(tau, progress, "DDIM sampling"):
        t = torch.full((x.shape[0],), int(tau[i]), device=x.device, dtype=torch.long)
        pred_x0, _ = _pred_x0(diffusion, model, x, t, clip_x0)
        eps = diffusion.eps_from_x0(x, t, pred_x0)
        a, a_prev = float(ac[i]), float(ac_prev[i])
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        x = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev - sigma ** 2) * eps  # sigma^2 <= 1 - a_prev for eta <= 1
        if sigma > 0:
            x = x + sigma * _randn(x.shape, generator, x.device, x.dtype)
    return x


@torch.inference_mode()
def ddim_encode(diffusion: GaussianDiffusion, model: Model, x0, tau: Sequence[int], clip_x0: bool = False,
                progress: bool = False):
    """The deterministic DDIM ODE from data to latent (the DDIM paper's reconstruction
    experiment): x0 is taken as x at tau_0, then x_next = sqrt(abar_next) x0_hat +
    sqrt(1 - abar_next) eps_hat up to tau_{K-1}. ``ddim_sample`` with eta = 0 decodes it
    approximately: both are first-order steps of the ODE, so the round trip is exact only
    in the limit of small steps (and for a model whose x0_hat does not depend on x_t)."""
    tau = np.asarray(tau, dtype=np.int64)
    ac = diffusion.alphas_cumprod[tau]
    x = x0
    for i in _steps(range(len(tau) - 1), progress, "DDIM encoding"):
        t = torch.full((x.shape[0],), int(tau[i]), device=x.device, dtype=torch.long)
        pred_x0, _ = _pred_x0(diffusion, model, x, t, clip_x0)
        eps = diffusion.eps_from_x0(x, t, pred_x0)
        x = np.sqrt(ac[i + 1]) * pred_x0 + np.sqrt(1 - ac[i + 1]) * eps
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation between two latents (the DDIM paper's x_T interpolation)."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if theta.abs() < 1e-7:
        return (1 - lam) * a + lam * b
    return (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / torch.sin(theta)


# ------------------------------------------------------------------ the choice


class SamplerKind(str, enum.Enum):
    ANCESTRAL = "ancestral"  # DDPM Algorithm 2 over all T steps: every paper number
    RESPACED = "respaced"  # DDPM on K of the T steps (Nichol & Dhariwal 2021)
    DDIM = "ddim"  # DDIM Eq. 12 on K of the T steps, with eta (Song et al. 2021)


@dataclass(frozen=True)
class Sampler:
    """How samples are drawn; recorded with every sample set (``describe``, ``to_dict``)."""

    kind: SamplerKind = SamplerKind.ANCESTRAL
    steps: Optional[int] = None  # K of the T steps (respaced, ddim); None: all T
    eta: float = 0.0  # ddim only
    skip: str = "uniform"  # how the K steps are chosen (respaced, ddim): uniform | quadratic

    def __post_init__(self):
        kind = SamplerKind(self.kind)
        object.__setattr__(self, "kind", kind)
        if kind == SamplerKind.ANCESTRAL and (self.steps is not None or self.eta or self.skip != "uniform"):
            raise ValueError("the ancestral sampler runs all T steps: --steps, --eta and --skip belong to "
                             "--sampler respaced or ddim")
        if kind == SamplerKind.RESPACED and self.eta:
            raise ValueError("--eta belongs to --sampler ddim (respaced DDPM has its own variances)")
        if not 0.0 <= self.eta <= 1.0:  # also rejects nan and inf
            raise ValueError(f"--eta {self.eta}: must be in [0, 1] (0: DDIM, 1: DDPM's beta-tilde variance)")
        if self.skip not in SKIP_TYPES:
            raise ValueError(f"--skip {self.skip!r}: one of {', '.join(SKIP_TYPES)}")

    def tau(self, T: int) -> np.ndarray:
        return timesteps(T, T if self.steps is None else self.steps, self.skip)

    def describe(self, T: int) -> str:
        tail = "predicted x0 clipped to [-1, 1], no noise at the last step"
        if self.kind == SamplerKind.ANCESTRAL:
            return f"ancestral (DDPM Algorithm 2), {tail}"
        K = len(self.tau(T))
        if self.kind == SamplerKind.RESPACED:
            return f"respaced DDPM on {K} of {T} steps ({self.skip}; Nichol & Dhariwal 2021), {tail}"
        return f"DDIM (Song et al. 2021, Eq. 12) on {K} of {T} steps ({self.skip}), eta {self.eta:g}, {tail}"

    def to_dict(self, T: int) -> Dict[str, Any]:
        return {"sampler": self.kind.value, "steps": int(len(self.tau(T))), "of_T": int(T),
                "eta": float(self.eta) if self.kind == SamplerKind.DDIM else None,
                "skip": None if self.kind == SamplerKind.ANCESTRAL else self.skip}

    def __call__(self, diffusion: GaussianDiffusion, model: Model, shape, generator=None, device="cpu",
                 clip_x0: bool = True, progress: bool = False) -> torch.Tensor:
        if self.kind == SamplerKind.ANCESTRAL:
            return sample(diffusion, model, shape, generator, device, clip_x0=clip_x0, progress=progress)[0]
        tau = self.tau(diffusion.T)
        if self.kind == SamplerKind.RESPACED:
            return respaced_sample(diffusion, model, shape, tau, generator, device, clip_x0=clip_x0,
                                   progress=progress)
        return ddim_sample(diffusion, model, shape, tau, self.eta, generator, device, clip_x0=clip_x0,
                           progress=progress)


ANCESTRAL = Sampler()
