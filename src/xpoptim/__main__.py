"""``python -m xpoptim``: the cross-backend verifier and the demo (same as ``python -m xpoptim.matrix``)."""

import sys

from .matrix import main

if __name__ == "__main__":
    sys.exit(main())
