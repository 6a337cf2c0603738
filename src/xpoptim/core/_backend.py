"""Namespace helpers shared by the core: host scalars, the backend ``erf`` and the backend GEMM.

Nothing here imports torch, jax or cupy. A backend's module is looked up in ``sys.modules`` only
when an array of that backend is already in hand (so the backend is loaded by the caller, never by
us). These are the two primitives the Array API standard lacks and the rules need: ``erf`` and a
GEMM that accumulates into an existing matrix (BLAS ``gemm``: ``beta C + alpha A B``). Backend-specific GEMM
routing is not here: adapters inject it with :func:`register_gemm`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import array_api_compat

__all__ = ["HOST", "array_namespace", "erf", "is_concrete_number", "real_scalar", "matmul", "matmul_add", "register_gemm"]


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


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, complex):
        return "a complex number"
    if isinstance(value, (str, bytes)):
        return "a string"
    shape = getattr(value, "shape", None)
    if shape is not None and getattr(value, "dtype", None) is not None:
        return f"an array of shape {tuple(shape)} and dtype {value.dtype}"
    return f"an object of type {type(value).__name__}"


def real_scalar(value: Any) -> float | None:
    """The one check for "is this a number now, a traced value, or neither" (hyperparameters, cross-field rules).

    Accepted: Python ``int`` / ``float`` (not ``bool``), NumPy real scalars, and 0-D or 1-element arrays of a real
    (integer or floating) dtype of any framework. A 0-D or 1-element real array that cannot be read now (a JAX
    tracer under ``jax.jit`` / ``optax.inject_hyperparams``, a fake tensor under ``torch.compile``) is *traced*:
    its value is checked when it is concrete, so this returns None.

    Args:
        value: the candidate.

    Returns:
        ``float(value)`` for a concrete real scalar (NaN and infinities included: the caller decides), or None
        for a traced one.

    Raises:
        TypeError: naming what the value is, for ``None``, ``bool``, strings, complex numbers (Python, NumPy or
            complex arrays), arrays of any other size, booleans arrays and any other object.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, complex)):
        raise TypeError(_describe(value))
    if isinstance(value, (int, float)):
        return float(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(_describe(value))
    name = str(dtype)
    if "complex" in name or "bool" in name or not any(k in name for k in ("float", "int")):
        raise TypeError(f"{_describe(value)} (a real number is needed)")
    if math.prod(tuple(shape)) != 1:
        raise TypeError(f"{_describe(value)} (a 0-D or 1-element array is needed)")
    try:
        return float(value.reshape(())) if tuple(shape) != () else float(value)
    except Exception:  # the one place that turns "cannot be read now" into "traced"
        return None


def is_concrete_number(value: Any) -> bool:
    """True when ``value`` is a real scalar that can be read now (see :func:`real_scalar`)."""
    try:
        return real_scalar(value) is not None
    except TypeError:
        return False


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


# ------------------------------------------------------------------------------------------------------------------
# GEMM: ``A @ B`` and ``beta C + alpha A @ B``, with backend routing injected by the adapters
# ------------------------------------------------------------------------------------------------------------------

#: GEMM overrides registered by adapters (:func:`register_gemm`), tried in order. Each is a pair
#: ``(matmul(a, b), matmul_add(c, a, b, alpha, beta))`` of callables returning the result, or ``None`` when they do
#: not handle those arrays (then the next one, and finally the array namespace, computes it).
_GEMM_OVERRIDES: list[tuple[Callable[[Any, Any], Any], Callable[[Any, Any, Any, float, float], Any]]] = []


def register_gemm(
    matmul: Callable[[Any, Any], Any], matmul_add: Callable[[Any, Any, Any, float, float], Any]
) -> None:
    """Let an adapter route matrix products of its own arrays (a faster library, a fused accumulate).

    The core stays free of any framework: an adapter registers two callables, and :func:`matmul` /
    :func:`matmul_add` call them first. Registering the same pair twice has no effect.

    Args:
        matmul: ``matmul(a, b)`` -> ``a @ b``, or ``None`` to decline.
        matmul_add: ``matmul_add(c, a, b, alpha, beta)`` -> ``beta * c + alpha * (a @ b)``, or ``None`` to decline.
    """
    pair = (matmul, matmul_add)
    if pair not in _GEMM_OVERRIDES:
        _GEMM_OVERRIDES.append(pair)


def matmul(xp: Any, a: Any, b: Any) -> Any:
    """``a @ b``: a registered override (:func:`register_gemm`) when one handles the arrays, else ``xp.matmul``.

    Args:
        xp: the array namespace of ``a`` and ``b``.
        a: array of shape ``(..., n, k)``.
        b: array of shape ``(..., k, m)``.

    Returns:
        The product, shape ``(..., n, m)``.
    """
    for override, _ in _GEMM_OVERRIDES:
        out = override(a, b)
        if out is not None:
            return out
    return xp.matmul(a, b)


def matmul_add(xp: Any, c: Any, a: Any, b: Any, *, alpha: float = 1.0, beta: float = 1.0) -> Any:
    """BLAS ``gemm``: ``beta * c + alpha * (a @ b)``.

    A registered override (:func:`register_gemm`; the torch adapter's uses ``addmm`` / ``baddbmm``, so the
    accumulation happens inside the GEMM) when one handles the arrays; otherwise
    ``beta * c + alpha * xp.matmul(a, b)`` (XLA fuses it).

    Args:
        xp: the array namespace.
        c: array of shape ``(..., n, m)``.
        a: array of shape ``(..., n, k)``.
        b: array of shape ``(..., k, m)``.
        alpha: Python float multiplying the product.
        beta: Python float multiplying ``c``.

    Returns:
        ``beta * c + alpha * (a @ b)``.
    """
    for _, override in _GEMM_OVERRIDES:
        out = override(c, a, b, alpha, beta)
        if out is not None:
            return out
    prod = xp.matmul(a, b)
    return beta * c + (prod if alpha == 1.0 else alpha * prod)
