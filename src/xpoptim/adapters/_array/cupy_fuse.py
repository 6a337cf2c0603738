"""CuPy: the core step kernel compiled with ``cupy.fuse``, writing parameters and state in place."""

from __future__ import annotations

import warnings
from typing import Any

from .layout import _Bucket


def _warn_unfused(b: _Bucket) -> None:
    b.fused = False
    warnings.warn(f"{b.spec.title}: the CuPy step runs op by op, not as one fused kernel ({b.fuse_note})", UserWarning, stacklevel=4)


class _FusionNamespace:
    """The CuPy array namespace as seen inside ``cupy.fuse``: array-api-compat's CuPy namespace, except ``sign``.

    array-api-compat makes CuPy's ``sign`` propagate NaN with an indexed write (``out[isnan(x)] = nan``),
    which ``cupy.fuse`` cannot trace; here the same result (``sign(0) = 0``, ``sign(nan) = nan``) comes from
    ``where(isnan(x), x, sign(x))``, which it can.
    """

    def __init__(self, xp: Any) -> None:
        self._xp = xp

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    @staticmethod
    def sign(x: Any) -> Any:
        import cupy  # noqa: PLC0415  (reached only with CuPy arrays in hand)

        return cupy.where(cupy.isnan(x), x, cupy.sign(x))


def fusion_namespace(xp: Any) -> Any:
    """``xp`` with the functions that ``cupy.fuse`` cannot trace replaced by traceable equivalents."""
    return _FusionNamespace(xp)


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

