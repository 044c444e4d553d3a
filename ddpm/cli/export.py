"""``python -m ddpm export``: a checkpoint as a diffusers folder or a bare safetensors file (ddpm.export)."""

from __future__ import annotations

import argparse

from ..export import FORMATS, export_diffusers, export_safetensors
from ..loading import resolve_checkpoint
from .options import add_ema_arg


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint as a diffusers folder or a bare safetensors file",
        description="Export a model for use without this project's code. --format diffusers: a folder that "
                    "diffusers' UNet2DModel, DDPMScheduler and DDPMPipeline load with from_pretrained(DIR); "
                    "--format safetensors: one file of our weights, the config in its metadata. A learned "
                    "variance or mu prediction has no DDPMScheduler equivalent: export those as safetensors.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. RUN/final.pt), or anything "
                                                       "`sample --checkpoint` reads")
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="diffusers (default) or safetensors")
    p.add_argument("--out", required=True, help="diffusers: a new or empty folder; safetensors: a new "
                                                "FILE.safetensors")
    add_ema_arg(p, "export")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    export = export_diffusers if args.format == "diffusers" else export_safetensors
    res = export(resolve_checkpoint(args.checkpoint), args.out, ema=args.ema)
    what = f"{'EMA' if res['ema'] else 'raw'} weights of step {res['step']}"
    if args.format == "diffusers":
        print(f"wrote {res['out']}: {', '.join(res['files'])} ({what})")
        print(f"load it with diffusers: DDPMPipeline.from_pretrained({res['out']!r}) or "
              f"UNet2DModel.from_pretrained({res['out']!r})")
    else:
        print(f"wrote {res['out']} ({what}; config in the safetensors metadata, key ddpm_config)")
    for note in res["notes"]:
        print(f"note: {note}")
    return 0
