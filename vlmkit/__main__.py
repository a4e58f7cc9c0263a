"""`python -m vlmkit ...` (and `torchrun -m vlmkit ...`): the `vlmkit` command line."""

import sys

from vlmkit.cli import main

sys.exit(main())
