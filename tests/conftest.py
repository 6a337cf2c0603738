"""Shared fixtures: one ``xp`` fixture over every array backend (array-api-extra style).

Fixtures (usable from any test folder):

* ``backend``: a loaded :class:`references.backends.BackendHandle` for numpy, array-api-strict, torch (CPU),
  jax (x64 on, ``jax_default_matmul_precision="float32"``) and cupy (only with a CUDA device; those params
  carry the ``gpu`` marker). A backend that cannot run is skipped with the reason it waits for.
* ``backend_f32``: the same plus the float32-only pseudo-backend ``array_api_strict_no_float64``
  (array-api-strict's ``Device("no_float64")``); use it for float32 tests.
* ``xp`` / ``device``: the namespace and device of ``backend``.
* ``to_numpy``: converts any backend's array to NumPy.

``XPOPTIM_BACKENDS=numpy,torch`` narrows the backends (the others are skipped, naming the variable).
The library configuration happens lazily, the first time a backend is requested, so test folders that never
ask for ``xp`` are not affected (in particular JAX's x64 flag stays as it was until a JAX-``xp`` test runs).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # make ``references`` importable from every test folder

from references.backends import Backend, BackendHandle, to_numpy  # noqa: E402

FULL_BACKENDS = (Backend.NUMPY, Backend.ARRAY_API_STRICT, Backend.TORCH, Backend.JAX, Backend.CUPY)
F32_BACKENDS = (*FULL_BACKENDS[:2], Backend.ARRAY_API_STRICT_NO_F64, *FULL_BACKENDS[2:])


def _param(b: Backend):
    marks = [pytest.mark.gpu] if b is Backend.CUPY else []
    return pytest.param(b, id=b.value, marks=marks)


def _load(b: Backend) -> BackendHandle:
    reason = b.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return b.load()


@pytest.fixture(params=[_param(b) for b in FULL_BACKENDS])
def backend(request) -> BackendHandle:
    """Every backend with float64 support (numpy, array_api_strict, torch, jax, cupy)."""
    return _load(request.param)


@pytest.fixture(params=[_param(b) for b in F32_BACKENDS])
def backend_f32(request) -> BackendHandle:
    """Every backend, including the float32-only ``array_api_strict_no_float64`` pseudo-backend."""
    return _load(request.param)


@pytest.fixture
def xp(backend):
    """The array namespace of ``backend``."""
    return backend.xp


@pytest.fixture
def device(backend):
    """The device arrays of ``backend`` are created on."""
    return backend.device


@pytest.fixture(name="to_numpy")
def to_numpy_fixture():
    """``to_numpy(x)``: copy any backend's array to NumPy."""
    return to_numpy
