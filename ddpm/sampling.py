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

Compiled sampling (``compile=True`` on every sampler; ``generate(compile=True)``, ``ddpm sample
--compile``, ``ddpm eval --compile``). Each sampler's loop body is one step function of tensors
(``_ancestral_step``, ``_respaced_step``, ``_ddim_step``: the network call, the posterior mean
and variance of ddpm.diffusion, and the noise added), run eagerly by default or, compiled,
through ``CompiledStep``: torch.compile of the whole step with fixed shapes (dynamic=False,
fullgraph=True, so a graph break is an error rather than a silently slower half-compiled step).
What is captured: that step, for one batch shape, as one graph; on CUDA in mode
"reduce-overhead", i.e. replayed as a CUDA graph: the 1000 steps run the same shapes, so the
launch cost of the UNet's few hundred kernels and of the posterior's elementwise ones, which
weighs most at small batches, goes away ("max-autotune-no-cudagraphs" was not chosen: it
spends minutes timing kernel variants for each shape, and at large batches, where launches
matter least, the convolutions are cuDNN's either way, timed by runtime.cudnn_benchmark).
On the CPU torch's default mode (inductor's fused C++ kernels). What is not captured:
the loop itself, the time step's index and the coefficients looked up for it (passed in as
tensors, so one graph serves every step), and the noise: drawn outside the compiled function
from the same generator, in the same order, as the eager path draws it, so both sample the
same chain up to float rounding (tests/test_compiled_sampling.py states the tolerance). A
smaller batch (the last of a set) is padded to the largest batch the step has run (zeros for
x and the noise, the same t) and cut back, rather than compiled again; the rows are
independent (GroupNorm and attention are per image), so padding changes nothing but
rounding. Not compiled: ``interpolate``, ``ddim_encode`` and the bound (ddpm.bound). The
speed is measured by experiments/benchmark_speed.py, not by the tests. (Not yet run on a GPU:
CUDA graphs keep their memory pool for the life of the process, so under ``ddpm eval
--compile`` the bound that follows the samples has that much less GPU memory.)
"""

from __future__ import annotations

import enum
import weakref
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


# ---------------------------------------------------- one step, run eagerly or compiled


class EagerStep:
    """Runs a step function as it is (the default)."""

    compiled = False

    def __call__(self, fn, x, t, noise, *rest):
        return fn(x, t, noise, *rest)


class CompiledStep:
    """Runs a step function ``fn(x, t, noise, *rest)`` through torch.compile (the module
    docstring says what is captured and why this mode). x, t and noise carry the batch; a
    smaller batch than the largest this step has run with the same image shape is padded to it
    (zeros; t repeats its first entry) and the result cut back, so the last batch of a set
    reuses the graph instead of compiling another."""

    compiled = True

    def __init__(self, mode: Optional[str]):
        self.mode = mode
        self._fns: Dict[Any, Any] = {}
        self._batch: Dict[tuple, int] = {}
        self._warm: "weakref.WeakKeyDictionary[GaussianDiffusion, set]" = weakref.WeakKeyDictionary()

    def __call__(self, fn, x, t, noise, *rest):
        compiled = self._fns.get(fn)
        if compiled is None:
            compiled = self._fns[fn] = torch.compile(fn, mode=self.mode, dynamic=False, fullgraph=True)
        for a in rest:
            if isinstance(a, GaussianDiffusion) and x.device not in self._warm.setdefault(a, set()):
                _tables_on_device(a, x.device)
                self._warm[a].add(x.device)
        n = x.shape[0]
        # the largest batch run so far by this step, for these images and these arguments (the
        # network among them): a batch that failed (out of memory) is not recorded
        key = (fn, tuple(x.shape[1:]), x.dtype, x.device, tuple(id(a) for a in rest))
        B = max(n, self._batch.get(key, 0))
        if B > n:
            x, noise = (torch.cat([a, a.new_zeros((B - n, *a.shape[1:]))]) for a in (x, noise))
            t = torch.cat([t, t[:1].expand(B - n)])
        # Out of inference mode (plain no_grad): dynamo's guards on the diffusion's numpy tables
        # fail under inference_mode in torch 2.14 ("Guard failed on the same frame it was created").
        # x is then a plain tensor at every step (an inference tensor, as x_T is, has other
        # dispatch keys: a second graph).
        with torch.inference_mode(False), torch.no_grad():
            x = x.clone() if x.is_inference() else x
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # a new step: the last replay's outputs are done
            out = compiled(x, t, noise, *rest)
            # A CUDA graph's outputs are overwritten by its next replay: keep copies (cut back to n
            # rows), made here, out of inference mode, so the next step need not copy x again.
            keep = (lambda a: a[:n].clone()) if self.mode == "reduce-overhead" else (lambda a: a[:n])
            out = tuple(keep(a) for a in out) if isinstance(out, tuple) else keep(out)
        self._batch[key] = B
        return out


def _tables_on_device(diffusion: GaussianDiffusion, device) -> None:
    """Every table of ``diffusion`` copied to ``device`` once, before a compiled step looks one
    up: the copy is then an input of the graph, not a side effect traced into it (which, under
    CUDA graphs, would keep a table in memory that the next replay overwrites)."""
    t = torch.zeros(1, dtype=torch.long, device=device)
    x = torch.zeros(1, device=device)
    for v in list(vars(diffusion).values()):
        if isinstance(v, np.ndarray) and v.ndim == 1:
            diffusion._extract(v, t, x)


_COMPILED: Dict[Optional[str], CompiledStep] = {}  # one per mode: torch.compile's cache lives with it


def compile_mode(device) -> Optional[str]:
    """torch.compile's mode for sampling on ``device``: CUDA graphs on CUDA, the default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def stepper(compile: bool, device):
    """How a sampler runs its steps: EagerStep, or the CompiledStep of ``device``'s mode."""
    if not compile:
        return EagerStep()
    mode = compile_mode(device)
    if mode not in _COMPILED:
        _COMPILED[mode] = CompiledStep(mode)
    return _COMPILED[mode]


