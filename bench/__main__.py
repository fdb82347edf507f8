"""``python -m bench``: the benchmark CLI (same as ``ferryman bench``)."""

import sys

from .cli import main

sys.exit(main())
