"""``python -m softgrad``: the same as the ``softgrad`` command."""

import sys

from softgrad.cli import main

sys.exit(main())
