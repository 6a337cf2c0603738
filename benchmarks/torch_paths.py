"""Subjects on PyTorch: torch.optim peers, the copy floor, and our torch adapter's paths."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .harness import Skip, Subject

__all__ = [
    "torch_device",
    "peer_adamw",
    "peer_heavyball",
    "fresh_grads",
    "copy_floor",
    "inplace_floor",
    "ours",
    "ours_paths",
    "peer_muon",
    "newton_schulz_peer",
]


def _torch():
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise Skip(f"torch is not installed ({exc})") from None


def torch_device(device: str) -> Any:
    torch = _torch()
    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("torch has no CUDA device")
    return torch.device(device)


def _timing(device: str) -> dict:
    torch = _torch()
    if device == "cuda":
        return {"timer": "torch_cuda", "sync": torch.cuda.synchronize}
    return {"timer": "wall", "sync": lambda: None}


def to_params(arrays: Sequence[np.ndarray], grads: Sequence[np.ndarray], device: str, dtype: Any = None) -> list:
    """``torch.nn.Parameter`` copies of ``arrays`` with ``.grad`` set to copies of ``grads``."""
    torch = _torch()
    dev = torch_device(device)
    params = []
    for a, g in zip(arrays, grads):
        p = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a)).to(dev, copy=True))
        gt = torch.from_numpy(np.ascontiguousarray(g)).to(dev, copy=True)
        if dtype is not None:
            p.data = p.data.to(dtype)
            gt = gt.to(dtype)
        p.grad = gt
        params.append(p)
    return params


def fresh_grads(params: list) -> Any:
    """``prepare`` for a subject: before every step, hand each parameter a gradient tensor other than the one of
    the step before (two sets, alternating), as backward does after ``zero_grad(set_to_none=True)`` (torch's
    default loop), without timing an allocation."""
    sets = [[p.grad for p in params], [p.grad.clone() for p in params]]
    box = {"k": 0}

    def prepare() -> None:
        box["k"] ^= 1
        for p, g in zip(params, sets[box["k"]]):
            p.grad = g

    return prepare


def peer_adamw(arrays, grads, device: str, impl: str, n_params: int) -> Subject:
    """``torch.optim.AdamW(lr=1e-3, weight_decay=0.01)`` with ``impl`` in forloop / foreach / fused."""
    torch = _torch()
    params = to_params(arrays, grads, device)
    kw = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    box: dict = {}

    def setup():
        try:
            box["opt"] = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kw)
        except (RuntimeError, ValueError) as exc:
            raise Skip(f"torch.optim.AdamW({impl}) unavailable: {exc}") from None

    return Subject(
        label=f"torch.optim.AdamW {impl}",
        kind="peer",
        framework="torch",
        path=impl,
        rule="adamw",
        step=lambda: box["opt"].step(),
        setup=setup,
        n_params=n_params,
        bytes_per_param=28,
        info={"torch": torch.__version__},
        prepare=fresh_grads(params),
        **_timing(device),
    )


def peer_heavyball(arrays, grads, device: str, n_params: int) -> Subject:
    """HeavyBall's ``AdamW`` (a compile-first torch optimizer library: its step runs under ``torch.compile``), with
    torch's AdamW hyperparameters (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01). Its first step
    (``first_s`` in the results) includes Inductor's compile."""
    torch = _torch()
    try:
        heavyball = importlib.import_module("heavyball")
    except ImportError as exc:
        raise Skip(
            f"heavyball is not installed ({exc}); `pip install -e '.[bench]'` (or `pip install heavyball`) installs it next to a CPU torch "
            "(it requires torch>=2.2, opt-einsum and numpy>=2.3.4, and no CUDA build)"
        ) from None
    params = to_params(arrays, grads, device)
    box: dict = {}

    def setup():
        box["opt"] = heavyball.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    return Subject(
        label="heavyball.AdamW",
        kind="peer",
        framework="torch",
        path="heavyball",
        rule="adamw",
        step=lambda: box["opt"].step(),
        setup=setup,
        n_params=n_params,
        bytes_per_param=28,
        info={"heavyball": getattr(heavyball, "__version__", "unknown"), "torch": torch.__version__},
        prepare=fresh_grads(params),
        **_timing(device),
    )


