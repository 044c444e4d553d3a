"""``python -m ddpm train``: a preset plus --set overrides trained into a run directory (ddpm.train).

Also ``--resume`` (config and data dir from the run) and ``--dry-run`` (the resolved config
as one JSON object, nothing written). Multi-GPU: ``torchrun --nproc_per_node=N -m ddpm train``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..config import build_model
from ..rundir import LAST, saved_config
from ..train import EXIT_DIVERGED, TrainingDiverged, train
from ..unet import num_params
from .options import (UsageError, add_config_args, add_device_arg, add_progress_arg, add_threads_arg,
                      resolve_config)


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (single process, or DDP under torchrun)",
        description="Train a preset (plus --set overrides) into a run directory. Multi-GPU / "
                    "multi-node: torchrun --nproc_per_node=N -m ddpm train ... (train.batch_size is "
                    "the global batch; --set train.microbatch=M runs each process's share in pieces of M "
                    "images). Exit codes: 0 done, 2 a wrong request, 3 diverged (a non-finite loss), "
                    "130 Ctrl-C.")
    add_config_args(p, preset_required=False)
    p.add_argument("--out", help="run directory (required unless --dry-run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (config and data dir from the run "
                        "unless --preset / --data-dir are given; --set may extend train.steps, and "
                        "lower train.lr after a non-finite loss)")
    p.add_argument("--data-dir", help="folder holding the data in torchvision's layout, or the "
                                      "parent of data.path (default: $DDPM_DATA_DIR, else ./data; "
                                      "on --resume: the run's)")
    p.add_argument("--download", action="store_true",
                   help="allow torchvision to download MNIST/CIFAR10 into the data dir")
    add_device_arg(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the config as training would and print it (with num_params) as one JSON "
                        "object; nothing is written")
    add_threads_arg(p)
    add_progress_arg(p, "no progress bar (log lines only)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    """The config to train: the preset's, or with --resume and no --preset the run's own."""
    if args.resume and not args.preset:
        if not args.out:
            raise UsageError("--resume needs --out (the run directory to continue)")
        return resolve_config(None, args.overrides, base=saved_config(Path(args.out)))
    if not args.preset:
        raise UsageError("train needs --preset NAME (see `python -m ddpm presets`), or --resume --out DIR")
    return resolve_config(args.preset, args.overrides)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.dry_run:
        print(json.dumps({**cfg.to_dict(), "num_params": num_params(build_model(cfg))}, allow_nan=False))
        return 0
    if not args.out:
        raise UsageError("train needs --out DIR (the run directory)")
    try:
        res = train(cfg, args.out, resume=args.resume, data_dir=args.data_dir, download=args.download,
                    device=args.device, progress=not args.no_progress,
                    command="python -m ddpm " + shlex.join(getattr(args, "argv", sys.argv[1:])))
    except TrainingDiverged as e:  # its own exit code: experiments.run records it as diverged
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if res.get("interrupted"):
        print(f"interrupted (Ctrl-C) at step {res['step']} of {cfg.train.steps}: saved "
              f"{Path(args.out) / LAST}; continue with: python -m ddpm train --out {args.out} --resume",
              file=sys.stderr)
        return 130
    return 0
