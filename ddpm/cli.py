"""The command line: ``python -m ddpm <subcommand> ...``.

Each subcommand lives in its own module, listed in SUBCOMMAND_MODULES. A module
plugs in by defining ``add_subcommand(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed args and returning an exit code or None).
``presets`` is defined here because it is only a table of config.PRESETS.

Errors in what the user asked for (unknown config keys, ill-typed values, missing
data or checkpoints) are printed as one clean line and exit with code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Modules that add a subcommand; each defines add_subcommand(subparsers).
SUBCOMMAND_MODULES = ["ddpm.train", "ddpm.cli_sample", "ddpm.fidelity", "ddpm.evaluate"]


class UsageError(Exception):
    """A mistake in the user's request; printed without a traceback, exit code 2."""


def user_errors():
    """Exception types that mean 'the request is wrong', not 'the code is wrong'."""
    from .checkpoint import CheckpointError

    errs = [UsageError, CheckpointError]
    try:
        from .data import DataError
        errs.append(DataError)
    except ImportError:
        pass
    return tuple(errs)


def add_config_args(p: argparse.ArgumentParser, preset_required: bool = True) -> None:
    """--preset and --set, shared by subcommands that build a config."""
    from .config import PRESETS

    p.add_argument("--preset", required=preset_required, choices=list(PRESETS), metavar="NAME",
                   help=f"named configuration: {', '.join(PRESETS)} (see `python -m ddpm presets`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set diffusion.var_type=beta_tilde (repeatable)")


def resolve_config(preset: str, overrides):
    """get_preset with config mistakes turned into UsageError (clean message, exit 2)."""
    from .config import get_preset

    try:
        return get_preset(preset, overrides)
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(e.args[0] if e.args else str(e)) from None


def _presets(args) -> int:
    from .config import PRESETS, build_model, get_preset
    from .unet import num_params

    for name, (desc, _) in PRESETS.items():
        cfg = get_preset(name)
        n = num_params(build_model(cfg))
        print(f"{name:<12} {n:>12,} params  {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm",
        description="DDPM (Ho, Jain & Abbeel 2020): train, sample and evaluate diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("presets", help="list the named configurations with their parameter counts")
    p.set_defaults(func=_presets)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)
