"""Fixtures for the optax adapter tests.

* ``x64``: runs the test with JAX's x64 mode on (``jax.enable_x64`` context) and float32 matmuls pinned to full
  precision, then restores both, so float32 tests elsewhere still see float32 defaults.
* ``f32_precision``: pins ``jax_default_matmul_precision="float32"`` for float32 tests with matmuls.
"""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def x64():
    with jax.enable_x64(True), jax.default_matmul_precision("float32"):
        yield


@pytest.fixture
def f32_precision():
    with jax.default_matmul_precision("float32"):
        yield
