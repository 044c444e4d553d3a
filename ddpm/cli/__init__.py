"""The command line: ``python -m ddpm <subcommand> ...`` (ddpm/__main__.py calls ``main``).

One module per subcommand, in SUBCOMMANDS; each defines ``add_subcommand(subparsers)``,
which adds its parser and sets ``func``, its handler (the parsed args -> an exit code or
None). A handler checks what only the command line can get wrong, calls the library and
prints. Options several subcommands share are defined once, in ddpm.cli.options.

Errors in what the user asked for (unknown config keys, ill-typed values, a missing data
set or checkpoint, a device that is not there, ...) are printed as one clean line and exit
with code 2; anything else is a bug and keeps its traceback. The library raises its own
error types and never imports this package; USER_ERRORS lists the types that mean "the
request is wrong". Ctrl-C prints one line and exits with 130 (``train`` saves a
checkpoint first).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..evaluate import EvalError
from ..generate import SamplesError
from ..inception import FidelityError
from ..rundir import RunDirError
from ..runtime import DeviceError
from . import convert, evaluate, export, fid, presets, sample, train
from .options import UsageError, apply_threads, one_line

SUBCOMMANDS = (presets, train, sample, fid, evaluate, export, convert)  # in the order --help lists them
SUBCOMMAND_MODULES = [m.__name__ for m in SUBCOMMANDS]
# Library errors that mean "the request is wrong", not "the code is wrong" (exit 2, one line).
USER_ERRORS = (UsageError, CheckpointError, ConfigError, DataError, DeviceError, RunDirError, EvalError,
               FidelityError, SamplesError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm",
        description="DDPM (Ho, Jain & Abbeel 2020): train, sample and evaluate diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_subcommand(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the records (train's run.json)
    try:
        apply_threads(args)
        rc = args.func(args)
    except USER_ERRORS as e:
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
