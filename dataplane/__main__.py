"""``python -m dataplane edge|connector|client|pki``: the node processes."""

import sys

from .run import main

sys.exit(main())
