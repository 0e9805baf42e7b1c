"""``python -m gatekeeper``: the same as the ``gatekeeper`` command."""

import sys

from gatekeeper.cli import main

sys.exit(main())
