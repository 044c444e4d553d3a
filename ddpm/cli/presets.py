"""``python -m ddpm presets``: the named configurations (config.PRESETS) with their parameter counts."""

from __future__ import annotations

from ..config import PRESETS, build_model, get_preset
from ..unet import num_params


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("presets", help="list the named configurations with their parameter counts")
    p.set_defaults(func=run)


def run(args) -> int:
    for name, (desc, _) in PRESETS.items():
        n = num_params(build_model(get_preset(name)))
        print(f"{name:<12} {n:>12,} params  {desc}")
    return 0
