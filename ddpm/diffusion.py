"""The DDPM process: schedules, forward process, posterior, reverse process, losses, bound.

Everything here is the paper's math (Ho, Jain & Abbeel 2020, arXiv 2006.11239) and
nothing else: no IO, no knowledge of the network. The network is any callable
``model(x_t, t) -> output`` whose output this module turns into a mean and variance.

Conventions (as in the official diffusion_tf/diffusion_utils_2.py):
- ``t`` is a 0-based index tensor of shape [B]; index ``t`` is the paper's step t+1.
  So index 0 is the paper's t=1 (the decoder step), index T-1 the paper's t=T.
- Schedule-derived constants are computed in float64 and cast on use.
- Images live in [-1, 1] (x/127.5 - 1); D = C*H*W.
- Names carry shapes where it helps: ``terms_bpd_bt`` is [B, T].
"""

from __future__ import annotations

import copy
import enum
import math
from typing import Callable, Optional

import numpy as np
import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Choice(str, enum.Enum):
    """A named ablation choice: compares, prints and serialises as its value ("eps")."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # messages quote choices as they are typed: 'learned'
        return repr(self.value)

    def __format__(self, spec: str) -> str:  # f-strings print the value (as Python 3.12+ does)
        return format(self.value, spec)

    @classmethod
    def parse(cls, value) -> "Choice":
        """``value`` as this choice, or ValueError naming the valid ones."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {cls.__name__} {value!r}; valid: "
                             f"{', '.join(m.value for m in cls)}") from None


class MeanType(Choice):
    """What the network predicts, from which the reverse-process mean is built."""

    EPS = "eps"  # the noise epsilon (Eq. 11); the paper's choice
    MU = "mu"  # the posterior mean mu-tilde itself (official code: "xprev")
    X0 = "x0"  # the clean image x_0 (official code: "xstart")


class VarType(Choice):
    """The reverse-process variance sigma_t^2."""

    BETA = "beta"  # sigma^2 = beta_t (official "fixedlarge"); see _fixed_log_variance for t=1
    BETA_TILDE = "beta_tilde"  # sigma^2 = beta-tilde_t, the posterior variance ("fixedsmall")
    LEARNED = "learned"  # the network also outputs a per-pixel log-variance (Table 2)


class LossType(Choice):
    """The training objective."""

    SIMPLE = "simple"  # Eq. 14: unweighted MSE on the parameterization's own target
    MU_MSE = "mu_mse"  # ||mu-tilde - mu_theta||^2, unweighted, for any parameterization
    VLB = "vlb"  # the true bound term L_{t-1} (Eq. 5) for a uniformly sampled t


class Schedule(Choice):
    LINEAR = "linear"  # the paper: beta from 1e-4 to 0.02 (config diffusion.beta_start/beta_end)
    COSINE = "cosine"  # Nichol & Dhariwal 2021, Eq. 17


def _enum(cls, value):
    return cls.parse(value)


def check_combination(mean_type, var_type, loss_type) -> None:
    """Reject ablation combinations that have no meaning, saying why."""
    mean_type, var_type, loss_type = (
        _enum(MeanType, mean_type),
        _enum(VarType, var_type),
        _enum(LossType, loss_type),
    )
    if var_type == VarType.LEARNED and loss_type != LossType.VLB:
        raise ValueError(
            f"var_type='learned' with loss_type='{loss_type.value}': an MSE loss gives the "
            "variance output no gradient, so it would never be learned. Use loss_type='vlb' "
            "(Table 2's 'L, learned diagonal Sigma' row), or a fixed var_type "
            "('beta' or 'beta_tilde')."
        )


