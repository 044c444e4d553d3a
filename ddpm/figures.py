"""The paper's figures as PNG files, in the paper's layouts.

- samples grid (Figs. 1, 3, 4): uint8 samples tiled row-major.
- Fig. 5: rate-distortion on the test set: distortion vs rate, rate vs reverse step,
  distortion vs reverse step (three panels), from ddpm.bound.rate_distortion; optionally
  with the paper's Table 4 beside it (analysis.report draws it so, from results/).
- Fig. 6: progressive generation: each row one sample, columns the predicted x_0 at
  evenly spaced reverse steps (left: start of the chain at x_T, right: the sample).
- Fig. 7: samples sharing x_t: one reverse chain is stopped at several t; for each t a
  2x2 block holds three samples x_0 ~ p(x_0 | x_t) and, bottom right, x_t itself.
- Fig. 8: interpolation of two test images in x_t (t = T/2 as in the paper: 500 of 1000
  steps), decoded by the reverse process. Each row: source, reconstructions at
  lambda = 0, 0.1, ..., 1, source.
All randomness comes from the generator passed in. Images smaller than 64 px are shown
enlarged by pixel repetition (display_scale), never interpolated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .diffusion import GaussianDiffusion, Model
from .generate import make_grid, save_png, to_uint8
from .sampling import interpolate, sample


def display_scale(H: int) -> int:
    """Integer nearest-neighbour upscaling for display, so that 28x28 MNIST and 32x32
    CIFAR10 figures are readable (x2); 64 px and larger stay as they are."""
    return max(1, 64 // H)


def upscale(images: np.ndarray, k: int) -> np.ndarray:
    """[..., H, W, C] -> [..., k*H, k*W, C] by pixel repetition (no interpolation)."""
    return images if k == 1 else images.repeat(k, axis=-3).repeat(k, axis=-2)


def _tile_rows(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """rows: list of [k, H, W, C] uint8 (same k) -> one grid image, one row per entry."""
    imgs = np.concatenate(rows, axis=0)
    return make_grid(upscale(imgs, display_scale(imgs.shape[1])), nrow=rows[0].shape[0], pad=pad)


def save_samples_grid(images: np.ndarray, path, nrow: Optional[int] = None, max_images: int = 100) -> Path:
    """Figs. 1/3/4: up to ``max_images`` samples ([N, H, W, C] uint8) tiled into a grid."""
    imgs = images[:max_images]
    save_png(make_grid(upscale(imgs, display_scale(imgs.shape[1])), nrow=nrow), path)
    return Path(path)


def reverse_indices(T: int, k: int) -> list:
    """``k`` 0-based step indices evenly spaced from T-1 (x_T, start of the chain) to 0."""
    return sorted({int(round(v)) for v in np.linspace(T - 1, 0, k)}, reverse=True)


@torch.inference_mode()
def progressive_generation(diffusion: GaussianDiffusion, model: Model, shape, path, generator=None,
                           device="cpu", n_cols: int = 10, var_type=None, progress=False) -> np.ndarray:
    """Fig. 6: rows = samples (``shape[0]`` of them), columns = predicted x_0 at ``n_cols``
    evenly spaced reverse steps, then the final sample. Returns [rows, cols, H, W, C] uint8."""
    idx = reverse_indices(diffusion.T, n_cols)
    x0, trace = sample(diffusion, model, shape, generator=generator, device=device, record=idx,
                       var_type=var_type, progress=progress)
    cols = [to_uint8(trace["pred_x0"][i]) for i in idx] + [to_uint8(x0)]
    grid = np.stack(cols, axis=1)  # [rows, cols, H, W, C]
    save_png(_tile_rows(list(grid)), path)
    return grid


@torch.inference_mode()
def shared_latent(diffusion: GaussianDiffusion, model: Model, image_shape, path, generator=None,
                  device="cpu", fractions=(1.0, 0.75, 0.5, 0.25), n_samples: int = 3, var_type=None,
                  progress=False) -> Dict[int, np.ndarray]:
    """Fig. 7: one reverse chain from x_T is recorded at t = fraction * T; from each x_t,
    ``n_samples`` independent continuations give x_0 ~ p(x_0 | x_t). Each t becomes a 2x2
    block (three samples, x_t bottom right), blocks side by side, largest t on the left.
    Returns {0-based index: [n_samples + 1, H, W, C] uint8}."""
    if n_samples != 3:
        raise ValueError("the paper's 2x2 layout has three samples and x_t")
    T = diffusion.T
    idx = [min(T - 1, max(0, int(round(f * T)) - 1)) for f in fractions]
    C, H, W = image_shape
    _, trace = sample(diffusion, model, (1, C, H, W), generator=generator, device=device, record=idx,
                      var_type=var_type, progress=progress)
    blocks, out = [], {}
    for i in idx:
        xt = trace["xt"][i].to(device)
        x0, _ = sample(diffusion, model, (n_samples, C, H, W), generator=generator, device=device,
                       x_start=xt.repeat(n_samples, 1, 1, 1), t_start=i, var_type=var_type)
        # x_t is shown as an image: clipped to [-1, 1] like everything else displayed.
        imgs = np.concatenate([to_uint8(x0), to_uint8(xt)], axis=0)
        out[i] = imgs
        blocks.append(make_grid(upscale(imgs, display_scale(H)), nrow=2, pad=1))
    Hb = blocks[0].shape[0]
    sep = np.full((Hb, 4, blocks[0].shape[2]), 255, dtype=np.uint8)
    row = np.concatenate([b if k == 0 else np.concatenate([sep, b], axis=1) for k, b in enumerate(blocks)], axis=1)
    save_png(row, path)
    return out


@torch.inference_mode()
def interpolation(diffusion: GaussianDiffusion, model: Model, pairs, path, t: Optional[int] = None,
                  lambdas=tuple(np.round(np.linspace(0, 1, 11), 2)), generator=None, device="cpu",
                  var_type=None, progress=False) -> np.ndarray:
    """Fig. 8: for each (x0_a, x0_b) pair of [C, H, W] images in [-1, 1]: source a,
    decoded interpolations at ``lambdas`` from 0-based index ``t`` (default T/2 - 1, the
    paper's t = 500 for T = 1000), source b. Returns [pairs, len(lambdas) + 2, H, W, C] uint8."""
    t = diffusion.T // 2 - 1 if t is None else int(t)
    rows = []
    for a, b in pairs:
        a, b = a.to(device), b.to(device)
        mix = interpolate(diffusion, model, a, b, t, lambdas, generator=generator, var_type=var_type,
                          progress=progress)
        rows.append(np.concatenate([to_uint8(a[None]), to_uint8(mix), to_uint8(b[None])], axis=0))
    grid = np.stack(rows)
    save_png(_tile_rows(list(grid)), path)
    return grid


def rd_plots(rd: Dict[str, np.ndarray], path, title: str = "",
             paper: Optional[Dict[int, Sequence[float]]] = None, label: str = "ours") -> Path:
    """Fig. 5: distortion vs rate, rate vs reverse step, distortion vs reverse step.

    ``rd``: reverse_step, rate_bpd, distortion_rmse (every step from rate_distortion, or only
    Table 4's rows). ``paper``: {reverse step at T = 1000: (rate, distortion)} (Table 4), drawn
    beside ours with its steps scaled to our T (the largest reverse step in ``rd``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rate, dist = rd["reverse_step"], rd["rate_bpd"], rd["distortion_rmse"]
    style = "o-" if len(s) <= 20 else "-"  # Table 4's rows alone: show the points
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(rate, dist, style, label=label)
    axes[0].set_xlabel("Rate (bits/dim)")
    axes[0].set_ylabel("Distortion (RMSE)")
    axes[1].plot(s, rate, style, label=label)
    axes[1].set_xlabel("Reverse process steps (T - t + 1)")
    axes[1].set_ylabel("Rate (bits/dim)")
    axes[2].plot(s, dist, style, label=label)
    axes[2].set_xlabel("Reverse process steps (T - t + 1)")
    axes[2].set_ylabel("Distortion (RMSE [0, 255])")
    if paper:
        steps = sorted(paper)
        T = max(int(v) for v in s)
        scaled = [k * T / 1000 for k in steps]
        p_rate, p_dist = [paper[k][0] for k in steps], [paper[k][1] for k in steps]
        name = "paper" if T == 1000 else f"paper (steps x {T}/1000)"
        axes[0].plot(p_rate, p_dist, "s--", label="paper")
        axes[1].plot(scaled, p_rate, "s--", label=name)
        axes[2].plot(scaled, p_dist, "s--", label=name)
        for ax in axes:
            ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
