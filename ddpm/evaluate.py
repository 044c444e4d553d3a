"""Evaluation of a checkpoint: FID / KID / IS, NLL in bits/dim, rate-distortion, figures.

``python -m ddpm eval --checkpoint CKPT --metrics fid,is,kid,nll,rd --n N ...`` writes
``OUT/metrics.json`` (every value with its N, sampler, steps, variance, EMA flag,
reference set, seed, git commit, device and elapsed time) and the figures.

NLL (Table 1): the full variational bound over all T steps (Eq. 5) by
GaussianDiffusion.calc_bpd_loop, with clipped x_0 predictions and fresh noise per
step as in the official code, in bits/dim, averaged over N images, with its standard
error over images (sample std / sqrt(N); the per-step noise is part of the estimate).
L_T (prior), L_0 (decoder) and the sum of the KL terms L_1..L_{T-1} are reported
separately; they add up to the bound. Either fixed variance can be evaluated from the
same checkpoint (``--var beta|beta_tilde``).

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
Table 4's rows are s = T, 0.9T, ..., 0.1T (1000, 900, ..., 100 for T = 1000).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write_text, git_commit
from .diffusion import GaussianDiffusion, Model, VarType, _enum
from .generate import PIXEL_MAP, SAMPLER, from_uint8, generate, shard_seed

RD_DEFINITION = (
    "reverse step s = T - t + 1; rate(s) = mean_b[L_T + sum_{i=t}^{T-1} L_i] bits/dim (L_i = KL(q(x_i|x_{i+1},x_0)"
    " || p(x_i|x_{i+1})), calc_bpd_loop column i; L_0 excluded); distortion(s) = 127.5 * sqrt(mean_{b,dims} "
    "(x0_hat(x_t) - x_0)^2) with x_t ~ q(x_t|x_0), x0_hat clipped, calc_bpd_loop mse column t-1"
)


# --------------------------------------------------------------------------------- NLL


@torch.no_grad()
def bound_terms(model: Model, diffusion: GaussianDiffusion, images: torch.Tensor, batch_size: int = 16,
                var_type=None, clip_x0: bool = True, seed: int = 0, device="cpu", max_batch: int = 256,
                progress: bool = True) -> Dict[str, np.ndarray]:
    """calc_bpd_loop over uint8 images [N, C, H, W] in batches; per-image float64 arrays:
    total_bpd_b [N], prior_bpd_b [N], terms_bpd_bt [N, T], mse_bt [N, T].
    Batch k draws its noise from a generator seeded by (seed, k), so results do not
    depend on what ran before."""
    assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
    N, T = images.shape[0], diffusion.T
    parts = {k: [] for k in ("total_bpd_b", "prior_bpd_b", "terms_bpd_bt", "mse_bt")}
    starts = list(range(0, N, batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=N, desc="bound (all T steps)", unit="img")
    for k, s in enumerate(starts):
        x0 = images[s:s + batch_size].float().div(127.5).sub(1.0).to(device)  # x / 127.5 - 1
        g = torch.Generator(device=device)
        g.manual_seed(shard_seed(seed, k))
        out = diffusion.calc_bpd_loop(model, x0, clip_x0=clip_x0, var_type=var_type, max_batch=max_batch,
                                      generator=g)
        for key in parts:
            parts[key].append(out[key].double().cpu().numpy())
        if bar is not None:
            bar.update(x0.shape[0])
    if bar is not None:
        bar.close()
    res = {k: np.concatenate(v) for k, v in parts.items()}
    assert res["terms_bpd_bt"].shape == (N, T) and res["mse_bt"].shape == (N, T)
    return res


def _mean_se(x: np.ndarray) -> Dict[str, float]:
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
        "bpd": _mean_se(total)["mean"], "bpd_se": _mean_se(total)["se"], "n": int(len(total)),
        "L_T": _mean_se(LT), "L_0": _mean_se(L0), "kl_sum_L1_to_LTm1": _mean_se(kl),
        "note": "bpd = L_T + sum of KL terms L_1..L_{T-1} + L_0; se = std over images (ddof=1) / sqrt(n)",
    }


# ---------------------------------------------------------------------- rate-distortion


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


def table4_steps(T: int) -> list:
    """Reverse steps of Table 4: T, 0.9T, ..., 0.1T (1000, 900, ..., 100 for T = 1000)."""
    return [max(1, int(round(T * k / 10))) for k in range(10, 0, -1)]


def table4_rows(rd: Dict[str, np.ndarray]) -> list:
    T = len(rd["reverse_step"])
    return [{"reverse_step": s, "rate_bpd": float(rd["rate_bpd"][s - 1]),
             "distortion_rmse": float(rd["distortion_rmse"][s - 1])} for s in table4_steps(T)]


# --------------------------------------------------------------------------- provenance


def device_description(device) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(d)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o)}")


# ------------------------------------------------------------------------------ dataset


def dataset_spec(cfg, split: str, data_dir=None) -> Optional[str]:
    """The fidelity.load_images spec of the checkpoint's dataset split, or None if the
    dataset has no such split (a folder dataset: data.path is 'train', data.test_path, if
    set, is 'test')."""
    from .data import resolve_data_dir

    ds = cfg.data.dataset
    if ds in ("mnist", "cifar10"):
        return f"{ds}{'-' + cfg.data.subset if cfg.data.subset else ''}:{split}"
    rel = {"train": cfg.data.path, "test": cfg.data.test_path}.get(split)
    if not rel:
        return None
    p = Path(rel)
    return f"folder:{p if p.is_absolute() else resolve_data_dir(data_dir) / p}"


# ------------------------------------------------------------------------------ evaluate


METRICS = ("fid", "is", "kid", "nll", "rd")


class EvalError(RuntimeError):
    """The evaluation asked for is impossible as specified; the message says why."""


def _earlier_report(mpath: Path, cfg, common: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The metrics.json already in the out dir, if it evaluates the same checkpoint (config and
    step), EMA flag and variance (its results are then kept and extended); None if there is
    none; EvalError if it is another evaluation's (results are never mixed)."""
    from .config import Config, ConfigError

    if not mpath.is_file():
        return None
    try:
        old = json.loads(mpath.read_text())
        run = old["run"]
        old_cfg = Config.from_dict(run["config"]).to_dict()
    except (ValueError, KeyError, TypeError, ConfigError):
        raise EvalError(f"{mpath} exists but is not a metrics.json this code wrote; choose another --out "
                        "or move it away") from None
    differ = [f"{k}: {run.get(k)!r} there, {common[k]!r} now" for k in ("checkpoint_step", "ema", "variance")
              if run.get(k) != common[k]]
    if json.loads(json.dumps(old_cfg)) != json.loads(json.dumps(cfg.to_dict())):
        differ.insert(0, "the checkpoint's config")
    if differ:
        raise EvalError(f"{mpath} holds the results of another evaluation ({'; '.join(differ)}); choose "
                        "another --out (results of different evaluations are never mixed)")
    return old


