"""What several subcommands share: their options, each defined once, and the one error
type of the command line itself (``UsageError``, for a request the library is never asked).

- ``--threads N`` (add_threads_arg; checked and applied by ``apply_threads`` before the
  handler runs) and ``--device`` (add_device_arg; checked by ddpm.runtime.pick_device
  where the device is chosen) on every subcommand that computes;
- ``--ema/--no-ema`` (one BooleanOptionalAction), ``--var`` (the fixed variances of
  diffusion.VarType), ``--no-progress`` where there is progress;
- ``--preset``/``--set`` (config), ``--sampler/--steps/--eta/--skip``, ``--bf16`` and
  ``--compile`` (sample and eval).
"""

from __future__ import annotations

import argparse

from ..config import PRESETS, apply_overrides, get_preset
from ..diffusion import VarType
from ..sampling import SKIP_TYPES, Sampler, SamplerKind

# The reverse variances a checkpoint can be sampled or scored with besides its own (a learned
# variance is a property of the network, not a choice at sampling time).
FIXED_VARIANCES = tuple(v.value for v in VarType if v != VarType.LEARNED)


class UsageError(Exception):
    """A mistake in the command line itself; printed without a traceback, exit code 2."""


def one_line(msg) -> str:
    """A message on one line (a library message may quote a multi-line one)."""
    return " ".join(part.strip() for part in str(msg).splitlines() if part.strip())


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads; default: torch's, one per core). "
                        "On a shared CPU, 1 is often faster")


def apply_threads(args: argparse.Namespace) -> None:
    """--threads, where the subcommand has it: checked and applied before the handler runs."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads {threads}: must be a positive number of threads (omit it for "
                             "torch's default, one per core)")
        import torch

        torch.set_num_threads(threads)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (default: cuda if a GPU is available, else cpu), cpu, cuda, cuda:N, mps")


def add_progress_arg(p: argparse.ArgumentParser, what: str = "no progress bars") -> None:
    p.add_argument("--no-progress", action="store_true", help=what)


def add_ema_arg(p: argparse.ArgumentParser, verb: str = "use") -> None:
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help=f"{verb} the EMA weights (default, as the paper evaluates) or the raw ones (--no-ema)")


def add_var_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--var", choices=FIXED_VARIANCES, default=None, help=what)


def add_config_args(p: argparse.ArgumentParser, preset_required: bool = True) -> None:
    """--preset and --set, shared by subcommands that build a config."""
    p.add_argument("--preset", required=preset_required, choices=list(PRESETS), metavar="NAME",
                   help=f"named configuration: {', '.join(PRESETS)} (see `python -m ddpm presets`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set diffusion.var_type=beta_tilde (repeatable)")


def resolve_config(preset, overrides, base=None):
    """The preset (or the config ``base``) with the --set overrides applied; a config mistake
    is a UsageError with the library's message."""
    try:
        return get_preset(preset, overrides) if base is None else apply_overrides(base, overrides)
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(e.args[0] if e.args else str(e)) from None


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """--sampler/--steps/--eta/--skip, --bf16 and --compile, shared by sample and eval."""
    p.add_argument("--sampler", choices=[k.value for k in SamplerKind], default=SamplerKind.ANCESTRAL.value,
                   help="ancestral: DDPM Algorithm 2 over all T steps (default; the paper's, used for every "
                        "paper number); respaced: DDPM on --steps of the T steps; ddim: DDIM on --steps "
                        "steps with --eta")
    p.add_argument("--steps", type=int, default=None, help="respaced/ddim: how many of the T steps")
    p.add_argument("--eta", type=float, default=0.0,
                   help="ddim: 0 deterministic (default), 1 DDPM's beta-tilde variance on the steps")
    p.add_argument("--skip", choices=SKIP_TYPES, default="uniform",
                   help="respaced/ddim: how the steps are chosen (the DDIM paper's uniform or quadratic)")
    p.add_argument("--bf16", action="store_true",
                   help="sample with the network under bf16 autocast: about 2x faster on CPUs, FID/KID "
                        "unchanged as measured (results/quick/recipe_search.md); the NLL bound always runs "
                        "in float32")
    p.add_argument("--compile", action="store_true",
                   help="run each sampling step (network, posterior mean, noise) through torch.compile: "
                        "CUDA graphs on a GPU, inductor's kernels on a CPU; the first batch pays the "
                        "compilation (tens of seconds). Samples equal the eager ones up to float rounding; "
                        "recorded as compiled, and a sample folder of the other setting is not resumed")


def sampler_from_args(args: argparse.Namespace) -> Sampler:
    """The Sampler the flags ask for; UsageError (exit 2, one line) for a meaningless mix."""
    try:
        return Sampler(args.sampler, args.steps, args.eta, args.skip)
    except ValueError as e:
        raise UsageError(str(e)) from None
