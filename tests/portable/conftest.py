"""Make the helpers of this folder importable (``portable_problem``, ``portable_runners``)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """JAX x64 on, matmuls in full precision, for float64 tests (restored afterwards)."""
    with jax.enable_x64(True), jax.default_matmul_precision("float32"):
        yield