def _ancestral_step(x, t, noise, diffusion: GaussianDiffusion, model: Model, clip_x0: bool = True,
                    var_type=None):
    """Algorithm 2's step with its noise z given: (x_{t-1}, predicted x_0); z = 0 at index 0."""
    out = diffusion.p_mean_variance(model(x, t), x, t, clip_x0=clip_x0, var_type=var_type)
    nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # no noise at index 0
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_var"]) * noise, out["pred_x0"]


@torch.inference_mode()
def p_sample(diffusion: GaussianDiffusion, model: Model, xt, t, generator=None,
             clip_x0: bool = True, var_type=None, noise=None):
    """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t=1.
    ``noise`` (z) is drawn from ``generator`` unless given."""
    if noise is None:  # the network draws nothing from the generator: the same draws as after it
        noise = _randn(xt.shape, generator, xt.device, xt.dtype)
    return _ancestral_step(xt, t, noise, diffusion, model, clip_x0, var_type)


@torch.inference_mode()
def sample(diffusion: GaussianDiffusion, model: Model, shape, generator: Optional[torch.Generator] = None,
           device="cpu", x_start: Optional[torch.Tensor] = None, t_start: Optional[int] = None,
           clip_x0: bool = True, var_type=None, record: Iterable[int] = (), progress: bool = False,
           compile: bool = False):
    """DDPM Algorithm 2 (ancestral sampling).

    shape: [B, C, H, W] of the samples.
    x_start, t_start: start from x_t at 0-based index ``t_start`` (default: x_T ~ N(0, I)
        at index T-1). The chain then runs indices t_start, ..., 0.
    record: 0-based indices at which to keep the predicted x_0 (Fig. 6); returned as
        a dict {index: [B, C, H, W]} under ``pred_x0``, together with x_t itself
        (before the step at that index) under ``xt``.
    compile: each step through torch.compile (``CompiledStep``; the module docstring).
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
    step = stepper(compile, x.device)
    for i in _steps(range(t_start, -1, -1), progress, "sampling"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        if i in record:
            trace["xt"][i] = x.cpu()
        noise = _randn(x.shape, generator, x.device, x.dtype)
        x, pred_x0 = step(_ancestral_step, x, t, noise, diffusion, model, clip_x0, var_type)
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


def _respaced_step(x, t, noise, diffusion: GaussianDiffusion, short: GaussianDiffusion, model: Model,
                   tau_t: torch.Tensor, clip_x0: bool):
    """x at index t - 1 of the respaced process ``short`` from x at index t (0-based into tau)."""
    pred_x0, log_var = _pred_x0(diffusion, model, x, tau_t[t], clip_x0)
    mean, _, _ = short.q_posterior(pred_x0, x, t)
    if short.sampling_var == VarType.LEARNED:
        frac = _learned_fraction(diffusion, log_var, tau_t[t])
        lo = short._extract(short.posterior_log_variance_clipped, t, x)
        log_var = lo + frac * (short._extract(short.log_betas, t, x) - lo)
    else:
        log_var = short._fixed_log_variance(short.sampling_var, t, x)
    nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # no noise at the last step
    return mean + nonzero * torch.exp(0.5 * log_var) * noise


@torch.inference_mode()
def respaced_sample(diffusion: GaussianDiffusion, model: Model, shape, tau: Sequence[int],
                    generator: Optional[torch.Generator] = None, device="cpu", x_start=None,
                    clip_x0: bool = True, progress: bool = False, compile: bool = False):
    """Ancestral sampling (Algorithm 2) of the respaced process on ``tau``: the network is
    asked at the original index tau_i; its x_0 prediction (clipped) gives the posterior
    mean of the shorter process, with that process's beta / beta-tilde (the learned
    variance keeps its place between the two). No noise at the last step. With tau =
    0..T-1 this is ``sample`` exactly."""
    short = respace(diffusion, tau)
    tau_t = torch.as_tensor(np.asarray(tau), device=device)
    x = _randn(tuple(shape), generator, device) if x_start is None else x_start.to(device)
    step = stepper(compile, x.device)
    for i in _loop(tau, progress, "respaced sampling"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        noise = _randn(x.shape, generator, x.device, x.dtype)
        x = step(_respaced_step, x, t, noise, diffusion, short, model, tau_t, clip_x0)
    return x


def _ddim_step(x, t, noise, diffusion: GaussianDiffusion, model: Model, coef, clip_x0: bool):
    """Eq. 12 at original index t with coef = (sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), sigma)
    (floats, or a tensor of three); ``noise`` None: sigma = 0."""
    pred_x0, _ = _pred_x0(diffusion, model, x, t, clip_x0)
    eps = diffusion.eps_from_x0(x, t, pred_x0)
    x = coef[0] * pred_x0 + coef[1] * eps
    return x if noise is None else x + coef[2] * noise


@torch.inference_mode()
def ddim_sample(diffusion: GaussianDiffusion, model: Model, shape, tau: Sequence[int], eta: float = 0.0,
                generator: Optional[torch.Generator] = None, device="cpu", x_start=None,
                clip_x0: bool = True, progress: bool = False, compile: bool = False):
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
    coefs = []
    for a, a_prev in zip(ac.tolist(), ac_prev.tolist()):
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
        coefs.append((np.sqrt(a_prev), np.sqrt(1 - a_prev - sigma ** 2), sigma))  # sigma^2 <= 1 - a_prev for eta <= 1
    step = stepper(compile, x.device)
    if step.compiled:  # tensors: a float argument would be compiled into the graph, one graph per step;
        # one allocation each (rows of one table would be views that inductor finds misaligned)
        coefs_t = [torch.tensor(c, dtype=x.dtype, device=x.device) for c in coefs]
    for i in _loop(tau, progress, "DDIM sampling"):
        t = torch.full((x.shape[0],), int(tau[i]), device=x.device, dtype=torch.long)
        noise = _randn(x.shape, generator, x.device, x.dtype) if coefs[i][2] > 0 else None
        if step.compiled:
            x = step(_ddim_step, x, t, torch.zeros_like(x) if noise is None else noise, diffusion, model,
                     coefs_t[i], clip_x0)
        else:
            x = step(_ddim_step, x, t, noise, diffusion, model, coefs[i], clip_x0)
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
                 clip_x0: bool = True, progress: bool = False, compile: bool = False) -> torch.Tensor:
        kw = dict(clip_x0=clip_x0, progress=progress, compile=compile)
        if self.kind == SamplerKind.ANCESTRAL:
            return sample(diffusion, model, shape, generator, device, **kw)[0]
        tau = self.tau(diffusion.T)
        if self.kind == SamplerKind.RESPACED:
            return respaced_sample(diffusion, model, shape, tau, generator, device, **kw)
        return ddim_sample(diffusion, model, shape, tau, self.eta, generator, device, **kw)


ANCESTRAL = Sampler()
