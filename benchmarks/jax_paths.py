"""Subjects on JAX: optax peers under jit (donated buffers) and our optax adapter's paths."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .harness import Skip, Subject

__all__ = ["peer_adamw", "ours", "ours_paths", "jit_step", "peer_muon", "newton_schulz_ours", "newton_schulz_peer"]


def _jax():
    try:
        jax = importlib.import_module("jax")
        optax = importlib.import_module("optax")
    except ImportError as exc:
        raise Skip(f"jax/optax is not installed ({exc})") from None
    return jax, optax


def check_device(device: str) -> None:
    jax, _ = _jax()
    backend = jax.default_backend()
    want = "gpu" if device == "cuda" else "cpu"
    if backend != want:
        raise Skip(f"JAX runs on {backend!r}, not {want!r} (install jax[cuda12] for GPU runs)")


def to_leaves(arrays: Sequence[np.ndarray], dtype: Any = None) -> list:
    jax, _ = _jax()
    out = [jax.device_put(np.array(a, copy=True)) for a in arrays]
    if dtype is not None:
        out = [x.astype(dtype) for x in out]
    return out


def jit_step(tx: Any) -> Callable:
    """``jax.jit`` of one optax step (update + apply_updates) with params and state donated."""
    jax, optax = _jax()

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def _subject(label: str, kind: str, path: str, rule: str, tx: Any, params: Any, grads: Any, n_params: int, bpp: float, info: dict | None = None) -> Subject:
    jax, _ = _jax()
    box: list = [params, None, None]

    def setup():
        box[1] = tx.init(box[0])
        box[2] = jit_step(tx)

    def step():
        box[0], box[1] = box[2](box[0], box[1], grads)

    def sync():
        jax.block_until_ready(box[:2])

    return Subject(label, kind, "jax", path, rule, step, sync, "wall", bpp, n_params, info or {}, setup=setup)


def peer_adamw(arrays, grads, device: str, n_params: int) -> Subject:
    """``optax.adamw(1e-3, weight_decay=0.01)`` under ``jax.jit`` with donated params and state."""
    check_device(device)
    _, optax = _jax()
    tx = optax.adamw(1e-3, weight_decay=0.01)
    return _subject("optax.adamw jit", "peer", "jit", "adamw", tx, to_leaves(arrays), to_leaves(grads), n_params, 28)


# ----------------------------------------------------------------------------------------------
# Our optax adapter
# ----------------------------------------------------------------------------------------------


def _adapter():
    try:
        return importlib.import_module("xpoptim.adapters.optax")
    except Exception as exc:
        raise Skip(f"xpoptim.adapters.optax is not available ({type(exc).__name__}: {exc})") from None


def ours_paths() -> list[tuple[str, dict]]:
    """The optax adapter's elementwise paths as ``(path name, options)``; empty without the adapter.

    * ``per-leaf``: ``create(rule)`` on the pytree of leaves (one fused kernel per leaf under jit);
    * ``flatten_by_dtype``: ``flatten_by_dtype(create(rule))``: the pytree is concatenated per dtype and split
      again inside the jitted step (state flat);
    * ``flat (ravel_by_dtype)``: the parameters and gradients are kept flat by the user
      (``ravel_by_dtype``: one 1-D array per dtype), so the step sees one leaf per dtype.
    """
    try:
        _adapter()
    except Skip:
        return []
    return [("per-leaf", {}), ("flatten_by_dtype", {"_wrap": "flatten_by_dtype"}), ("flat (ravel_by_dtype)", {"_ravel": True})]


def ours(rule: str, arrays, grads, device: str, path: str, options: dict, n_params: int, bpp: float, hp: dict | None = None) -> Subject:
    """A jitted step of ``rule`` through ``xpoptim.adapters.optax.create`` on the path ``path``."""
    check_device(device)
    mod = _adapter()
    options = dict(options)
    wrap = options.pop("_wrap", None)
    ravel = options.pop("_ravel", False)
    try:
        tx = mod.create(rule, learning_rate=1e-3, **(hp or {}), **options)
    except TypeError as exc:
        raise Skip(f"xpoptim.adapters.optax.create({rule!r}, {options}) rejected the options: {exc}") from None
    if wrap is not None:
        if not hasattr(mod, wrap):
            raise Skip(f"xpoptim.adapters.optax has no {wrap}")
        tx = getattr(mod, wrap)(tx)
    params, gs = to_leaves(arrays), to_leaves(grads)
    if ravel:
        if not hasattr(mod, "ravel_by_dtype"):
            raise Skip("xpoptim.adapters.optax has no ravel_by_dtype")
        params = mod.ravel_by_dtype(params)[0]
        gs = mod.ravel_by_dtype(gs)[0]
    info = {"options": {k: repr(v) for k, v in options.items()}, "wrap": wrap, "ravel_by_dtype": ravel}
    return _subject(f"xpoptim optax {path}", "ours", path, rule, tx, params, gs, n_params, bpp, info)


# ----------------------------------------------------------------------------------------------
# Matrix rules
# ----------------------------------------------------------------------------------------------


def _matrices(shape, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    g = (rng.standard_normal(shape, dtype=np.float32) * 0.01).astype(np.float32)
    return p, g


def _dtype(name: str) -> Any:
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def newton_schulz_ours(shape, device: str, dtype: str) -> Subject:
    """``core.directions.newton_schulz`` under ``jax.jit`` (5 quintic steps in ``dtype``)."""
    check_device(device)
    jax, _ = _jax()
    import jax.numpy as jnp

    from xpoptim.core.directions import newton_schulz

    _, g = _matrices(shape)
    g = jnp.asarray(g)
    ns_dtype = None if dtype == "float32" else _dtype(dtype)
    fn = jax.jit(lambda x: newton_schulz(jnp, x, compute_dtype=ns_dtype))
    box = [None]

    def step():
        box[0] = fn(g)

    return Subject(f"xpoptim core newton_schulz (jax jit, {dtype})", "ours", "jax", "jit", "newton_schulz", step, lambda: jax.block_until_ready(box[0]), n_params=g.size)


def newton_schulz_peer(shape, device: str, dtype: str) -> Subject:
    """``optax.contrib.orthogonalize_via_newton_schulz`` under jit (vmapped over a stack)."""
    check_device(device)
    jax, _ = _jax()
    import jax.numpy as jnp

    try:
        from optax.contrib import _muon as om
    except ImportError as exc:
        raise Skip(f"optax.contrib muon is not available ({exc})") from None
    _, g = _matrices(shape)
    g = jnp.asarray(g).astype(_dtype(dtype))
    coeffs = jnp.asarray((3.4445, -4.7750, 2.0315))
    one = lambda x: om.orthogonalize_via_newton_schulz(x, coeffs, 5)  # noqa: E731
    fn = jax.jit(jax.vmap(one) if g.ndim == 3 else one)
    box = [None]

    def step():
        box[0] = fn(g)

    return Subject(f"optax.contrib Newton-Schulz (jit, {dtype})", "peer", "jax", "jit", "newton_schulz", step, lambda: jax.block_until_ready(box[0]), n_params=g.size)


def _leaves(shape, dtype_name: str = "float32"):
    p, g = _matrices(shape)
    if len(shape) == 2:
        ps, gs = [p], [g]
    else:
        ps, gs = list(p.reshape(-1, *shape[-2:])), list(g.reshape(-1, *shape[-2:]))
    dt = _dtype(dtype_name)
    return to_leaves(ps, dt), to_leaves(gs, dt)


def peer_muon(shape, device: str, dtype: str) -> Subject:
    """``optax.contrib.muon(1e-3)`` under jit; params (and so Newton-Schulz) in ``dtype``."""
    check_device(device)
    _, optax = _jax()
    params, grads = _leaves(shape, dtype)
    tx = optax.contrib.muon(1e-3, weight_decay=0.1)
    n = int(np.prod(shape))
    return _subject(f"optax.contrib.muon jit ({dtype} params)", "peer", "jit", "muon", tx, params, grads, n, 0)


def ours_matrix(rule: str, shape, device: str, dtype: str, path: str, options: dict) -> Subject:
    """Our Muon / DeVA_Sinf through the optax adapter (params float32, Newton-Schulz in ``dtype``)."""
    check_device(device)
    mod = _adapter()
    params, grads = _leaves(shape)
    hp: dict = {}
    if dtype != "float32":
        hp["ns_dtype"] = _dtype(dtype)
    try:
        tx = mod.create(rule, learning_rate=1e-3, **hp, **options)
    except TypeError as exc:
        raise Skip(f"xpoptim.adapters.optax.create({rule!r}) rejected {hp | options}: {exc}") from None
    n = int(np.prod(shape))
    return _subject(f"xpoptim optax {path} (NS {dtype})", "ours", path, rule, tx, params, grads, n, 0, {"ns_dtype": dtype})