def copy_floor(n_params: int, device: str, bytes_per_param: float = 28.0) -> Subject:
    """``dst.copy_(src)`` moving exactly ``bytes_per_param * n_params`` bytes (read + write) in float32."""
    torch = _torch()
    dev = torch_device(device)
    numel = max(1, int(round(n_params * bytes_per_param / 8)))
    src = torch.randn(numel, device=dev)
    dst = torch.empty_like(src)
    return Subject(
        label="copy floor (torch copy_)",
        kind="floor",
        framework="torch",
        path="copy",
        rule="copy",
        step=lambda: dst.copy_(src),
        n_params=n_params,
        bytes_per_param=bytes_per_param,
        info={"copied_bytes": numel * 4},
        **_timing(device),
    )


def inplace_floor(n_params: int, device: str, bytes_per_param: float = 28.0) -> Subject:
    """``buf.mul_(-1)`` in place over a float32 buffer, moving ``bytes_per_param * n_params`` bytes (read + write).

    An optimizer step writes its buffers in place, so on CPU it never pays the read-for-ownership of a copy's
    fresh destination; this in-place pass is the floor's other half (the tables use the faster of the two).
    """
    torch = _torch()
    dev = torch_device(device)
    numel = max(1, int(round(n_params * bytes_per_param / 8)))
    buf = torch.randn(numel, device=dev)
    return Subject(
        label="in-place floor (torch mul_)",
        kind="floor",
        framework="torch",
        path="inplace",
        rule="copy",
        step=lambda: buf.mul_(-1.0),
        n_params=n_params,
        bytes_per_param=bytes_per_param,
        info={"buffer_bytes": numel * 4},
        **_timing(device),
    )


# ----------------------------------------------------------------------------------------------
# Our torch adapter
# ----------------------------------------------------------------------------------------------


def _adapter():
    try:
        return importlib.import_module("xpoptim.adapters.torch")
    except Exception as exc:  # ImportError, or an adapter that fails to import
        raise Skip(f"xpoptim.adapters.torch is not available ({type(exc).__name__}: {exc})") from None


def ours_paths() -> list[tuple[str, dict]]:
    """The torch adapter's elementwise paths as ``(path name, options)``; empty without the adapter.

    Every path gets fresh gradient tensors before each step (the default loop: ``zero_grad()`` sets them to
    ``None`` and backward makes new ones); parameters and state are the user's own tensors in every path.

    * ``default``: ``compile=False``, what a user gets: on CPU the core kernel compiled into one C loop over the
      tensors' addresses (float32/float64, contiguous), on CUDA the ``torch._foreach_*`` multi-tensor path;
    * ``op by op``: the same with the compiled C loop switched off (``_torch_ckernel.ENABLED = False``): what a
      machine without a C compiler runs (the ``_foreach`` path; same numbers);
    * ``torch.compile``: ``compile=True`` (opt-in), ``torch.compile`` of the in-place step, per tensor.
    """
    try:
        _adapter()
    except Skip:
        return []
    return [("default", {}), ("op by op", {"_c_loop": False}), ("torch.compile", {"compile": True})]


def ours(rule: str, arrays, grads, device: str, path: str, options: dict, n_params: int, bpp: float, hp: dict | None = None) -> Subject:
    """A step of ``rule`` through ``xpoptim.adapters.torch.create`` with the path's options."""
    mod = _adapter()
    options = dict(options)
    c_loop = options.pop("_c_loop", True)
    params = to_params(arrays, grads, device)
    box: dict = {}

    def setup():
        try:
            box["opt"] = mod.create(rule, params, lr=1e-3, **(hp or {}), **options)
        except TypeError as exc:
            raise Skip(f"xpoptim.adapters.torch.create({rule!r}, {options}) rejected the options: {exc}") from None

    if c_loop:
        step = lambda: box["opt"].step()  # noqa: E731
    else:
        ck = importlib.import_module("xpoptim.adapters._torch_ckernel")

        def step():
            ck.ENABLED = False
            try:
                box["opt"].step()
            finally:
                ck.ENABLED = True

    return Subject(
        label=f"xpoptim torch {path}",
        kind="ours",
        framework="torch",
        path=path,
        rule=rule,
        step=step,
        setup=setup,
        n_params=n_params,
        bytes_per_param=bpp,
        info={"options": {k: repr(v) for k, v in options.items()}, "c_loop": c_loop, "fresh_grads_each_step": True},
        prepare=fresh_grads(params),
        **_timing(device),
    )


# ----------------------------------------------------------------------------------------------
# Matrix rules
# ----------------------------------------------------------------------------------------------


