"""Array backends for the test suite (the harness behind the ``xp`` fixture of ``tests/conftest.py``).

Modelled on array-api-extra's ``Backend`` enum (data-apis/array-api-extra ``tests/main/conftest.py``): one
entry per array library, plus the pseudo-backend ``array_api_strict_no_float64`` (array-api-strict's
``Device("no_float64")``, which mimics Apple MPS: any float64 creation raises).

Importing this module imports no array library; ``Backend.load()`` does, and configures it:

* JAX: ``jax_enable_x64`` on (float64 tests need it) and ``jax_default_matmul_precision="float32"`` (JAX's
  default float32 matmul on GPUs is TF32-like, spec ecosystem.md section 0 item 3; scipy pins the same).
* torch: CPU tensors; the float32 matmul precision must be ``"highest"`` (no TF32); ``load`` checks it.
* CuPy: only when ``cupy.cuda.is_available()``.

``XPOPTIM_BACKENDS`` (comma-separated backend ids, e.g. ``numpy,torch``) narrows the backends the fixtures
run on; nox's isolation sessions use it. ``array_api_strict`` also selects its ``no_float64`` pseudo-backend.

These helpers share no code with ``xpoptim``: they only move arrays between libraries.
"""

from __future__ import annotations

import enum
import importlib
import os
from typing import Any

import numpy as np

__all__ = ["Backend", "BackendHandle", "selected_backends", "to_numpy", "ENV_VAR"]

ENV_VAR = "XPOPTIM_BACKENDS"


class Backend(enum.Enum):
    """The array libraries the suite runs on (value = the id used in test ids and ``XPOPTIM_BACKENDS``)."""

    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    ARRAY_API_STRICT_NO_F64 = "array_api_strict_no_float64"
    TORCH = "torch"
    JAX = "jax"
    CUPY = "cupy"

    @property
    def has_float64(self) -> bool:
        return self is not Backend.ARRAY_API_STRICT_NO_F64

    @property
    def module_name(self) -> str:
        return {
            Backend.NUMPY: "numpy",
            Backend.ARRAY_API_STRICT: "array_api_strict",
            Backend.ARRAY_API_STRICT_NO_F64: "array_api_strict",
            Backend.TORCH: "torch",
            Backend.JAX: "jax",
            Backend.CUPY: "cupy",
        }[self]

    def unavailable_reason(self) -> str | None:
        """``None`` when the backend can run here, else a skip reason naming what it waits for."""
        sel = selected_backends()
        if sel is not None and self.value not in sel:
            return f"{self.value} not selected by {ENV_VAR}={os.environ.get(ENV_VAR)!r}"
        try:
            mod = importlib.import_module(self.module_name)
        except ImportError:
            return f"{self.module_name} not installed"
        if self is Backend.CUPY:
            try:
                ok = bool(mod.cuda.is_available())
            except Exception:  # a broken CUDA runtime counts as no device
                ok = False
            if not ok:
                return "needs a CUDA device for cupy"
        if self is Backend.ARRAY_API_STRICT_NO_F64 and not hasattr(mod, "Device"):
            return "needs array-api-strict >= 2.3 (Device('no_float64'))"
        return None

    def load(self) -> BackendHandle:
        """Import and configure the library; return a handle with its namespace and device."""
        if self is Backend.NUMPY:
            import array_api_compat.numpy as xp

            return BackendHandle(self, xp, None)
        if self in (Backend.ARRAY_API_STRICT, Backend.ARRAY_API_STRICT_NO_F64):
            import array_api_strict as xp

            dev = xp.Device("no_float64") if self is Backend.ARRAY_API_STRICT_NO_F64 else xp.Device("CPU_DEVICE")
            return BackendHandle(self, xp, dev)
        if self is Backend.TORCH:
            import array_api_compat.torch as xp
            import torch

            precision = torch.get_float32_matmul_precision()
            assert precision == "highest", (
                f"torch float32 matmul precision is {precision!r}: the suite needs 'highest' (no TF32); "
                "something changed torch.set_float32_matmul_precision"
            )
            return BackendHandle(self, xp, torch.device("cpu"))
        if self is Backend.JAX:
            import jax

            jax.config.update("jax_enable_x64", True)
            jax.config.update("jax_default_matmul_precision", "float32")
            import jax.numpy as xp

            return BackendHandle(self, xp, jax.devices()[0])
        if self is Backend.CUPY:
            import array_api_compat.cupy as xp
            import cupy

            return BackendHandle(self, xp, cupy.cuda.Device())
        raise AssertionError(self)


def selected_backends() -> set[str] | None:
    """The backend ids named in ``XPOPTIM_BACKENDS`` (``None``: all)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    names = {s.strip() for s in raw.split(",") if s.strip()}
    if "array_api_strict" in names:
        names.add("array_api_strict_no_float64")
    if "strict" in names:
        names |= {"array_api_strict", "array_api_strict_no_float64"}
    known = {b.value for b in Backend}
    unknown = names - known - {"strict"}
    if unknown:
        raise ValueError(
            f"{ENV_VAR}={raw!r} names unknown backend(s) {sorted(unknown)}; expected ids from {sorted(known)}"
        )
    return names


class BackendHandle:
    """A loaded backend: its array namespace ``xp``, the ``device`` arrays live on, and converters."""

    def __init__(self, backend: Backend, xp: Any, device: Any) -> None:
        self.backend = backend
        self.xp = xp
        self.device = device

    @property
    def name(self) -> str:
        return self.backend.value

    @property
    def has_float64(self) -> bool:
        return self.backend.has_float64

    def dtype(self, name: str) -> Any:
        """The namespace's dtype object for ``"float32"``/``"float64"``/..."""
        return getattr(self.xp, name)

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """A NumPy array (or number) as an array of this backend, on its device, with ``dtype`` (a name)."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype)
        if self.backend is Backend.TORCH:
            import torch

            return torch.asarray(a.copy(), device=self.device)
        if self.backend is Backend.JAX:
            import jax

            return jax.device_put(self.xp.asarray(a), self.device)
        if self.backend is Backend.CUPY:
            import cupy

            return cupy.asarray(a)
        if self.backend is Backend.NUMPY:
            return a.copy()
        return self.xp.asarray(a, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return to_numpy(x)

    def __repr__(self) -> str:
        return f"BackendHandle({self.name})"


def to_numpy(x: Any) -> np.ndarray:
    """Copy any backend's array (numpy, torch, jax, cupy, array-api-strict on any device) to NumPy."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x)
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return x.detach().cpu().numpy()
    if mod == "cupy":
        return x.get()
    if mod in ("jax", "jaxlib"):
        return np.asarray(x)
    if mod == "array_api_strict":
        import array_api_strict

        if x.device != array_api_strict.Device("CPU_DEVICE"):
            x = x.to_device(array_api_strict.Device("CPU_DEVICE"))
        return np.from_dlpack(x)
    return np.asarray(x)