def evaluate(checkpoint, metrics: Sequence[str] = ("fid", "kid", "nll", "rd"), n: int = 50_000,
             var_type=None, ema: bool = True, out_dir="eval", data_dir=None, nll_n: Optional[int] = None,
             nll_splits: Sequence[str] = ("test", "train"), seed: int = 0, device=None,
             batch_size: int = 256, nll_batch_size: int = 16, max_batch: int = 256,
             reference: Optional[str] = None, reference_n: Optional[int] = None, inception_weights=None,
             figures: bool = True, progress: bool = True) -> Dict[str, object]:
    """Evaluate a checkpoint; writes OUT/metrics.json (updated after each metric) and figures.

    Everything that can fail on the request is checked before anything is written or
    sampled: the arguments, the device, the checkpoint, what ``out_dir`` already holds, the
    data (reference set, NLL splits, figure sources) and the Inception weights. An earlier
    metrics.json in ``out_dir`` of the same checkpoint (config and step), EMA flag and
    variance is kept and extended: results not recomputed now stay, and the earlier call is
    listed under run.earlier_calls. One of another evaluation is an error (never mixed)."""
    from . import figures as FIG
    from .checkpoint import load_model
    from .fidelity import Inception, compute_metrics, load_images, resolve_weights
    from .generate import check_manifest, sample_manifest
    from .train import pick_device

    metrics = [m.strip().lower() for m in metrics if m.strip()]
    if not metrics:
        raise EvalError(f"no metrics asked for; --metrics takes one or more of {','.join(METRICS)} "
                        f"(or 'none' for the figures alone)")
    if metrics == ["none"]:  # the figures alone
        if not figures:
            raise EvalError("--metrics none with --no-figures: nothing to do")
        metrics = []
    bad = set(metrics) - set(METRICS)
    if bad:
        raise EvalError(f"unknown metric(s) {sorted(bad)}; valid: {', '.join(METRICS)}")
    sampled = [m for m in ("fid", "kid", "is") if m in metrics]
    if sampled and n < 1:
        raise EvalError(f"--n {n}: must be a positive number of samples")
    if {"fid", "kid"} & set(sampled) and n < 2:
        raise EvalError(f"--n {n}: FID and KID need at least 2 samples (they compare covariances)")
    if nll_n is not None and nll_n < 1:
        raise EvalError(f"--nll-n {nll_n}: must be a positive number of images (omit it for every image)")
    if reference_n is not None and reference_n < 2:
        raise EvalError(f"--reference-n {reference_n}: must be at least 2 (omit it for the whole set)")
    for flag, value in (("--batch-size", batch_size), ("--nll-batch-size", nll_batch_size),
                        ("--max-batch", max_batch)):
        if value < 1:
            raise EvalError(f"{flag} {value}: must be positive")
    nll_splits = list(nll_splits)
    if {"nll", "rd"} & set(metrics) and (not nll_splits or set(nll_splits) - {"test", "train"}):
        raise EvalError(f"--nll-splits {','.join(nll_splits)!r}: one or both of test, train")
    device = str(pick_device(device))
    t_start = time.time()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out {out_dir} is a file, not a folder")
    cfg, model, diffusion, state = load_model(checkpoint, ema=ema)
    var = diffusion.var_type if var_type is None else _enum(VarType, var_type)
    if var == VarType.LEARNED and diffusion.var_type != VarType.LEARNED:
        raise EvalError("--var learned needs a checkpoint trained with a learned variance")
    image_shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    fit = (cfg.data.channels, cfg.data.resolution)  # folder images are decoded as the trainer does
    common = {"checkpoint": str(checkpoint), "checkpoint_step": int(state.get("step", -1)), "ema": bool(ema),
              "variance": var.value, "steps": diffusion.T, "seed": int(seed), "git_commit": git_commit(),
              "device": device_description(device)}
    report: Dict[str, object] = {"run": {**common, "metrics_requested": metrics, "torch": torch.__version__,
                                         "config": cfg.to_dict()},
                                 "results": {}, "figures": {}}
    mpath = out_dir / "metrics.json"
    earlier = _earlier_report(mpath, cfg, common)
    if earlier is not None:
        prev_run = {k: v for k, v in earlier.get("run", {}).items() if k not in ("config", "earlier_calls")}
        report["run"]["earlier_calls"] = [*earlier.get("run", {}).get("earlier_calls", []), prev_run]
        report["results"] = dict(earlier.get("results", {}))
        report["figures"] = dict(earlier.get("figures", {}))
    var_arg = None if var == diffusion.var_type else var
    sample_meta = {"checkpoint": str(checkpoint), "step": common["checkpoint_step"], "ema": ema}
    if sampled:  # samples of another request in out_dir/samples: an error now, not after hours
        check_manifest(out_dir / "samples", sample_manifest(
            diffusion, n, image_shape, batch_size=batch_size, seed=seed, var_type=var_arg, meta=sample_meta))

    # ------------------------------------ data and Inception: checked before any sampling
    ref_images = ref_desc = ref_key = inception = None
    if sampled:
        resolve_weights(inception_weights)  # an explicit weights file that is not there: say so first
    if {"fid", "kid"} & set(sampled):
        ref_spec = reference or dataset_spec(cfg, "train", data_dir)
        ref_images, ref_desc, ref_key = load_images(ref_spec, data_dir, reference_n, seed=2020, resize_to=fit)
    if sampled:
        with_logits = "is" in sampled and resolve_weights(inception_weights) is None
        inception = Inception(inception_weights, device=device, with_logits=with_logits)
    nll_data = {}
    if {"nll", "rd"} & set(metrics):
        for split in (nll_splits if "nll" in metrics else ["test"]):
            spec = dataset_spec(cfg, split, data_dir)
            nll_data[split] = None if spec is None else (spec, *load_images(spec, data_dir, nll_n, seed=2020,
                                                                            resize_to=fit)[:2])
            if spec is not None and tuple(nll_data[split][1].shape[1:]) != image_shape:
                raise EvalError(f"{spec} holds images of shape {tuple(nll_data[split][1].shape[1:])}, the "
                                f"model takes {image_shape}")
    fig8_spec = fig8_images = None
    if figures:
        fig8_spec = dataset_spec(cfg, "test", data_dir) or dataset_spec(cfg, "train", data_dir)
        fig8_images = load_images(fig8_spec, data_dir, 4, seed=2020, resize_to=fit)[0]
        if fig8_images.shape[0] < 4:
            raise EvalError(f"{fig8_spec} holds {fig8_images.shape[0]} image(s); the interpolation figure "
                            "needs 4 (or pass --no-figures)")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()

    def save():
        report["run"]["elapsed_s_total"] = round(time.time() - t_start, 1)
        _write_json(mpath, report)

    def put(name, value, t0, **extra):
        report["results"][name] = {**value, **extra, **common, "elapsed_s": round(time.time() - t0, 1)}
        save()

    # ------------------------------------------------------------- samples: FID/KID/IS
    if sampled:
        t0 = time.time()
        samples = generate(model, diffusion, n, image_shape, out_dir=out_dir / "samples", batch_size=batch_size,
                           seed=seed, device=device, var_type=var_arg, meta=sample_meta, progress=progress)
        gen_s = round(time.time() - t0, 1)
        report["results"]["sampling"] = {"n": n, "sampler": SAMPLER, "pixel_map": PIXEL_MAP, "folder": str(out_dir / "samples"),
                                         **common, "elapsed_s": gen_s,
                                         "note": "elapsed_s is 0-ish when the shards already existed (resumed)"}
        save()
        if figures:
            report["figures"]["samples"] = str(FIG.save_samples_grid(samples, out_dir / "samples_grid.png"))
        want = sampled
        t0 = time.time()
        fm = compute_metrics(samples, ref_images, want, inception=inception, weights=inception_weights,
                             device=device, reference_key=ref_key, reference_desc=ref_desc, progress=progress)
        base = {"n": n, "sampler": SAMPLER, "pixel_map": PIXEL_MAP, "inception": fm["inception"]}
        if "fid" in want:
            put("fid", {"value": fm["fid"], **base, "n_reference": fm["n_reference"], "reference": fm["reference"]}, t0,
                inception_elapsed_s=fm["elapsed_s"])
        if "kid" in want:
            put("kid", {"value": fm["kid"], "std": fm["kid_std"], "subset_size": fm["kid_subset_size"],
                        "subsets": fm["kid_subsets"], **base, "n_reference": fm["n_reference"],
                        "reference": fm["reference"]}, t0, inception_elapsed_s=fm["elapsed_s"])
        if "is" in want:
            if fm.get("is") is None:
                put("is", {"value": None, "std": None, "unavailable": fm["is_unavailable"], **base}, t0)
            else:
                put("is", {"value": fm["is"], "std": fm["is_std"], "splits": fm["is_splits"], **base}, t0)
    # ---------------------------------------------------------------- NLL and rate-distortion
    if {"nll", "rd"} & set(metrics):
        for split, loaded in nll_data.items():
            if loaded is None:
                report["results"][f"nll_{split}"] = {"value": None, "unavailable":
                                                     f"dataset {cfg.data.dataset!r} has no {split} split"}
                save()
                continue
            t0 = time.time()
            spec, images, desc = loaded
            terms = bound_terms(model, diffusion, images, batch_size=nll_batch_size, var_type=var_arg,
                                seed=seed, device=device, max_batch=max_batch, progress=progress)
            np.savez_compressed(out_dir / f"bound_terms_{split}.npz",
                                **{k: v.astype(np.float32) for k, v in terms.items()})
            summary = summarize_nll(terms)
            if "nll" in metrics:
                put(f"nll_{split}", {"value": summary["bpd"], "se": summary["bpd_se"], **summary,
                                     "data": desc, "clip_x0": True,
                                     "estimator": "calc_bpd_loop: all T terms, fresh noise per term"}, t0)
            if "rd" in metrics and split == "test":
                rd = rate_distortion(terms)
                rows = table4_rows(rd)
                put("rd", {"table4": rows, "definition": RD_DEFINITION, "n": summary["n"], "data": desc,
                           "L_0_bpd": summary["L_0"]["mean"],
                           "note": "rate(T) + L_0 = the NLL bound"}, t0)
                np.savez_compressed(out_dir / "rate_distortion.npz", **rd)
                if figures:
                    report["figures"]["fig5_rate_distortion"] = str(FIG.rd_plots(
                        rd, out_dir / "fig5_rate_distortion.png",
                        title=f"{Path(str(checkpoint)).name}, {desc.split(':')[0]}, N={summary['n']}, "
                              f"var={var.value}, EMA={ema}"))
    # ----------------------------------------------------------------------------- figures
    if figures:
        t0 = time.time()
        g = torch.Generator(device=device)
        g.manual_seed(shard_seed(seed, 10_000))
        C, H, W = image_shape
        FIG.progressive_generation(diffusion, model, (8, C, H, W), out_dir / "fig6_progressive.png",
                                   generator=g, device=device, var_type=var_arg, progress=progress)
        report["figures"]["fig6_progressive"] = str(out_dir / "fig6_progressive.png")
        FIG.shared_latent(diffusion, model, image_shape, out_dir / "fig7_shared_latent.png", generator=g,
                          device=device, var_type=var_arg, progress=progress)
        report["figures"]["fig7_shared_latent"] = str(out_dir / "fig7_shared_latent.png")
        x = from_uint8(fig8_images.permute(0, 2, 3, 1).numpy())
        FIG.interpolation(diffusion, model, [(x[0], x[1]), (x[2], x[3])], out_dir / "fig8_interpolation.png",
                          generator=g, device=device, var_type=var_arg, progress=progress)
        report["figures"]["fig8_interpolation"] = str(out_dir / "fig8_interpolation.png")
        report["figures"]["elapsed_s"] = round(time.time() - t0, 1)
        report["figures"]["source_images_fig8"] = f"{fig8_spec}, 4 images chosen by RandomState(2020)"
        save()
    save()
    return report