def matrices(shape: tuple[int, ...], device: str, seed: int = 0) -> tuple[Any, Any]:
    """Float32 (stack of) matrices and gradients on ``device``."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen) * 0.02
    g = torch.randn(shape, generator=gen) * 0.01
    dev = torch_device(device)
    return p.to(dev), g.to(dev)


def _dtype(name: str) -> Any:
    torch = _torch()
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def newton_schulz_ours(shape, device: str, dtype: str) -> Subject:
    """``core.directions.newton_schulz`` on torch tensors (5 quintic steps, computed in ``dtype``)."""
    torch = _torch()
    from xpoptim.core.directions import newton_schulz

    _, g = matrices(shape, device)
    ns_dtype = None if dtype == "float32" else _dtype(dtype)
    xp = importlib.import_module("array_api_compat.torch")

    def step():
        with torch.no_grad():
            return newton_schulz(xp, g, compute_dtype=ns_dtype)

    return Subject(f"xpoptim core newton_schulz (torch, {dtype})", "ours", "torch", "eager", "newton_schulz", step, n_params=g.numel(), **_timing(device))


def newton_schulz_peer(shape, device: str) -> Subject:
    """``torch.optim._muon._zeropower_via_newtonschulz`` (always bfloat16, one matrix at a time)."""
    torch = _torch()
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as ns
    except ImportError as exc:
        raise Skip(f"torch.optim._muon is not in this torch ({exc})") from None
    _, g = matrices(shape, device)
    coeffs = (3.4445, -4.7750, 2.0315)
    mats = [g] if g.ndim == 2 else list(g.reshape(-1, *g.shape[-2:]).unbind(0))

    def step():
        with torch.no_grad():
            return [ns(m, coeffs, 5, 1e-7) for m in mats]

    return Subject("torch.optim.Muon's Newton-Schulz (bf16)", "peer", "torch", "bf16", "newton_schulz", step, n_params=g.numel(), **_timing(device))


def peer_muon(shape, device: str) -> Subject:
    """``torch.optim.Muon`` (lr 1e-3, wd 0.1, momentum 0.95, Nesterov; NS in bf16) on one or several matrices."""
    torch = _torch()
    if not hasattr(torch.optim, "Muon"):
        raise Skip("torch.optim.Muon is not in this torch")
    p, g = matrices(shape, device)
    ps, gs = ([p], [g]) if p.ndim == 2 else (list(p.reshape(-1, *p.shape[-2:]).unbind(0)), list(g.reshape(-1, *g.shape[-2:]).unbind(0)))
    params = []
    for a, b in zip(ps, gs):
        q = torch.nn.Parameter(a.clone())
        q.grad = b.clone()
        params.append(q)
    box: dict = {}

    def setup():
        box["opt"] = torch.optim.Muon(params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True)

    return Subject("torch.optim.Muon (NS in bf16)", "peer", "torch", "bf16", "muon", lambda: box["opt"].step(), setup=setup, n_params=p.numel(), **_timing(device))


def ours_matrix(rule: str, shape, device: str, dtype: str, path: str, options: dict) -> Subject:
    """Our Muon / DeVA_Sinf through the torch adapter, Newton-Schulz in ``dtype``, params float32.

    A stack ``(k, n, m)`` is passed as ``k`` separate parameters of shape ``(n, m)`` (what a model has); the
    adapter may batch them.
    """
    torch = _torch()
    mod = _adapter()
    p, g = matrices(shape, device)
    ps, gs = ([p], [g]) if p.ndim == 2 else (list(p.reshape(-1, *p.shape[-2:]).unbind(0)), list(g.reshape(-1, *g.shape[-2:]).unbind(0)))
    params = []
    for a, b in zip(ps, gs):
        q = torch.nn.Parameter(a.clone())
        q.grad = b.clone()
        params.append(q)
    hp: dict = {}
    if dtype != "float32":
        hp["ns_dtype"] = _dtype(dtype)
    box: dict = {}

    def setup():
        try:
            box["opt"] = mod.create(rule, params, **hp, **options)
        except TypeError as exc:
            raise Skip(f"xpoptim.adapters.torch.create({rule!r}) rejected {hp | options}: {exc}") from None

    return Subject(f"xpoptim torch {path} (NS {dtype})", "ours", "torch", path, rule, lambda: box["opt"].step(), setup=setup, n_params=p.numel(), info={"ns_dtype": dtype}, **_timing(device))
