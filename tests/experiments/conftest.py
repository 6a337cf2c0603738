"""The experiment smoke tests run the scripts in this process; some set environment variables for the libraries
they use (``XLA_FLAGS`` for JAX's CPU threads). Each test gets the environment back as it was, so nothing leaks
into later tests or the subprocesses they start."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