# --------------------------------------------------------------------------------- CLI


def add_subcommand(subparsers) -> None:
    from .cli import add_device_arg, add_threads_arg

    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: FID/IS/KID, NLL (bits/dim), rate-distortion, figures",
        description="Writes OUT/metrics.json and the paper's figures. The request (data, Inception "
                    "weights, OUT) is checked before any sampling. Samples go to OUT/samples in "
                    "shards: an interrupted eval resumes when run again. A second eval into the same "
                    "OUT (same checkpoint, EMA flag and variance) adds to metrics.json; another "
                    "evaluation's OUT is refused. FID/KID need the Inception weights: online they are "
                    "downloaded by torch-fidelity; offline set DDPM_INCEPTION_WEIGHTS (see "
                    "`python -m ddpm fid --help`). Paper scale (the defaults): 50,000 samples, NLL "
                    "over every test and train image.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file (RUN/final.pt, RUN/last.pt), a run directory (its final.pt), "
                        "or a diffusers folder (the released weights)")
    p.add_argument("--metrics", default="fid,kid,nll,rd",
                   help=f"comma-separated subset of {','.join(METRICS)} (default fid,kid,nll,rd); "
                        "'none': the figures alone")
    p.add_argument("--n", type=int, default=50_000, help="samples for FID/KID/IS (default 50000, the paper's)")
    p.add_argument("--var", choices=["beta", "beta_tilde"], default=None,
                   help="override the fixed reverse variance (default: the checkpoint's)")
    p.add_argument("--ema", dest="ema", action="store_true", default=True, help="EMA weights (default)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="raw (non-EMA) weights")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint dir>/eval)")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder (default: the run's, from run.json beside the checkpoint, else "
                        "$DDPM_DATA_DIR or ./data)")
    p.add_argument("--nll-n", type=int, default=None,
                   help="a seeded random subset of N images per split for NLL/rd (default: every image "
                        "of the split, as the paper: 10,000 test and 50,000 train for CIFAR10)")
    p.add_argument("--nll-splits", default="test,train",
                   help="splits for NLL (default test,train; rd always uses test)")
    p.add_argument("--reference", default=None,
                   help="FID reference set (default: the checkpoint's dataset, train split, as in the paper); "
                        "e.g. mnist:test, folder:PATH")
    p.add_argument("--reference-n", type=int, default=None,
                   help="a seeded random subset of the reference set (default: all of it)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the samples (shard k: seed (seed, k)), the bound's noise and the "
                        "figures (default 0)")
    add_device_arg(p)
    add_threads_arg(p)
    p.add_argument("--batch-size", type=int, default=256,
                   help="sampling batch (= shard size; default 256); part of what fixes the samples")
    p.add_argument("--nll-batch-size", type=int, default=16, help="images per calc_bpd_loop call")
    p.add_argument("--max-batch", type=int, default=256, help="(image, t) pairs per network call in the bound")
    p.add_argument("--inception-weights", default=None, help="offline Inception weights (else $DDPM_INCEPTION_WEIGHTS)")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the figures (samples grid, Figs. 5-8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import resolve_checkpoint, run_data_dir

    checkpoint = resolve_checkpoint(args.checkpoint)
    out = args.out or str(Path(checkpoint).resolve().parent / "eval")
    data_dir = args.data_dir or run_data_dir(checkpoint)
    report = evaluate(checkpoint, args.metrics.split(","), n=args.n, var_type=args.var, ema=args.ema,
                      out_dir=out, data_dir=data_dir, nll_n=args.nll_n,
                      nll_splits=[s.strip() for s in args.nll_splits.split(",") if s.strip()],
                      seed=args.seed, device=args.device, batch_size=args.batch_size,
                      nll_batch_size=args.nll_batch_size, max_batch=args.max_batch,
                      reference=args.reference, reference_n=args.reference_n,
                      inception_weights=args.inception_weights, figures=args.figures,
                      progress=not args.no_progress)
    # what each value is, briefly; "unavailable" says why a value is null (e.g. IS offline)
    short = {k: {kk: v.get(kk) for kk in ("value", "se", "std", "n", "elapsed_s", "unavailable") if kk in v}
             for k, v in report["results"].items()}
    print(json.dumps({"metrics_json": str(Path(out) / "metrics.json"), **short}))
    return 0
