"""CuPy: the core step kernel compiled with ``cupy.fuse``, writing parameters and state in place."""

from __future__ import annotations

import warnings
from typing import Any

from .._traceable import TraceableNamespace
from .layout import _Bucket


def _warn_unfused(b: _Bucket) -> None:
    b.fused = False
    warnings.warn(f"{b.spec.title}: the CuPy step runs op by op, not as one fused kernel ({b.fuse_note})", UserWarning, stacklevel=4)


def fusion_namespace(xp: Any) -> Any:
    """``xp`` with the functions that ``cupy.fuse`` cannot trace replaced by traceable equivalents (``sign``)."""
    import cupy  # noqa: PLC0415  (reached only with CuPy arrays in hand)

    return TraceableNamespace(xp, cupy)


def _make_fused_inplace(kernel: Any, n_extra: int, n_state: int) -> list:
    """``cupy.fuse`` of the core step kernel, writing ``p`` and the state in place (``x[...] = y``).

    Returns candidates to try in order: without an output (no extra traffic), then returning the
    new parameter (an extra write, for CuPy versions whose fusion needs an output).
    """
    import cupy  # noqa: PLC0415  (reached only with CuPy arrays in hand)

    def xpoptim_fused_step(p, g, *args):  # noqa: ANN001, ANN202  (traced by cupy.fuse)
        out = kernel(p, g, *args)
        p[...] = out[0]
        states = args[n_extra : n_extra + n_state]
        for s, v in zip(states, out[1:]):
            s[...] = v

    def xpoptim_fused_step_out(p, g, *args):  # noqa: ANN001, ANN202
        out = kernel(p, g, *args)
        p[...] = out[0]
        states = args[n_extra : n_extra + n_state]
        for s, v in zip(states, out[1:]):
            s[...] = v
        return out[0]

    return [cupy.fuse(xpoptim_fused_step), cupy.fuse(xpoptim_fused_step_out)]

