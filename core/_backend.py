"""Namespace helpers shared by the core: host scalars and the backend ``erf``.

Nothing here imports torch, jax or cupy. A backend's special-function module is looked up in
``sys.modules`` only when an array of that backend is already in hand (so the backend is loaded by
the caller, never by us).
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace
from typing import Any

import array_api_compat

__all__ = ["HOST", "array_namespace", "erf", "is_concrete_number"]


def array_namespace(*arrays: Any) -> Any:
    """Return the array-API namespace of ``arrays`` (array-api-compat wrapped where needed)."""
    return array_api_compat.array_namespace(*arrays)


def _host_where(cond: bool, a: float, b: float) -> float:
    return a if cond else b


#: A tiny namespace of scalar functions over Python floats, used to compute step-derived scalars
#: (bias corrections, kappa, rho) in float64 on the host. Scalar functions in the core take an
#: ``ops`` argument that is either this namespace or an array namespace (inside a traced graph).
HOST = SimpleNamespace(
    sqrt=math.sqrt,
    minimum=min,
    maximum=max,
    where=_host_where,
    name="host",
)


def is_concrete_number(value: Any) -> bool:
    """True when ``value`` can be turned into a Python float now (not a traced array)."""
    if isinstance(value, (bool,)):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except Exception:  # traced jax values, non-0-D arrays, strings
        return False
    return True


def erf(xp: Any, x: Any) -> Any:
    """Elementwise error function, dispatched to the backend's special-function module.

    ``erf`` is not part of the Array API standard. We use ``torch.special.erf``,
    ``jax.scipy.special.erf``, ``cupyx.scipy.special.erf`` or ``scipy.special.erf`` for the
    respective arrays, and fall back to ``math.erf`` vectorised through NumPy (exact to float64
    rounding) for any other namespace, converting back with ``xp.asarray``.

    Args:
        xp: the array namespace of ``x``.
        x: a real floating array.

    Returns:
        ``erf(x)`` with the dtype and device of ``x``.
    """
    if array_api_compat.is_torch_array(x):
        return sys.modules["torch"].special.erf(x)
    if array_api_compat.is_jax_array(x) or _is_jax_tracer(x):
        return sys.modules["jax"].scipy.special.erf(x)
    if array_api_compat.is_cupy_array(x):
        import importlib

        return importlib.import_module("cupyx.scipy.special").erf(x)
    import numpy as np

    if isinstance(x, np.ndarray) or np.isscalar(x):
        return _numpy_erf(np.asarray(x))
    # Any other namespace (array-api-strict, ...): round-trip through NumPy on the host.
    host = np.from_dlpack(x) if hasattr(x, "__dlpack__") else np.asarray(x)
    return xp.asarray(_numpy_erf(host), dtype=x.dtype, device=array_api_compat.device(x))


def _is_jax_tracer(x: Any) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def _numpy_erf(x: Any) -> Any:
    import numpy as np

    try:
        from scipy.special import erf as scipy_erf

        return scipy_erf(x)
    except ImportError:  # numpy-only install: exact math.erf per element
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
