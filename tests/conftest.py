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

User rules: ``--xpoptim-rules FILE`` (repeatable, or ``XPOPTIM_RULES=FILE[:FILE...]``) imports a rule file that
calls ``xpoptim.core.register`` before any test module is collected, so every generic suite (they read the
registry when they are collected) also runs on the registered rule: ``python -m pytest --xpoptim-rules
examples/lion.py``; ``--xpoptim-user-rules-only`` keeps only the tests whose id names a user rule (``nox -s
extension``). ``tests/registry_cases.py`` gives the suites each rule's settings and float64 reference.
The library configuration happens lazily, the first time a backend is requested, so test folders that never
ask for ``xp`` are not affected (in particular JAX's x64 flag stays as it was until a JAX-``xp`` test runs).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # make ``references`` importable from every test folder

from references.backends import Backend, BackendHandle, to_numpy  # noqa: E402

#: The names the user rule files registered (in the order given), for ``-m``-free selection and the header.
USER_RULES: list[str] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--xpoptim-rules",
        action="append",
        default=[],
        metavar="FILE",
        help="import a Python file that registers optimizer rules (xpoptim.core.register) before collection, so "
        "every generic suite also runs on them; repeatable (also: XPOPTIM_RULES=FILE[:FILE...])",
    )


    parser.addoption(
        "--xpoptim-user-rules-only",
        action="store_true",
        default=False,
        help="with --xpoptim-rules: run only the tests whose id names one of the registered user rules",
    )


def _rule_files(config: pytest.Config) -> list[str]:
    env = [f for f in os.environ.get("XPOPTIM_RULES", "").split(os.pathsep) if f]
    return [*config.getoption("--xpoptim-rules"), *env]


def pytest_configure(config: pytest.Config) -> None:
    """Import the user rule files (each once, as its own module) before any test module is collected."""
    import xpoptim.core as core

    for i, name in enumerate(_rule_files(config)):
        path = pathlib.Path(name)
        if not path.is_absolute():
            path = pathlib.Path(config.invocation_params.dir) / path
        if not path.is_file():
            raise pytest.UsageError(f"--xpoptim-rules {name!r}: no such file (expected a Python file that calls xpoptim.core.register)")
        before = set(core.SPECS)
        module_name = f"xpoptim_user_rules_{i}_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        added = [n for n in core.SPECS if n not in before]
        if not added:
            raise pytest.UsageError(f"--xpoptim-rules {name!r} registered no new optimizer (expected a call of xpoptim.core.register)")
        USER_RULES.extend(added)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--xpoptim-user-rules-only``: keep the tests whose id names a user rule (``[lion]``, ``-lion-``, ...)."""
    if not config.getoption("--xpoptim-user-rules-only"):
        return
    if not USER_RULES:
        raise pytest.UsageError("--xpoptim-user-rules-only needs --xpoptim-rules FILE (or XPOPTIM_RULES)")
    pattern = re.compile(r"(?<![a-z0-9_])(" + "|".join(map(re.escape, USER_RULES)) + r")(?![a-z0-9_])")
    keep = [it for it in items if pattern.search(it.nodeid.split("::", 1)[-1])]
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep


def pytest_report_header(config: pytest.Config) -> str | None:
    return f"xpoptim user rules: {', '.join(USER_RULES)}" if USER_RULES else None

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
