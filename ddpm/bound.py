"""NLL and rate-distortion from the variational bound's per-step terms (pure numerics, no IO).

NLL (Table 1): the full variational bound over all T steps (Eq. 5) by
GaussianDiffusion.calc_bpd_loop, with clipped x_0 predictions and fresh noise per
step as in the official code, in bits/dim, averaged over N images, with its standard
error over images (sample std / sqrt(N); the per-step noise is part of the estimate).
L_T (prior), L_0 (decoder) and the sum of the KL terms L_1..L_{T-1} are reported
separately; they add up to the bound.

Rate-distortion (Sec. 4.3, Table 4, Fig. 5), from the same per-step terms. Sending
x_0 with Algorithm 3 transmits x_T, x_{T-1}, ..., x_1 in turn; x_i costs the KL term
L_i = KL(q(x_i | x_{i+1}, x_0) || p(x_i | x_{i+1})) (x_T costs L_T) and the receiver,
holding x_t, can estimate x_0 as the network's predicted x_0 (Algorithm 4). With
``s = T - t + 1`` the reverse step (s = 1: only x_T received; s = T: x_1 received):

    rate(s)       = mean over images of  L_T + sum_{i = t}^{T-1} L_i       (bits/dim)
    distortion(s) = 127.5 * sqrt(mean over images and dims of (x0_hat(x_t) - x_0)^2)

with x_t ~ q(x_t | x_0) and x0_hat clipped to [-1, 1] (RMSE on the [0, 255] scale).
In calc_bpd_loop's 0-based columns: L_i is ``terms_bpd_bt[:, i]`` (i >= 1), L_T is
``prior_bpd_b``, x0_hat(x_t) is column ``t - 1 = T - s`` of ``mse_bt``. So rate(T) =
L_T + all KL terms (1.77581 bits/dim for CIFAR10), which excludes the decoder term L_0
(1.97 bits/dim there: the distortion of the last step, paid in bits), and rate(1) = L_T.

Table 4's rows are s = T, 0.9T, ..., 0.1T (1000, 900, ..., 100 for T = 1000), in that
order: row k of ``table4_rows`` stands beside row k of the paper's table. They are
computed here, once, when an evaluation runs; analysis/ only reads them.
"""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import torch

from .data import to_model_range
from .diffusion import GaussianDiffusion, Model
from .runtime import derive_seed

RD_DEFINITION = (
    "reverse step s = T - t + 1; rate(s) = mean_b[L_T + sum_{i=t}^{T-1} L_i] bits/dim (L_i = KL(q(x_i|x_{i+1},x_0)"
    " || p(x_i|x_{i+1})), calc_bpd_loop column i; L_0 excluded); distortion(s) = 127.5 * sqrt(mean_{b,dims} "
    "(x0_hat(x_t) - x_0)^2) with x_t ~ q(x_t|x_0), x0_hat clipped, calc_bpd_loop mse column t-1"
)
TERMS = ("total_bpd_b", "prior_bpd_b", "terms_bpd_bt", "mse_bt")  # what bound_terms returns, per image


def n_batches(n_images: int, batch_size: int) -> int:
    """How many batches ``bound_terms`` splits ``n_images`` into (the last one holds the rest)."""
    return math.ceil(n_images / batch_size)


@torch.inference_mode()
def bound_batch(model: Model, diffusion: GaussianDiffusion, images: torch.Tensor, k: int, batch_size: int = 16,
                var_type=None, clip_x0: bool = True, seed: int = 0, device="cpu",
                max_batch: int = 256) -> Dict[str, np.ndarray]:
    """Batch ``k`` of ``bound_terms``: calc_bpd_loop on images [k * batch_size, (k + 1) * batch_size)
    with noise from a generator seeded by (seed, k); per-image float64 arrays as bound_terms'.
    A batch depends on nothing else, so batches may be computed in any order, by any process."""
    assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
    assert 0 <= k < n_batches(images.shape[0], batch_size), (k, images.shape[0], batch_size)
    x0 = to_model_range(images[k * batch_size:(k + 1) * batch_size]).to(device)
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, k))
    out = diffusion.calc_bpd_loop(model, x0, clip_x0=clip_x0, var_type=var_type, max_batch=max_batch, generator=g)
    return {key: out[key].double().cpu().numpy() for key in TERMS}


