"""``python -m ddpm``: the command line, ddpm/cli/."""

import sys

from .cli import main

sys.exit(main())
