"""Optimizers over CuPy arrays: ``xpoptim.adapters.cupy.MVNGrad([w, b], lr=1e-3)``.

The classes of :mod:`xpoptim.adapters.array` bound to CuPy: they accept CuPy arrays only, all on
one device (mixed devices are refused). The work runs under that device, on its current stream.
Each elementwise bucket (per group and dtype) is stepped by the core rule compiled with
``cupy.fuse`` into one kernel that writes the parameters and the state in place; when a rule cannot
be fused (``erf`` adaptation, a function cupy.fuse rejects, a state dtype other than the parameter
dtype, ``fuse=False``) it runs op by op and says so with a ``UserWarning`` and ``opt.fused ==
False``. Muon / DeVA_Sinf stack same-shape matrices into one Newton-Schulz call.

This module imports without CuPy; CuPy is needed only when arrays are passed in.
"""

from __future__ import annotations

from typing import Any

from xpoptim.core import SPECS

from .array import FunctionalOptimizer, Optimizer, _class_for, _make_class, _module_getattr, functional

__all__ = ["create", "functional", "FunctionalOptimizer", "Optimizer", "is_available", *(s.title for s in SPECS.values())]

BACKEND = "cupy"

for _spec in SPECS.values():
    globals()[_spec.title] = _make_class(_spec, backend=BACKEND, module=__name__)
del _spec


def is_available() -> bool:
    """True when CuPy imports and a CUDA device answers (importing CuPy alone proves nothing)."""
    try:
        import cupy  # noqa: PLC0415

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def create(name: str, params: Any, **hyperparams: Any) -> Optimizer:
    """``create("adamw", [w, b], lr=1e-3)`` over CuPy arrays (registry name or title; rules added with
    ``xpoptim.core.register`` included)."""
    from xpoptim.core import get_spec  # noqa: PLC0415

    return _class_for(get_spec(name), BACKEND, __name__, globals())(params, **hyperparams)


def __getattr__(name: str) -> type:
    """``xpoptim.adapters.cupy.<Title>`` for a rule added with ``xpoptim.core.register``."""
    return _module_getattr(name, BACKEND, __name__, globals())
