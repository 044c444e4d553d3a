"""``python -m ddpm sample``: PNGs and a grid from a checkpoint.

    python -m ddpm sample --checkpoint RUN/final.pt --n 64 --out DIR [--var beta|beta_tilde]
                          [--ema/--no-ema] [--seed S] [--batch-size B] [--device D]
                          [--sampler ancestral|respaced|ddim --steps K --eta E --skip uniform|quadratic]
                          [--bf16] [--compile]

writes DIR/images/000000.png ... (exactly N files), DIR/grid.png (the first 64) and
DIR/sample.json (checkpoint, step, EMA, variance, seed, sampler): ddpm.generate's
``write_sample_folder``. ``python -m ddpm fid DIR REF`` recognises such a folder and reads
DIR/images only. The checkpoint may also be a run directory (its final.pt) or a diffusers
folder (ddpm.loading). Sampling itself is ddpm.generate.generate: batch k is drawn from a
generator seeded by (seed, k), so the images do not depend on anything else run before.
For 50k-sample FID runs use ``eval`` (resumable shards) instead of PNGs. ``--compile`` runs each
sampling step through torch.compile (ddpm.sampling.CompiledStep); sample.json records it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..generate import PIXEL_MAP, PNG_GRID, PNG_IMAGES, generate, write_sample_folder
from ..loading import load_model, resolve_checkpoint
from ..provenance import portable_path
from ..runtime import PRECISIONS, pick_device
from .options import (UsageError, add_device_arg, add_ema_arg, add_progress_arg, add_sampler_args,
                      add_threads_arg, add_var_arg, sampler_from_args)


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="draw samples from a checkpoint into PNGs and a grid",
        description="Draw N samples (default: ancestral sampling, DDPM Algorithm 2; or respaced DDPM / DDIM "
                    "on fewer steps) into OUT/images/*.png, "
                    "OUT/grid.png (the first 64) and OUT/sample.json (how they were drawn). The images "
                    "depend only on the checkpoint, --seed, --batch-size, --var, --ema and the sampler (--bf16 and "
                    "--compile change their rounding). OUT/images must be empty or absent: nothing is "
                    "overwritten.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file (RUN/final.pt, RUN/last.pt), a run directory (its final.pt), "
                        "or a diffusers folder (the released weights)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output folder (images/, grid.png, sample.json)")
    add_var_arg(p, "reverse-process variance: beta (fixedlarge) or beta_tilde (fixedsmall), also for a model "
                   "trained with learned variances; default: the model's own diffusion.var_type")
    add_ema_arg(p, "use")
    p.add_argument("--seed", type=int, default=0,
                   help="batch k draws its noise from a generator seeded by (seed, k) (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per sampling batch (default 64); part of what fixes the images")
    add_sampler_args(p)
    add_device_arg(p)
    add_threads_arg(p)
    add_progress_arg(p, "no progress bars")
    p.set_defaults(func=run)


def _check_out(args: argparse.Namespace) -> Path:
    if args.n < 1 or args.batch_size < 1:
        raise UsageError(f"--n {args.n} and --batch-size {args.batch_size}: both must be positive")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if (out / PNG_IMAGES).exists() and any((out / PNG_IMAGES).iterdir()):
        raise UsageError(f"{out / PNG_IMAGES} already holds images; choose another --out (nothing is "
                         "overwritten)")
    return out


def run(args: argparse.Namespace) -> int:
    out = _check_out(args)
    sampler = sampler_from_args(args)
    dev = pick_device(args.device)
    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg, model, diffusion, state = load_model(checkpoint, ema=args.ema)
    try:
        sampler.tau(diffusion.T)
    except ValueError as e:
        raise UsageError(f"--steps {args.steps}: {e}") from None
    model.to(dev)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    with torch.no_grad():
        images = generate(model, diffusion, args.n, shape, batch_size=args.batch_size, seed=args.seed,
                          device=dev, var_type=args.var, progress=not args.no_progress, sampler=sampler,
                          bf16=args.bf16, compile=args.compile)
    assert images.shape == (args.n, shape[1], shape[2], shape[0]), images.shape
    write_sample_folder(images, out, {
        "checkpoint": portable_path(Path(checkpoint).absolute()), "step": int(state["step"]),
        "ema": bool(args.ema), "var_type": args.var or cfg.diffusion.var_type, "n": args.n,
        "seed": args.seed, "batch_size": args.batch_size, "steps": sampler.to_dict(diffusion.T)["steps"],
        "sampler": sampler.describe(diffusion.T), "sampler_spec": sampler.to_dict(diffusion.T),
        "pixel_map": PIXEL_MAP, "network_precision": PRECISIONS[args.bf16], "compiled": bool(args.compile),
        "device": str(dev)})
    print(f"wrote {args.n} PNGs to {out / PNG_IMAGES} and {out / PNG_GRID}")
    return 0
