"""``python -m dataplane ...``: the ``ferryman`` command (``dataplane.cli``)."""

import sys

from .cli import main

sys.exit(main())
