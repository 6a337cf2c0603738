"""Array-namespace helpers of the array adapter: backend detection, host copies, devices, dtypes, shapes (no math)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import array_api_compat
import numpy as np

from xpoptim.core import default_state_dtype


def _backend_name(x: Any) -> str:
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    return "other"


def _is_array(x: Any) -> bool:
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool))


def _size(shape: tuple) -> int:
    return int(math.prod(shape))


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` (host memory), whatever its namespace."""
    kind = _backend_name(x)
    if kind == "numpy":
        return np.array(x, copy=True)
    if kind == "cupy":
        return x.get()
    if kind == "torch":
        return x.detach().cpu().numpy().copy()
    if kind == "jax":
        return np.array(x, copy=True)
    try:
        return np.array(np.from_dlpack(x), copy=True)
    except Exception:
        return np.array(x, copy=True)


def _from_numpy(xp: Any, arr: np.ndarray, device: Any, dtype: Any) -> Any:
    """``arr`` (NumPy) as an array of namespace ``xp`` on ``device`` with ``dtype``."""
    name = getattr(xp, "__name__", "")
    if "numpy" in name:
        return np.array(arr, dtype=dtype, copy=True)
    if "cupy" in name:
        import cupy  # noqa: PLC0415  (only reached with CuPy arrays in hand)

        with device:
            return cupy.asarray(arr).astype(dtype, copy=False)
    try:
        out = xp.asarray(arr, device=device)
    except Exception:
        out = xp.asarray(arr)
    return out if out.dtype == dtype else xp.astype(out, dtype)


def _device_context(device: Any) -> Any:
    """CuPy: make ``device`` current (work goes to its current stream). Others: nothing."""
    if type(device).__module__.startswith("cupy"):
        return device
    return contextlib.nullcontext()


def _no_grad(kind: str) -> Any:
    """torch tensors through this adapter: in-place writes on leaves that require grad need no_grad."""
    if kind == "torch":
        import sys  # noqa: PLC0415

        return sys.modules["torch"].no_grad()
    return contextlib.nullcontext()


def _is_real_floating(xp: Any, dtype: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except Exception:
        return "float" in str(dtype) and "complex" not in str(dtype)


def _default_state_dtype(xp: Any, dtype: Any, state_dtype: Any) -> Any:
    """The core's state-dtype policy (``xpoptim.core.default_state_dtype``) in namespace ``xp``."""
    return default_state_dtype(dtype, state_dtype, xp.float32)


def _matrix_shape(shape: tuple, layout: str) -> tuple:
    if layout == "out_in":
        return (shape[0], _size(shape[1:]))
    return (_size(shape[:-1]), shape[-1])


def _reshape(xp: Any, x: Any, shape: tuple) -> Any:
    return x if tuple(x.shape) == tuple(shape) else xp.reshape(x, shape)



def _numpy_dtype(dtype: Any) -> np.dtype:
    s = str(dtype).split(".")[-1]
    if s == "bfloat16":
        return np.dtype(np.float32)
    return np.dtype(s)

