"""Optimizers over NumPy arrays: ``xpoptim.adapters.numpy.Adam([w, b], lr=1e-3)``.

The classes of :mod:`xpoptim.adapters.array` bound to NumPy: they accept NumPy arrays only (use
``xpoptim.adapters.array`` for other namespaces). ``opt.step(grads)`` updates the arrays in place,
in cache-sized chunks of one flat bucket per (group, dtype); ``functional(name, ...)`` is the pure
``init`` / ``update`` layer. See :mod:`xpoptim.adapters.array` for options and the checkpoint format.
"""

from __future__ import annotations

from typing import Any

from xpoptim.core import SPECS

from .array import DEFAULT_CHUNK_SIZE, FunctionalOptimizer, Optimizer, _class_for, _make_class, _module_getattr, functional

__all__ = ["create", "functional", "FunctionalOptimizer", "Optimizer", "DEFAULT_CHUNK_SIZE", *(s.title for s in SPECS.values())]

BACKEND = "numpy"

for _spec in SPECS.values():
    globals()[_spec.title] = _make_class(_spec, backend=BACKEND, module=__name__)
del _spec


def create(name: str, params: Any, **hyperparams: Any) -> Optimizer:
    """``create("adamw", [w, b], lr=1e-3)`` over NumPy arrays (registry name or title; rules added with
    ``xpoptim.core.register`` included)."""
    from xpoptim.core import get_spec  # noqa: PLC0415

    return _class_for(get_spec(name), BACKEND, __name__, globals())(params, **hyperparams)


def __getattr__(name: str) -> type:
    """``xpoptim.adapters.numpy.<Title>`` for a rule added with ``xpoptim.core.register``."""
    return _module_getattr(name, BACKEND, __name__, globals())
