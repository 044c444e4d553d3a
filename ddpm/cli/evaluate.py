"""``python -m ddpm eval``: the command line as an evaluation spec, run by ddpm.evaluate.

    python -m ddpm eval --checkpoint CKPT --metrics fid,is,kid,nll,rd --n N [--var beta|beta_tilde] ...
    torchrun --nproc_per_node=K -m ddpm eval ...     # the same, shared by K processes (GPUs)

writes OUT/metrics.json (the spec under run.spec, every value with how it was obtained) and
the paper's figures; under torchrun only rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..evaluate import METRICS, EvalSpec, run_evaluation
from ..loading import resolve_checkpoint
from ..rundir import recorded_data_dir
from .options import (add_device_arg, add_ema_arg, add_progress_arg, add_sampler_args, add_threads_arg,
                      add_var_arg)


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: FID/IS/KID, NLL (bits/dim), rate-distortion, figures",
        description="Writes OUT/metrics.json and the paper's figures. The request (data, Inception "
                    "weights, OUT) is checked before any sampling. Samples go to OUT/samples in "
                    "shards and the bound to OUT/bound_<split>/ in batches: an interrupted eval resumes "
                    "when run again. Under `torchrun --nproc_per_node=K -m ddpm eval ...` K processes "
                    "(one GPU each) share the shards and batches, and rank 0 computes the metrics: the "
                    "same numbers for any K. A second eval into the same "
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
    add_var_arg(p, "override the fixed reverse variance (default: the checkpoint's)")
    add_ema_arg(p, "evaluate")
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
                   help="FID reference set (default: the checkpoint's dataset, --reference-split); "
                        "e.g. mnist:test, folder:PATH")
    p.add_argument("--reference-split", choices=("train", "test"), default="train",
                   help="the split of the checkpoint's dataset used as the FID reference without --reference "
                        "(default train, as in the paper)")
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
    add_progress_arg(p, "no progress bars")
    add_sampler_args(p)
    p.set_defaults(func=run)


def run_data_dir(checkpoint) -> Optional[str]:
    """The data dir recorded in the run.json beside ``checkpoint`` (a run's final.pt/last.pt),
    so that commands on a run find its data without --data-dir again; None if unknown."""
    p = Path(checkpoint)
    return recorded_data_dir(p if p.is_dir() else p.parent)


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """The evaluation the command line asks for (defaults: OUT beside the checkpoint, the data
    dir recorded in the run's run.json)."""
    checkpoint = resolve_checkpoint(args.checkpoint)
    return EvalSpec(
        checkpoint=checkpoint, metrics=tuple(args.metrics.split(",")), n=args.n, variance=args.var, ema=args.ema,
        out_dir=args.out or str(Path(checkpoint).resolve().parent / "eval"),
        data_dir=args.data_dir or run_data_dir(checkpoint), nll_n=args.nll_n,
        nll_splits=tuple(s.strip() for s in args.nll_splits.split(",") if s.strip()), seed=args.seed,
        device=args.device, batch_size=args.batch_size, nll_batch_size=args.nll_batch_size,
        max_batch=args.max_batch, reference=args.reference, reference_n=args.reference_n,
        reference_split=args.reference_split,
        inception_weights=args.inception_weights, figures=args.figures, sampler=args.sampler, steps=args.steps,
        eta=args.eta, skip=args.skip, bf16=args.bf16, compile=args.compile)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    report = run_evaluation(spec, progress=not args.no_progress)
    if report is None:  # a process of torchrun's other than rank 0: rank 0 reports
        return 0
    # what each value is, briefly; "unavailable" says why a value is null (e.g. IS offline)
    short = {k: {kk: v.get(kk) for kk in ("value", "se", "std", "n", "elapsed_s", "unavailable") if kk in v}
             for k, v in report["results"].items()}
    print(json.dumps({"metrics_json": str(Path(spec.out_dir) / "metrics.json"), **short}))
    return 0
