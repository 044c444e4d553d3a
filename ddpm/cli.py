"""The command line: ``python -m ddpm <subcommand> ...``.

Each subcommand lives in its own module, listed in SUBCOMMAND_MODULES. A module
plugs in by defining ``add_subcommand(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed args and returning an exit code or None).
``presets`` is defined here because it is only a table of config.PRESETS.

Errors in what the user asked for (unknown config keys, ill-typed values, missing
data or checkpoints) are printed as one clean line and exit with code 2; anything
else is a bug and keeps its traceback. The library raises its own error types
(ConfigError, DataError, CheckpointError, ...); ``user_errors`` lists them. Ctrl-C
prints one line and exits with 130 (``train`` saves a checkpoint first).

Options every computing subcommand shares (``--threads``, ``--device``) are added by
``add_threads_arg`` / ``add_device_arg`` and checked here, before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import List, Optional

# Modules that add a subcommand; each defines add_subcommand(subparsers).
SUBCOMMAND_MODULES = ["ddpm.train", "ddpm.cli_sample", "ddpm.fidelity", "ddpm.cli_eval", "ddpm.export",
                      "ddpm.checkpoint"]


class UsageError(Exception):
    """A mistake in the user's request; printed without a traceback, exit code 2."""


def user_errors():
    """Exception types that mean 'the request is wrong', not 'the code is wrong'."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .evaluate import EvalError
    from .fidelity import FidelityError
    from .generate import SamplesError
    from .train import DeviceError, RunDirError

    return (UsageError, CheckpointError, ConfigError, DataError, DeviceError, RunDirError, EvalError,
            FidelityError, SamplesError)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads; default: torch's, one per core). "
                        "On a shared CPU, 1 is often faster")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda if a GPU is available, else cpu), cpu, cuda, cuda:N, mps")


def resolve_checkpoint(path) -> str:
    """``path`` as a checkpoint for sample/eval: a checkpoint file, a diffusers folder, or a
    run directory (its final.pt). A run directory without final.pt is an error that says
    which checkpoint it does hold."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    from .official import WEIGHT_FILES, is_diffusers_folder

    weights = any((d / w).is_file() for d in (p, p / "unet") for w in WEIGHT_FILES)
    if is_diffusers_folder(p) and weights:
        return str(path)
    if (p / "final.pt").is_file():
        return str(p / "final.pt")
    if (p / "last.pt").is_file():
        raise UsageError(f"--checkpoint {p} is a run directory without final.pt (the run is unfinished); "
                         f"pass {p / 'last.pt'} to use its last checkpoint, or finish it with "
                         f"`python -m ddpm train --out {p} --resume`")
    if (p / "config.json").is_file() and not weights:
        raise UsageError(f"--checkpoint {p} is a folder with config.json but neither final.pt/last.pt (a "
                         f"ddpm run) nor {' or '.join(WEIGHT_FILES)} (diffusers weights)")
    return str(path)


def run_data_dir(checkpoint) -> Optional[str]:
    """The data dir recorded in the run.json beside ``checkpoint`` (a run's final.pt/last.pt),
    so that commands on a run find its data without --data-dir again; None if unknown."""
    from .train import recorded_data_dir

    p = Path(checkpoint)
    return recorded_data_dir(p if p.is_dir() else p.parent)


def _apply_common(args) -> None:
    """--threads: checked and applied before the subcommand runs."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads}: must be a positive number of threads (omit it for "
                             "torch's default, one per core)")
        import torch

        torch.set_num_threads(threads)


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


def one_line(msg) -> str:
    """A message on one line (a library message may quote a multi-line one)."""
    return " ".join(part.strip() for part in str(msg).splitlines() if part.strip())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the records (train's run.json)
    try:
        _apply_common(args)
        rc = args.func(args)
    except user_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {one_line(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train handles its own Ctrl-C (saves a checkpoint); this is the rest
        hint = {"eval": "; run the same command again to resume (finished sample shards are kept)",
                "train": "; nothing was saved since the last checkpoint (continue with --resume)"}
        print(f"interrupted (Ctrl-C): `python -m ddpm {args.command}` did not finish"
              f"{hint.get(args.command, '')}", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)
