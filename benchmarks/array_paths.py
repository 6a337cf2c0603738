"""Subjects over plain arrays: our NumPy / CuPy adapter, the NumPy copy, and core Newton-Schulz on NumPy/CuPy."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .harness import Skip, Subject

__all__ = ["namespace", "ours", "numpy_copy", "newton_schulz_ours", "ours_matrix"]


def namespace(device: str) -> tuple[Any, str, str]:
    """``(array module, framework name, timer)`` for the array adapter on ``device``."""
    if device == "cpu":
        return np, "numpy", "wall"
    try:
        cupy = importlib.import_module("cupy")
        if not cupy.cuda.is_available():
            raise Skip("CuPy is installed but sees no CUDA device")
    except ImportError as exc:
        raise Skip(f"CuPy is not installed ({exc})") from None
    return cupy, "cupy", "cupy_cuda"


def _adapter(framework: str) -> Any:
    errors = []
    for name in (f"xpoptim.adapters.{framework}", "xpoptim.adapters.array"):
        try:
            mod = importlib.import_module(name)
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if hasattr(mod, "create"):
            return mod
        errors.append(f"{name} has no create()")
    raise Skip("no array adapter: " + "; ".join(errors))


def _copies(xp: Any, arrays: Sequence[np.ndarray]) -> list:
    return [xp.asarray(np.array(a, copy=True)) for a in arrays]


def _sync(xp: Any):
    if xp is np:
        return lambda: None
    return xp.cuda.get_current_stream().synchronize


def ours_paths(device: str) -> list[tuple[str, dict]]:
    """The array adapter's paths: NumPy compiled (one C loop, the default) and op by op (chunked, threaded) on CPU;
    CuPy fused and op by op on CUDA."""
    if device == "cpu":
        return [("numpy compiled", {}), ("numpy op-by-op", {"fuse": False})]
    return [("cupy fused", {}), ("cupy op-by-op", {"fuse": False})]


def ours(rule: str, arrays, grads, device: str, n_params: int, bpp: float, hp: dict | None = None, options: dict | None = None, path: str | None = None) -> Subject:
    """``xpoptim.adapters.<numpy|cupy|array>.create(rule, params, **options)`` then ``opt.step(grads)``."""
    xp, framework, timer = namespace(device)
    mod = _adapter(framework)
    params, gs = _copies(xp, arrays), _copies(xp, grads)
    box: dict = {}

    def setup():
        try:
            box["opt"] = mod.create(rule, params, lr=1e-3, **(hp or {}), **(options or {}))
        except TypeError as exc:
            raise Skip(f"{mod.__name__}.create({rule!r}) rejected {options}: {exc}") from None

    path = path or framework
    info = {"module": mod.__name__, "options": {k: repr(v) for k, v in (options or {}).items()}}
    def report() -> dict:
        opt = box.get("opt")
        fused = getattr(opt, "fused", None)
        return {} if fused is None else {"fused": fused}

    return Subject(f"xpoptim array {path}", "ours", framework, path, rule, lambda: box["opt"].step(gs), _sync(xp), timer, bpp, n_params, info, setup=setup, report=report)


def numpy_copy(n_params: int, bytes_per_param: float = 28.0) -> Subject:
    """``np.copyto`` of the same bytes (NumPy copies on one thread)."""
    numel = max(1, int(round(n_params * bytes_per_param / 8)))
    src = np.random.default_rng(1).standard_normal(numel, dtype=np.float32)
    dst = np.empty_like(src)
    return Subject("copy floor, NumPy copyto (1 thread)", "floor", "numpy", "copy", "copy", lambda: np.copyto(dst, src), n_params=n_params, bytes_per_param=bytes_per_param, info={"copied_bytes": numel * 4})


def _matrices(shape, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    g = (rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(np.float32)
    return p, g


def newton_schulz_ours(shape, device: str, dtype: str) -> Subject:
    """``core.directions.newton_schulz`` on NumPy (float32) or CuPy (float32 / float16) arrays."""
    xp, framework, timer = namespace(device)
    if dtype == "bfloat16":
        raise Skip(f"{framework} has no bfloat16")
    compat = importlib.import_module(f"array_api_compat.{framework}")
    from xpoptim.core.directions import newton_schulz

    _, g = _matrices(shape)
    g = xp.asarray(g)
    ns_dtype = None if dtype == "float32" else getattr(xp, dtype)
    return Subject(
        f"xpoptim core newton_schulz ({framework}, {dtype})", "ours", framework, "eager", "newton_schulz",
        lambda: newton_schulz(compat, g, compute_dtype=ns_dtype), _sync(xp), timer, n_params=int(g.size),
    )


def ours_matrix(rule: str, shape, device: str, dtype: str) -> Subject:
    """Our Muon / DeVA_Sinf through the array adapter (params float32; NumPy has no bfloat16)."""
    xp, framework, timer = namespace(device)
    if dtype == "bfloat16":
        raise Skip(f"{framework} has no bfloat16")
    mod = _adapter(framework)
    p, g = _matrices(shape)
    ps, gs = ([p], [g]) if len(shape) == 2 else (list(p.reshape(-1, *shape[-2:])), list(g.reshape(-1, *shape[-2:])))
    params, grads = _copies(xp, ps), _copies(xp, gs)
    box: dict = {}

    def setup():
        box["opt"] = mod.create(rule, params)

    return Subject(f"xpoptim {framework} (NS {dtype})", "ours", framework, framework, rule, lambda: box["opt"].step(grads), _sync(xp), timer, 0, int(np.prod(shape)), {"ns_dtype": dtype}, setup=setup)
