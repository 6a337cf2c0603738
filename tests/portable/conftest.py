"""Make the helpers of this folder importable (``portable_problem``, ``portable_runners``)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