# ----------------------------------------------------------------------------- schedules


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The paper's schedule (Sec. 4): linear in float64, as in the official code.

    The endpoints are the paper's for T=1000. For other T they are scaled by 1000/T
    so that the chain still ends near pure noise (Nichol & Dhariwal 2021, Sec. 3.2
    note on T): for T=1000 this is exactly 1e-4 .. 0.02.
    """
    scale = 1000.0 / T
    if beta_end * scale >= 1.0:
        raise ValueError(f"T={T} is too small for the linear schedule (beta_T = "
                         f"{beta_end * scale:.3g} >= 1); use T >= {int(beta_end * 1000) + 1}")
    return np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, Eq. 17: alpha-bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    steps = np.arange(T + 1, dtype=np.float64) / T
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0.0, max_beta)  # Eq. 17's clipping, to avoid singularities at t=T


def make_betas(schedule, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """beta_1..beta_T; ``beta_start``/``beta_end``: the linear schedule's endpoints for T = 1000
    (config diffusion.beta_start/beta_end; see linear_betas for other T), unused by cosine."""
    schedule = _enum(Schedule, schedule)
    if T < 2:
        raise ValueError(f"T must be at least 2, got {T}")
    return linear_betas(T, beta_start, beta_end) if schedule == Schedule.LINEAR else cosine_betas(T)


# ------------------------------------------------------------------------ distributions


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) for x in {-1, -1+2/255, ..., 1} under a Gaussian discretized to 256 bins.

    The paper's decoder L_0 (Eq. 13): bins of width 2/255 centred on the pixel values;
    the outer bins are open (-inf, -1+1/255] and [1-1/255, inf), detected, as in the
    official code, by x < -0.999 and x > 0.999. Computed in float64 with the exact
    normal CDF (the official code uses a tanh approximation of the CDF), clamped at
    1e-12 like the official code. ``log_scales`` is the log standard deviation.
    """
    assert x.shape == means.shape, (x.shape, means.shape)
    x64, m64 = x.double(), means.double()
    log_scales = torch.as_tensor(log_scales, dtype=torch.float64, device=x.device)
    inv_stdv = torch.exp(-log_scales)
    centered = x64 - m64
    upper = inv_stdv * (centered + 1.0 / 255.0)
    lower = inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.log(torch.special.ndtr(upper).clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log(torch.special.ndtr(-lower).clamp(min=1e-12))
    # ndtr(-lower) - ndtr(-upper) == ndtr(upper) - ndtr(lower), but without
    # cancellation when both edges lie in the upper tail.
    delta = torch.where(
        centered > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_probs = torch.where(
        x64 < -0.999,
        log_cdf_upper,
        torch.where(x64 > 0.999, log_one_minus_cdf_lower, torch.log(delta.clamp(min=1e-12))),
    )
    return log_probs.to(x.dtype if x.dtype == torch.float64 else torch.float32)


def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


# ------------------------------------------------------------------------------ process


class GaussianDiffusion:
    """The forward process q and the reverse process p_theta of DDPM."""

    def __init__(self, betas: np.ndarray, mean_type="eps", var_type="beta", loss_type="simple"):
        self.mean_type = _enum(MeanType, mean_type)
        self.var_type = _enum(VarType, var_type)
        self.loss_type = _enum(LossType, loss_type)
        check_combination(self.mean_type, self.var_type, self.loss_type)

        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.T = T = len(betas)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)
        self.alphas_cumprod_prev = ac_prev = np.append(1.0, ac[:-1])
        assert ac_prev.shape == (T,)
        # q(x_t | x_0), Eq. 4
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        # q(x_{t-1} | x_t, x_0), Eqs. 6-7
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # beta-tilde_1 = 0, so its log is clipped to beta-tilde_2 (official code: "log
        # calculation clipped because the posterior variance is 0 at the beginning").
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        # the fixed reverse variances: sigma^2 = beta_t, except at the paper's t=1 (index 0),
        # where the official code uses beta-tilde_2 "for a better decoder log likelihood"
        self.log_betas = np.log(betas)
        self.beta_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self._on_device: dict = {}  # (table name, device) -> float64 tensor: copied once, not per call
        # The variance p_theta uses: the trained one, unless with_variance() chose another.
        self.sampling_var = self.var_type

    def with_variance(self, var_type) -> "GaussianDiffusion":
        """This process, sampled and evaluated with the variance ``var_type`` (a fixed
        variance can replace any trained one: one checkpoint, either fixed variance)."""
        v = _enum(VarType, var_type)
        if v == VarType.LEARNED and self.var_type != VarType.LEARNED:
            raise ValueError("var_type='learned' needs a model trained with a learned variance")
        other = copy.copy(self)
        other.sampling_var = v
        return other

    # -------------------------------------------------------------------- helpers
    def _extract(self, arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as a tensor broadcastable to x (float64 constants cast to x's dtype). The
        process's own tables are copied to t's device once and kept there (no host copy per
        call: sampling calls this thousands of times)."""
        assert t.ndim == 1 and t.shape[0] == x.shape[0], (t.shape, x.shape)
        name = next((k for k, v in vars(self).items() if v is arr), None)
        if name is None:
            table = torch.from_numpy(arr).to(device=t.device)
        else:
            table = self._on_device.get((name, t.device))
            if table is None:
                table = self._on_device[(name, t.device)] = torch.from_numpy(arr).to(device=t.device)
        return table[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def model_out_channels(self, data_channels: int) -> int:
        """Channels the network must output: doubled when it also outputs a variance."""
        return 2 * data_channels if self.var_type == VarType.LEARNED else data_channels

    # -------------------------------------------------------------- forward process
    def q_mean_variance(self, x0, t):
        """Mean, variance and log-variance of q(x_t | x_0) (Eq. 4)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        var = self._extract(1.0 - self.alphas_cumprod, t, x0)
        log_var = self._extract(self.log_one_minus_alphas_cumprod, t, x0)
        return mean, var, log_var

    def q_sample(self, x0, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4, reparameterized)."""
        if noise is None:
            noise = torch.randn_like(x0)
        assert noise.shape == x0.shape
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0, xt, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eqs. 6-7)."""
        assert x0.shape == xt.shape
        mean = (self._extract(self.posterior_mean_coef1, t, xt) * x0
                + self._extract(self.posterior_mean_coef2, t, xt) * xt)
        var = self._extract(self.posterior_variance, t, xt)
        log_var = self._extract(self.posterior_log_variance_clipped, t, xt)
        return mean, var, log_var

    # ------------------------------------------------- parameterization conversions
    def x0_from_eps(self, xt, t, eps):
        """Invert Eq. 4: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps)

    def eps_from_x0(self, xt, t, x0):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt))

    def x0_from_mu(self, xt, t, mu):
        """Invert Eq. 7's mean: x_0 = (mu - coef2 x_t) / coef1."""
        return ((mu - self._extract(self.posterior_mean_coef2, t, xt) * xt)
                / self._extract(self.posterior_mean_coef1, t, xt))

    # ------------------------------------------------------------- reverse process
    def _fixed_log_variance(self, var_type: VarType, t, x):
        if var_type == VarType.BETA:
            log_var = self.beta_log_variance  # beta_t; beta-tilde_2 at index 0 (see __init__)
        else:
            log_var = self.posterior_log_variance_clipped
        return self._extract(log_var, t, x).expand_as(x)

    def p_mean_variance(self, model_output, xt, t, clip_x0: bool = False, var_type=None):
        """Turn the network output at (x_t, t) into p_theta(x_{t-1} | x_t).

        Returns a dict with ``mean``, ``log_var`` (per pixel), ``pred_x0``.
        ``var_type`` overrides the fixed variance at sampling/evaluation time (a model
        trained once can be used with either fixed variance). With ``clip_x0`` the
        predicted x_0 is clipped to [-1, 1] and, for eps and x0 prediction, the mean
        is rebuilt from it through the posterior (Eq. 7), as in the official code.
        """
        var_type = self.sampling_var if var_type is None else _enum(VarType, var_type)
        C = xt.shape[1]
        if self.var_type == VarType.LEARNED:
            assert model_output.shape[1] == 2 * C, (model_output.shape, xt.shape)
            model_output, model_log_var = model_output[:, :C], model_output[:, C:]
        else:
            if var_type == VarType.LEARNED:
                raise ValueError("var_type='learned' needs a model trained with a learned variance")
            model_log_var = None
        assert model_output.shape == xt.shape, (model_output.shape, xt.shape)
        log_var = model_log_var if var_type == VarType.LEARNED else self._fixed_log_variance(var_type, t, xt)

        def maybe_clip(x):
            return x.clamp(-1.0, 1.0) if clip_x0 else x

        if self.mean_type == MeanType.MU:
            mean = model_output  # the network's mean is used as is, as in the official code
            pred_x0 = maybe_clip(self.x0_from_mu(xt, t, model_output))
        else:
            if self.mean_type == MeanType.EPS:  # Eq. 11, written through x_0
                pred_x0 = maybe_clip(self.x0_from_eps(xt, t, model_output))
            else:
                pred_x0 = maybe_clip(model_output)
            mean, _, _ = self.q_posterior(pred_x0, xt, t)
        return {"mean": mean, "log_var": log_var, "pred_x0": pred_x0}

    # --------------------------------------------------------------------- losses
    def _vb_terms_nats(self, out, x0, xt, t):
        """Per-example bound term in nats: KL(q(x_{t-1}|x_t,x_0) || p) for index t > 0
        (L_{t-1}, Eq. 5), decoder NLL -log p(x_0|x_1) for index 0 (L_0, Eq. 13).
        Summed (not averaged) over dimensions."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_var"])
        kl = kl.flatten(1).sum(1)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_var"])
        nll = nll.flatten(1).sum(1)
        return torch.where(t == 0, nll, kl)

    def vb_terms_bpd(self, model_output, x0, xt, t, clip_x0=False, var_type=None):
        """The bound term at each (x_0, t) in bits/dim, plus the predicted x_0."""
        out = self.p_mean_variance(model_output, xt, t, clip_x0=clip_x0, var_type=var_type)
        D = x0[0].numel()
        return self._vb_terms_nats(out, x0, xt, t) / (D * math.log(2.0)), out["pred_x0"]

    def training_losses(self, model: Model, x0, t, noise=None):
        """Per-example training loss for the configured objective.

        Returns a dict of [B] tensors: ``loss`` (what is minimized), and, where
        defined, ``mse`` and ``vb`` (bits/dim).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        model_output = model(xt, t)
        terms = {}
        if self.loss_type == LossType.VLB:
            # The official 'kl' loss: the bound term for a uniformly sampled t, no x0
            # clipping. Rescaled from bits/dim to nats per example would only change the
            # learning rate; we keep the official bits/dim scale.
            terms["vb"], _ = self.vb_terms_bpd(model_output, x0, xt, t, clip_x0=False)
            terms["loss"] = terms["vb"]
            return terms
        C = x0.shape[1]
        pred = model_output[:, :C] if self.var_type == VarType.LEARNED else model_output
        if self.loss_type == LossType.SIMPLE:
            target = {MeanType.EPS: noise, MeanType.X0: x0,
                      MeanType.MU: self.q_posterior(x0, xt, t)[0]}[self.mean_type]
            terms["mse"] = mean_flat((target - pred) ** 2)  # Eq. 14 for eps
        else:  # MU_MSE: ||mu-tilde(x_t, x_0) - mu_theta(x_t, t)||^2
            out = self.p_mean_variance(model_output, xt, t, clip_x0=False)
            terms["mse"] = mean_flat((self.q_posterior(x0, xt, t)[0] - out["mean"]) ** 2)
        terms["loss"] = terms["mse"]
        return terms

    # ---------------------------------------------------------------------- bound
    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example."""
        t = torch.full((x0.shape[0],), self.T - 1, device=x0.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
        return mean_flat(kl) / math.log(2.0)

    @torch.inference_mode()
    def calc_bpd_loop(self, model: Model, x0, clip_x0: bool = True, var_type=None,
                      max_batch: int = 256, generator: Optional[torch.Generator] = None,
                      progress: bool = False):
        """Every term of the variational bound (Eq. 5) for a batch of images.

        Fresh noise is drawn for each t (as in the official code). Network calls are
        batched over images *and* timesteps: each call evaluates up to ``max_batch``
        (image, t) pairs. Returns a dict (all in bits/dim unless named mse):
          total_bpd_b [B]: L_T + sum_t L_{t-1} + L_0, the NLL bound;
          prior_bpd_b [B]: L_T;
          terms_bpd_bt [B, T]: column 0 is the decoder term L_0; column i > 0 is the
              KL term L_i of the paper (its step t = i+1, 0-based index i);
          mse_bt [B, T]: mean squared error of the predicted x_0 at each t.
        """
        B, T = x0.shape[0], self.T
        device = x0.device
        terms_bpd_bt = torch.zeros(B, T, device=device, dtype=torch.float64)
        mse_bt = torch.zeros(B, T, device=device, dtype=torch.float64)
        steps_per_call = max(1, max_batch // B)
        chunks = range(0, T, steps_per_call)
        if progress:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc="bound", unit="chunk", leave=False)
        for start in chunks:
            ts = torch.arange(start, min(start + steps_per_call, T), device=device)
            k = len(ts)
            x0_rep = x0.repeat(k, *([1] * (x0.ndim - 1)))  # [k*B, ...], t-major
            t_rep = ts.repeat_interleave(B)
            noise = torch.randn(x0_rep.shape, generator=generator, device=device, dtype=x0.dtype)
            xt = self.q_sample(x0_rep, t_rep, noise)
            bpd, pred_x0 = self.vb_terms_bpd(model(xt, t_rep), x0_rep, xt, t_rep,
                                             clip_x0=clip_x0, var_type=var_type)
            terms_bpd_bt[:, start:start + k] = bpd.view(k, B).T.double()
            mse_bt[:, start:start + k] = mean_flat((pred_x0 - x0_rep) ** 2).view(k, B).T.double()
        prior_bpd_b = self.prior_bpd(x0).double()
        total_bpd_b = terms_bpd_bt.sum(1) + prior_bpd_b
        return {"total_bpd_b": total_bpd_b, "prior_bpd_b": prior_bpd_b,
                "terms_bpd_bt": terms_bpd_bt, "mse_bt": mse_bt}
