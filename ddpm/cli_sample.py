"""Sampling from a checkpoint (work in progress): the `sample` subcommand."""


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("sample", help="draw samples from a checkpoint (work in progress)")
    p.add_argument("--checkpoint", required=True)
    p.set_defaults(func=lambda args: print("not implemented yet") or 1)
