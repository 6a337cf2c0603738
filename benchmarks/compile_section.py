"""First-step cost (compilation) and peak memory per parameter, for every AdamW path, on each layout.

Each path is measured alone: its parameters and gradients are made first (outside the measured region), the
compiler caches are cleared (``torch._dynamo.reset()`` with inductor's FX-graph cache off, ``jax.clear_caches()``, a
fresh cache directory for the compiled NumPy step), then the optimizer is built and takes its first step and three
more, inside a :class:`MemoryProbe`. Both
compilers are warmed up once on an unrelated function first, so their one-off import cost is not charged to the
first path measured.
"""

from __future__ import annotations

import gc
import statistics
from typing import Any

from . import array_paths, jax_paths, torch_paths
from .elementwise import _try
from .harness import Config, MemoryProbe, Subject, construct, log
from .layouts import layouts_for, make_data

__all__ = ["run"]


def _clear_caches() -> None:
    try:
        import torch

        torch._dynamo.reset()
        try:
            import torch._inductor.config as ic

            ic.fx_graph_cache = False
        except Exception:
            pass
    except Exception:
        pass
    try:
        import jax

        jax.clear_caches()
    except Exception:
        pass
    # The compiled NumPy step: an empty on-disk cache and no loaded library, so its first step pays the C compiler.
    import os
    import tempfile

    from xpoptim.adapters import _cfuse

    os.environ["XPOPTIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="xpoptim-bench-cfuse-")
    _cfuse._LOADED.clear()
    try:  # the torch adapter's loaded kernels too (its CPU path compiles the same C loop)
        from xpoptim.adapters import _torch_ckernel

        _torch_ckernel._KERNELS.clear()
    except ImportError:
        pass


def _malloc_for_accounting() -> str:
    """Make glibc map every allocation of 64 KiB or more with ``mmap`` (and unmap it on free).

    By default glibc's mmap threshold adapts upwards (to 32 MiB) after large frees, so later medium-sized
    allocations are served from heap memory that is already resident and the peak-RSS probe sees nothing. A fixed
    threshold makes resident memory follow live allocations. Timing here is not affected beyond the first steps
    (this section runs last; ``mallopt`` applies to the rest of the process).
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, 64 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        return "glibc mmap threshold fixed at 64 KiB" if ok else ""
    except Exception:
        return ""


def _warm_compilers(device: str, torch_compile: bool) -> None:
    """Compile one tiny unrelated function in torch and JAX (imports, thread pools, C++ toolchain)."""
    try:
        import torch

        if torch_compile:
            f = torch.compile(lambda x: x * 2 + 1, dynamic=True)
            f(torch.ones(8, device=device))
    except Exception as exc:
        log(f"  torch.compile warm-up failed: {exc}")
    try:
        import jax
        import jax.numpy as jnp

        jax.block_until_ready(jax.jit(lambda x: x * 2 + 1)(jnp.ones(8)))
    except Exception as exc:
        log(f"  jax warm-up failed: {exc}")


def _paths(layout, data, cfg: Config, skipped: list) -> list:
    """Builders (not yet built) for each path, so only one path's buffers exist at a time."""
    arrays, grads = data
    n, dev, hp = layout.n_params, cfg.device, {"weight_decay": 0.01}
    out = []
    for impl in ("forloop", "foreach", "fused"):
        out.append((f"torch.optim.AdamW {impl}", lambda impl=impl: torch_paths.peer_adamw(arrays, grads, dev, impl, n)))
    if layout.count >= 1000 and not cfg.slow:
        skipped.append({"label": f"heavyball.AdamW on {layout.name}", "reason": "its first step from empty compiler caches (torch.compile of one step over thousands of tensors) takes about 9 minutes on a 2-core CPU (537 s over 2,000 tensors in torch_paths.md); --slow measures it"})
    else:
        out.append(("heavyball.AdamW", lambda: torch_paths.peer_heavyball(arrays, grads, dev, n)))
    out.append(("optax.adamw jit", lambda: jax_paths.peer_adamw(arrays, grads, dev, n)))
    for path, options in torch_paths.ours_paths():
        if not cfg.torch_compile and options.get("compile"):
            continue
        out.append((f"xpoptim torch {path}", lambda path=path, options=options: torch_paths.ours("adamw", arrays, grads, dev, path, options, n, 28, hp)))
    for path, options in jax_paths.ours_paths():
        if path == "flatten_by_dtype" and layout.count >= 1000 and not cfg.slow:
            skipped.append({"label": f"xpoptim optax {path} on {layout.name}", "reason": "its compile takes minutes with thousands of leaves (see the elementwise section's first-step column); --slow measures it"})
            continue
        out.append((f"xpoptim optax {path}", lambda path=path, options=options: jax_paths.ours("adamw", arrays, grads, dev, path, options, n, 28, hp)))
    for path, options in array_paths.ours_paths(dev):
        out.append((f"xpoptim array {path}", lambda path=path, options=options: array_paths.ours("adamw", arrays, grads, dev, n, 28, hp, options, path)))
    return out


def _one(subject: Subject, device: str) -> dict:
    probe_kind = subject.framework if device == "cuda" else "cpu"
    row: dict[str, Any] = {}
    with MemoryProbe(device, probe_kind) as probe:
        try:
            row["construct_ms"] = construct(subject) * 1e3
            row["first_step_ms"] = subject.time_once() * 1e3
            steady = [subject.time_once() for _ in range(3)]
            row["steady_ms"] = statistics.median(steady) * 1e3
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    row["peak_bytes"] = probe.peak_bytes
    row["bytes_per_param_peak"] = None if probe.peak_bytes is None or not subject.n_params else probe.peak_bytes / subject.n_params
    row["memory_method"] = probe.method
    return row


def run(cfg: Config) -> dict[str, Any]:
    """Run the compile / memory section; returns the JSON-able results."""
    malloc_note = _malloc_for_accounting() if cfg.device == "cpu" else ""
    _warm_compilers(cfg.device, cfg.torch_compile)
    rows: list[dict] = []
    skipped: list[dict] = []
    method = ""
    for layout in layouts_for(cfg.device, cfg.layouts, size_scale=cfg.size_scale, quick=cfg.quick):
        log(f"[compile] layout {layout.name} = {layout.shape_text}")
        data = make_data(layout)
        for label, build in _paths(layout, data, cfg, skipped):
            _clear_caches()
            gc.collect()
            subject = _try(build, skipped=skipped, label=f"{label} on {layout.name}")
            if subject is None:
                continue
            row = _one(subject, cfg.device)
            method = row.pop("memory_method") or method
            rows.append({"layout": layout.name, "shape": layout.shape_text, "label": subject.label, "kind": subject.kind, "framework": subject.framework, "path": subject.path, "n_params": subject.n_params, **row})
            bpp = row.get("bytes_per_param_peak")
            log(f"    {subject.label:<40} construct {row.get('construct_ms', float('nan')):8.1f} ms  first {row.get('first_step_ms', float('nan')):9.1f} ms  steady {row.get('steady_ms', float('nan')):8.2f} ms  peak {'-' if bpp is None else f'{bpp:.1f}'} B/param {row.get('error') or ''}")
            if subject.close is not None:
                subject.close()
            del subject
            gc.collect()
        del data
        gc.collect()
    if malloc_note:
        method = f"{method} ({malloc_note})"
    return {"rows": rows, "skipped": skipped, "memory_method": method}
