"""``python -m ddpm convert-checkpoint OLD NEW``: a checkpoint of an earlier version in the
current, safe format (ddpm.checkpoint.convert_checkpoint)."""

from __future__ import annotations

import argparse

from ..checkpoint import FORMAT, LEGACY_FORMAT, convert_checkpoint


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-checkpoint", help="rewrite a checkpoint of an earlier ddpm version in the current, safe format",
        description=f"Read OLD, a {LEGACY_FORMAT} checkpoint (it pickled numpy's RNG state as a numpy array, "
                    "which ddpm no longer reads as is), with torch.load(weights_only=True) and only numpy's "
                    "array types allowed besides plain data, so no code in the file can run; write NEW in "
                    f"{FORMAT} (RNG states as tensors and lists; weights, optimizer, step and config "
                    "unchanged). A run resumes from a converted last.pt bit for bit.")
    p.add_argument("old", metavar="OLD", help="the checkpoint to convert")
    p.add_argument("new", metavar="NEW", help="where to write the converted checkpoint (OLD itself: in place)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    res = convert_checkpoint(args.old, args.new)
    print(f"read {args.old} ({res['from']}, step {res['step']}) with torch.load(weights_only=True), numpy "
          f"arrays allowed: no code was run")
    print(f"wrote {args.new} ({FORMAT}): {res['rng_ranks']} RNG state(s) made plain; weights, optimizer, "
          "step and config unchanged")
    return 0
