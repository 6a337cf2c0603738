"""Discovery of the array backends installed in this environment, for the verifier and ``xpoptim.testing``.

A backend is an array namespace plus a device: ``numpy``, ``array_api_strict``, ``torch-cpu``,
``torch-cuda``, ``jax-cpu``, ``jax-gpu``, ``cupy``. Frameworks are imported lazily, only here; a
backend that cannot be used is reported with the reason (not installed, no CUDA device, ...).

Numerics are pinned while the verifier runs (:func:`pinned_numerics`): JAX with x64 enabled and
``default_matmul_precision="float32"`` (no TF32-like matmuls on GPUs), torch with TF32 off and
``float32_matmul_precision="highest"``. The previous settings are restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "Backend",
    "discover",
    "discover_required",
    "pinned_numerics",
    "to_numpy",
    "BACKEND_NAMES",
    "resolve_names",
]

#: Every backend the verifier knows, in report order.
BACKEND_NAMES = ("numpy", "array_api_strict", "torch-cpu", "torch-cuda", "jax-cpu", "jax-gpu", "cupy")

_ALIASES = {
    "strict": ("array_api_strict",),
    "array-api-strict": ("array_api_strict",),
    "torch": ("torch-cpu", "torch-cuda"),
    "jax": ("jax-cpu", "jax-gpu"),
    "cuda": ("torch-cuda", "jax-gpu", "cupy"),
    "gpu": ("torch-cuda", "jax-gpu", "cupy"),
    "cpu": ("numpy", "array_api_strict", "torch-cpu", "jax-cpu"),
}


@dataclasses.dataclass(frozen=True)
class Backend:
    """One array namespace on one device.

    Attributes:
        name: one of ``BACKEND_NAMES``.
        xp: the array-API namespace (array-api-compat wrapped where needed).
        device: the device to create arrays on (``None``: the namespace default).
        dtypes: ``{"float64": ..., "float32": ...}`` dtype objects of ``xp``.
        framework: ``"numpy"``, ``"array_api_strict"``, ``"torch"``, ``"jax"`` or ``"cupy"``.
    """

    name: str
    xp: Any
    device: Any
    dtypes: dict
    framework: str

    def asarray(self, value: Any, dtype: str) -> Any:
        """Convert a NumPy array (or number) to this backend's ``dtype`` (``"float64"``/``"float32"``)."""
        if self.device is None:
            return self.xp.asarray(value, dtype=self.dtypes[dtype])
        return self.xp.asarray(value, dtype=self.dtypes[dtype], device=self.device)


def resolve_names(spec: str | None) -> list[str]:
    """Expand a comma-separated backend selection (``"numpy,torch"``) into ``BACKEND_NAMES`` entries.

    Raises:
        ValueError: naming an unknown backend and the allowed names.
    """
    if spec is None or spec.strip() in ("", "all"):
        return list(BACKEND_NAMES)
    out: list[str] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        names = _ALIASES.get(name, (name,) if name in BACKEND_NAMES else None)
        if names is None:
            raise ValueError(
                f"backends={spec!r} is invalid: {name!r} is unknown; expected names from {list(BACKEND_NAMES)} "
                f"or the aliases {sorted(_ALIASES)}"
            )
        out.extend(n for n in names if n not in out)
    return [n for n in BACKEND_NAMES if n in out]


def _numpy() -> Backend:
    import array_api_compat.numpy as xp
    import numpy as np

    return Backend("numpy", xp, None, {"float64": np.float64, "float32": np.float32}, "numpy")


def _strict() -> Backend:
    xp = importlib.import_module("array_api_strict")
    return Backend("array_api_strict", xp, None, {"float64": xp.float64, "float32": xp.float32}, "array_api_strict")


def _torch(device: str) -> Backend:
    torch = importlib.import_module("torch")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False (no CUDA device or a CPU-only torch build)")
    xp = importlib.import_module("array_api_compat.torch")
    importlib.import_module("xpoptim.adapters._torch_gemm")  # torch's GEMM routing for the core's matrix products
    return Backend(f"torch-{device}", xp, torch.device(device), {"float64": torch.float64, "float32": torch.float32}, "torch")


def _jax(platform: str) -> Backend:
    jax = importlib.import_module("jax")
    try:
        devices = jax.devices(platform)
    except RuntimeError as exc:
        raise RuntimeError(f"jax has no {platform} device ({exc})") from None
    if not devices:
        raise RuntimeError(f"jax has no {platform} device")
    jnp = importlib.import_module("jax.numpy")
    return Backend(f"jax-{platform}", jnp, devices[0], {"float64": jnp.float64, "float32": jnp.float32}, "jax")


