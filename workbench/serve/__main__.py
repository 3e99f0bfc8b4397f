"""``python -m workbench.serve serve|registry ...``: the serving subcommands on their own."""

import sys

from .cli import main

sys.exit(main())