def bound_terms(model: Model, diffusion: GaussianDiffusion, images: torch.Tensor, batch_size: int = 16,
                var_type=None, clip_x0: bool = True, seed: int = 0, device="cpu",
                max_batch: int = 256) -> Dict[str, np.ndarray]:
    """calc_bpd_loop over uint8 images [N, C, H, W] in batches; per-image float64 arrays:
    total_bpd_b [N], prior_bpd_b [N], terms_bpd_bt [N, T], mse_bt [N, T].
    Batch k (``bound_batch``) draws its noise from a generator seeded by (seed, k), so results
    do not depend on what ran before (ddpm.evaluate computes the batches one by one, kept on disk)."""
    assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
    N, T = images.shape[0], diffusion.T
    res = concat_batches([bound_batch(model, diffusion, images, k, batch_size, var_type, clip_x0, seed, device,
                                      max_batch) for k in range(n_batches(N, batch_size))])
    assert res["terms_bpd_bt"].shape == (N, T) and res["mse_bt"].shape == (N, T)
    return res


def concat_batches(parts: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The per-image terms of consecutive batches (bound_batch's, in order) as one set."""
    return {key: np.concatenate([p[key] for p in parts]) for key in TERMS}


def mean_se(x: np.ndarray) -> Dict[str, float]:
    """Mean and standard error over images (std with ddof=1 / sqrt(n); nan for one image)."""
    x = np.asarray(x, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "se": se}


def summarize_nll(terms: Dict[str, np.ndarray]) -> Dict[str, object]:
    """The bound and its parts, each as mean and standard error over images (bits/dim)."""
    L0 = terms["terms_bpd_bt"][:, 0]
    kl = terms["terms_bpd_bt"][:, 1:].sum(1)
    LT = terms["prior_bpd_b"]
    total = terms["total_bpd_b"]
    np.testing.assert_allclose(L0 + kl + LT, total, rtol=1e-9, atol=1e-9)
    return {
        "bpd": mean_se(total)["mean"], "bpd_se": mean_se(total)["se"], "n": int(len(total)),
        "L_T": mean_se(LT), "L_0": mean_se(L0), "kl_sum_L1_to_LTm1": mean_se(kl),
        "note": "bpd = L_T + sum of KL terms L_1..L_{T-1} + L_0; se = std over images (ddof=1) / sqrt(n)",
    }


def rate_distortion(terms: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """rate and distortion at every reverse step s = 1..T (see the module docstring)."""
    t_bt, prior_b, mse_bt = terms["terms_bpd_bt"], terms["prior_bpd_b"], terms["mse_bt"]
    N, T = t_bt.shape
    kl_t = t_bt.mean(0)  # [T]: column i = L_i (column 0, the decoder L_0, is never used)
    # rate at s: L_T + sum_{i=T-s+1}^{T-1} L_i. Accumulate from i = T-1 down to 1.
    kl_desc = np.concatenate([[0.0], kl_t[1:][::-1]])  # s=1: nothing; s=2: L_{T-1}; ...; s=T: ... + L_1
    rate = prior_b.mean() + np.cumsum(kl_desc)
    s = np.arange(1, T + 1)
    mse = mse_bt.mean(0)[T - s]  # x0_hat from x_t, t = T - s + 1 -> 0-based column T - s
    dist = 127.5 * np.sqrt(mse)
    assert rate.shape == dist.shape == (T,)
    return {"reverse_step": s, "rate_bpd": rate, "distortion_rmse": dist}


def table4_steps(T: int) -> List[int]:
    """Reverse steps of Table 4: T, 0.9T, ..., 0.1T (1000, 900, ..., 100 for T = 1000)."""
    return [max(1, int(round(T * k / 10))) for k in range(10, 0, -1)]


def table4_rows(rd: Dict[str, np.ndarray]) -> List[Dict[str, float]]:
    """Table 4 in the paper's row order (s = T first): reverse step, rate, distortion."""
    T = len(rd["reverse_step"])
    return [{"reverse_step": s, "rate_bpd": float(rd["rate_bpd"][s - 1]),
             "distortion_rmse": float(rd["distortion_rmse"][s - 1])} for s in table4_steps(T)]
