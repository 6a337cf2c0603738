"""The experiment smoke tests run the scripts in this process. A script sets one thread per framework for its own
run (``one_thread_per_framework``: torch's thread count, ``XLA_FLAGS``, JAX's float64 flag) and must give the
process its settings back: every test here checks that ``XLA_FLAGS``, torch's thread count and JAX's float64 flag
are the same after it as before."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def _settings() -> dict:
    import torch

    out: dict = {"torch_threads": torch.get_num_threads()}
    try:
        import jax

        out["jax_enable_x64"] = bool(jax.config.jax_enable_x64)
    except ImportError:
        pass
    # The variables the scripts set (libraries set others of their own when first imported: sklearn's KMP_*).
    out["XLA_FLAGS"] = os.environ.get("XLA_FLAGS")
    return out


@pytest.fixture(autouse=True)
def _process_settings_unchanged() -> Iterator[None]:
    before = _settings()
    yield
    after = _settings()
    changed = sorted(k for k in before if before[k] != after[k])
    assert not changed, f"an experiment changed the process settings: {changed}"
