"""Training (work in progress): the `train` subcommand."""


def add_subcommand(subparsers) -> None:
    from .cli import add_config_args

    p = subparsers.add_parser("train", help="train a model (work in progress)")
    add_config_args(p)
    p.add_argument("--out", help="run directory")
    p.set_defaults(func=lambda args: print("not implemented yet") or 1)
