"""``python -m ddpm``: see ddpm/cli.py."""

import sys

from .cli import main

sys.exit(main())
