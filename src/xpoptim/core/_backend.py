"""Namespace helpers shared by the core: host scalars, the backend ``erf`` and the backend GEMM.

Nothing here imports torch, jax or cupy. A backend's module is looked up in ``sys.modules`` only
when an array of that backend is already in hand (so the backend is loaded by the caller, never by
us). These are the two primitives the Array API standard lacks and the rules need: ``erf`` and a
GEMM that accumulates into an existing matrix (BLAS ``gemm``: ``beta C + alpha A B``).
"""

from __future__ import annotations

import math
import sys
import warnings
from types import SimpleNamespace
from typing import Any

import array_api_compat

__all__ = ["HOST", "array_namespace", "erf", "is_concrete_number", "real_scalar", "matmul", "matmul_add", "TORCH_CPU_ONEDNN"]


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
# GEMM: ``A @ B`` and ``beta C + alpha A @ B``
# ------------------------------------------------------------------------------------------------------------------

#: Route float32 matrix products of CPU torch tensors through oneDNN (``torch.ops.mkldnn._linear_pointwise``)
#: instead of torch's default BLAS. Measured on an AMD EPYC (2 cores, torch 2.13 with MKL): a 1024x1024 float32
#: product takes 10.9 ms through ``torch.matmul`` (MKL takes a slow path on this CPU) and 4.6 ms through oneDNN,
#: with the same float32 accuracy; Newton-Schulz on 4096x1024 drops from 485 ms to 264 ms. Set to ``False`` to
#: always use ``torch.matmul`` (the path is also skipped when oneDNN is unavailable or disabled, when a product
#: needs autograd, and after its first failure).
TORCH_CPU_ONEDNN = True

_ONEDNN_BROKEN: list[str] = []
_ONEDNN_OP: list[bool] = []  # whether this torch build has the op, looked up once


def _torch_of(x: Any) -> Any:
    return sys.modules["torch"] if array_api_compat.is_torch_array(x) else None


def _use_onednn(torch: Any, a: Any, b: Any) -> bool:
    if not TORCH_CPU_ONEDNN or _ONEDNN_BROKEN:
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.ndim < 2 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2]:
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if not _ONEDNN_OP:
        _ONEDNN_OP.append(hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    return _ONEDNN_OP[0]


def _onednn_matmul(torch: Any, a: Any, b: Any) -> Any:
    """``a @ b`` through oneDNN's inner-product primitive: ``linear(x, w) = x @ w^T`` with ``w = b^T``."""
    lin = torch.ops.mkldnn._linear_pointwise
    if a.ndim == 2:  # a strided weight is reordered inside oneDNN, faster than a .contiguous() transpose here
        return lin(a.contiguous(), b.mT, None, "none", [], "")
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    w3 = b.reshape(-1, *b.shape[-2:]).mT
    outs = [lin(a3[i].contiguous(), w3[i], None, "none", [], "") for i in range(a3.shape[0])]
    out = outs[0][None] if len(outs) == 1 else torch.stack(outs)
    return out.reshape(*lead, *out.shape[-2:])


#: On CPU a stack of matrices this large (``n * k * m`` multiply-adds each) is multiplied one matrix at a time:
#: measured with torch 2.13 on 2 cores, a batched bfloat16 ``baddbmm`` over ``(1, 1024, 4096)`` is 1.4x slower than
#: ``addmm`` on the matrix, and 4 x (1024 x 1024) is 1.1x slower than a loop; small matrices keep the batched call.
CPU_LOOP_MIN_MACS = 1 << 22


def _cpu_loop(a: Any, b: Any) -> bool:
    return a.device.type == "cpu" and a.ndim == 3 and a.shape[-2] * a.shape[-1] * b.shape[-1] >= CPU_LOOP_MIN_MACS


def _try_onednn(torch: Any, a: Any, b: Any) -> Any:
    if not _use_onednn(torch, a, b):
        return None
    try:
        return _onednn_matmul(torch, a, b)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # an op this torch build lacks: never again
        _ONEDNN_BROKEN.append(repr(exc))
        warnings.warn(
            f"xpoptim: oneDNN float32 matmul failed ({exc!r}); using torch.matmul from now on",
            UserWarning,
            stacklevel=3,
        )
        return None


def matmul(xp: Any, a: Any, b: Any) -> Any:
    """``a @ b`` (``xp.matmul``), through oneDNN for float32 CPU torch tensors (see ``TORCH_CPU_ONEDNN``).

    Args:
        xp: the array namespace of ``a`` and ``b``.
        a: array of shape ``(..., n, k)``.
        b: array of shape ``(..., k, m)``.

    Returns:
        The product, shape ``(..., n, m)``.
    """
    torch = _torch_of(a)
    if torch is not None:
        out = _try_onednn(torch, a, b)
        if out is not None:
            return out
        if b.ndim == 3 and _cpu_loop(a, b):
            if a.shape[0] == 1:
                return torch.matmul(a[0], b[0])[None]
            return torch.stack([torch.matmul(a[i], b[i]) for i in range(a.shape[0])])
    return xp.matmul(a, b)


def matmul_add(xp: Any, c: Any, a: Any, b: Any, *, alpha: float = 1.0, beta: float = 1.0) -> Any:
    """BLAS ``gemm``: ``beta * c + alpha * (a @ b)``, one fused call where the backend has one.

    torch uses ``addmm`` / ``baddbmm`` (the accumulation happens inside the GEMM: no extra passes over the
    result, which matters in bfloat16 on CPU); float32 CPU tensors go through oneDNN (see ``TORCH_CPU_ONEDNN``)
    and add ``c`` in place. Other namespaces compute ``beta * c + alpha * xp.matmul(a, b)`` (XLA fuses it).

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
    torch = _torch_of(a)
    if torch is not None:
        out = _try_onednn(torch, a, b)
        if out is not None:
            if alpha != 1.0:
                out.mul_(alpha)
            return out.add_(c, alpha=beta)
        if a.ndim == 2 and b.ndim == 2 and c.ndim == 2:
            return torch.addmm(c, a, b, beta=beta, alpha=alpha)
        if a.ndim == 3 and b.ndim == 3 and c.ndim == 3:
            if not _cpu_loop(a, b):
                return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
            if c.shape[0] == 1:
                return torch.addmm(c[0], a[0], b[0], beta=beta, alpha=alpha)[None]
            return torch.stack([torch.addmm(c[i], a[i], b[i], beta=beta, alpha=alpha) for i in range(c.shape[0])])
    prod = xp.matmul(a, b)
    return beta * c + (prod if alpha == 1.0 else alpha * prod)