def _cupy() -> Backend:
    cupy = importlib.import_module("cupy")
    if not cupy.cuda.is_available():
        raise RuntimeError("cupy.cuda.is_available() is False (no CUDA device or driver)")
    xp = importlib.import_module("array_api_compat.cupy")
    return Backend("cupy", xp, None, {"float64": xp.float64, "float32": xp.float32}, "cupy")


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy,
    "array_api_strict": _strict,
    "torch-cpu": lambda: _torch("cpu"),
    "torch-cuda": lambda: _torch("cuda"),
    "jax-cpu": lambda: _jax("cpu"),
    "jax-gpu": lambda: _jax("gpu"),
    "cupy": _cupy,
}


def discover(names: list[str] | None = None) -> tuple[list[Backend], dict[str, str]]:
    """Find the usable backends among ``names`` (default: ``$XPOPTIM_BACKENDS`` or all).

    Args:
        names: ``BACKEND_NAMES`` entries (see :func:`resolve_names`).

    Returns:
        ``(backends, unavailable)`` where ``unavailable`` maps a name to the reason it cannot run.
    """
    if names is None:
        names = resolve_names(os.environ.get("XPOPTIM_BACKENDS"))
    found, missing = [], {}
    for name in names:
        try:
            found.append(_FACTORIES[name]())
        except ImportError as exc:
            missing[name] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # a framework that imports but cannot reach its device
            missing[name] = str(exc) or type(exc).__name__
    return found, missing


def discover_required(spec: str) -> tuple[list[Backend], dict[str, str]]:
    """Backends the user named explicitly (``"numpy,torch"``): every name must give at least one usable backend.

    An alias names a framework (``torch``: ``torch-cpu`` and ``torch-cuda``) and is satisfied by any of its
    backends (the others are reported as unavailable); a plain backend name (``torch-cuda``) must be usable itself.
    A run that silently skipped a named backend would report agreement it never checked.

    Args:
        spec: the comma-separated selection.

    Returns:
        ``(backends, unavailable)`` as :func:`discover`.

    Raises:
        ValueError: an unknown name, or a named backend that is not usable here, with the reason.
    """
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise ValueError(f"backends={spec!r} is invalid: expected at least one name from {list(BACKEND_NAMES)}")
    found, missing = discover(resolve_names(spec))
    usable = {b.name for b in found}
    for token in tokens:
        names = resolve_names(token) if token != "all" else []
        if names and not usable.intersection(names):
            why = "; ".join(f"{n}: {missing.get(n, 'not usable')}" for n in names)
            raise ValueError(
                f"backends={spec!r}: {token!r} was named but cannot run here ({why}); install it, or leave it out of "
                f"the selection (usable here: {sorted(usable) or 'none'})"
            )
    return found, missing


def to_numpy(x: Any) -> np.ndarray:
    """A float64 NumPy copy of an array of any backend (moved to the host)."""
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=np.float64)
    mod = type(x).__module__
    if mod.startswith("torch"):
        return np.array(x.detach().cpu().double().numpy(), dtype=np.float64)  # a copy, never a view
    if mod.startswith("cupy"):
        return x.get().astype(np.float64)
    try:
        return np.array(np.from_dlpack(x), dtype=np.float64)
    except Exception:
        return np.array(x, dtype=np.float64)


@contextlib.contextmanager
def pinned_numerics() -> Iterator[None]:
    """Pin matmul precision for the frameworks already imported (by :func:`discover`), restoring the settings afterwards.

    JAX: ``jax_enable_x64=True`` (float64 needs it) and ``jax_default_matmul_precision="float32"``.
    torch: ``set_float32_matmul_precision("highest")`` and TF32 off for CUDA matmuls and cuDNN.
    """
    restore: list[Callable[[], None]] = []
    try:
        if "jax" in sys.modules:
            jax = importlib.import_module("jax")
            old_x64 = jax.config.jax_enable_x64
            old_prec = jax.config.jax_default_matmul_precision
            jax.config.update("jax_enable_x64", True)
            jax.config.update("jax_default_matmul_precision", "float32")

            def _restore_jax() -> None:
                jax.config.update("jax_enable_x64", old_x64)
                jax.config.update("jax_default_matmul_precision", old_prec)

            restore.append(_restore_jax)
        if "torch" in sys.modules:
            torch = importlib.import_module("torch")
            old = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

            def _restore_torch() -> None:
                torch.set_float32_matmul_precision(old[0])
                torch.backends.cuda.matmul.allow_tf32 = old[1]
                torch.backends.cudnn.allow_tf32 = old[2]

            restore.append(_restore_torch)
        yield
    finally:
        for fn in reversed(restore):
            fn()
