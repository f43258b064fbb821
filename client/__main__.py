"""`python -m client ...`: the command line (cli.py)."""

import sys

from client.cli import main

sys.exit(main())
