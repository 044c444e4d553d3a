"""The ``sample`` subcommand: PNGs and a grid from a checkpoint.

    python -m ddpm sample --checkpoint RUN/final.pt --n 64 --out DIR [--var beta|beta_tilde]
                          [--ema/--no-ema] [--seed S] [--batch-size B] [--device D]
                          [--sampler ancestral|respaced|ddim --steps K --eta E --skip uniform|quadratic]

writes DIR/images/000000.png ... (exactly N files), DIR/grid.png (the first 64) and
DIR/sample.json (checkpoint, step, EMA, variance, seed, sampler). ``python -m ddpm fid
DIR REF`` recognises such a folder (by sample.json) and reads DIR/images only. The
checkpoint may also be a run directory (its final.pt) or a diffusers folder. Sampling itself is ddpm.generate.generate: batch k is drawn from a
generator seeded by (seed, k), so the images do not depend on anything else run
before. For 50k-sample FID runs use the shard-resumable generator of the ``fid``
tooling instead of PNGs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .diffusion import VarType


def add_subcommand(subparsers) -> None:
    from .cli import add_device_arg, add_threads_arg

    p = subparsers.add_parser(
        "sample", help="draw samples from a checkpoint into PNGs and a grid",
        description="Draw N samples (default: ancestral sampling, DDPM Algorithm 2; or respaced DDPM / DDIM "
                    "on fewer steps) into OUT/images/*.png, "
                    "OUT/grid.png (the first 64) and OUT/sample.json (how they were drawn). The images "
                    "depend only on the checkpoint, --seed, --batch-size, --var, --ema and the sampler. OUT/images "
                    "must be empty or absent: nothing is overwritten.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint file (RUN/final.pt, RUN/last.pt), a run directory (its final.pt), "
                        "or a diffusers folder (the released weights)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", required=True, help="output folder (images/, grid.png, sample.json)")
    p.add_argument("--var", choices=[VarType.BETA.value, VarType.BETA_TILDE.value], default=None,
                   help="reverse-process variance: beta (fixedlarge) or beta_tilde (fixedsmall), "
                        "also for a model trained with learned variances; default: the model's own "
                        "diffusion.var_type")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default, as the paper) or the raw ones (--no-ema)")
    p.add_argument("--seed", type=int, default=0,
                   help="batch k draws its noise from a generator seeded by (seed, k) (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per sampling batch (default 64); part of what fixes the images")
    add_sampler_args(p)
    add_device_arg(p)
    add_threads_arg(p)
    p.set_defaults(func=_cmd_sample)


def add_sampler_args(p) -> None:
    """--sampler/--steps/--eta/--skip, shared by sample and eval."""
    from .sampling import SKIP_TYPES, SamplerKind

    p.add_argument("--sampler", choices=[k.value for k in SamplerKind], default=SamplerKind.ANCESTRAL.value,
                   help="ancestral: DDPM Algorithm 2 over all T steps (default; the paper's, used for every "
                        "paper number); respaced: DDPM on --steps of the T steps; ddim: DDIM on --steps "
                        "steps with --eta")
    p.add_argument("--steps", type=int, default=None, help="respaced/ddim: how many of the T steps")
    p.add_argument("--eta", type=float, default=0.0,
                   help="ddim: 0 deterministic (default), 1 DDPM's beta-tilde variance on the steps")
    p.add_argument("--skip", choices=SKIP_TYPES, default="uniform",
                   help="respaced/ddim: how the steps are chosen (the DDIM paper's uniform or quadratic)")


def sampler_from_args(args):
    """The Sampler the flags ask for; UsageError (exit 2, one line) for a meaningless mix."""
    from .cli import UsageError
    from .sampling import Sampler

    try:
        return Sampler(args.sampler, args.steps, args.eta, args.skip)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_sample(args) -> int:
    import torch

    from .checkpoint import load_model
    from .cli import UsageError, resolve_checkpoint
    from .generate import PIXEL_MAP, generate, write_pngs
    from .provenance import portable_path
    from .train import pick_device

    if args.n < 1 or args.batch_size < 1:
        raise UsageError(f"--n {args.n} and --batch-size {args.batch_size}: both must be positive")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if (out / "images").exists() and any((out / "images").iterdir()):
        raise UsageError(f"{out / 'images'} already holds images; choose another --out (nothing is "
                         "overwritten)")
    sampler = sampler_from_args(args)
    dev = pick_device(args.device)
    args.checkpoint = resolve_checkpoint(args.checkpoint)
    cfg, model, diffusion, state = load_model(args.checkpoint, ema=args.ema)
    try:
        sampler.tau(diffusion.T)
    except ValueError as e:
        raise UsageError(f"--steps {args.steps}: {e}") from None
    model.to(dev)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    with torch.no_grad():
        images = generate(model, diffusion, args.n, shape, batch_size=args.batch_size, seed=args.seed,
                          device=dev, var_type=args.var, progress=True, sampler=sampler)
    assert images.shape == (args.n, shape[1], shape[2], shape[0]), images.shape
    write_pngs(images, out / "images", grid_path=out / "grid.png")
    (out / "sample.json").write_text(json.dumps({
        "checkpoint": portable_path(Path(args.checkpoint).absolute()), "step": int(state["step"]),
        "ema": bool(args.ema), "var_type": args.var or cfg.diffusion.var_type, "n": args.n,
        "seed": args.seed, "batch_size": args.batch_size, "steps": sampler.to_dict(diffusion.T)["steps"],
        "sampler": sampler.describe(diffusion.T), "sampler_spec": sampler.to_dict(diffusion.T),
        "pixel_map": PIXEL_MAP, "device": str(dev)}, indent=2) + "\n")
    print(f"wrote {args.n} PNGs to {out / 'images'} and {out / 'grid.png'}")
    return 0
