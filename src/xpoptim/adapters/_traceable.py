"""An array-API namespace that graph compilers can trace: what ``torch.compile(fullgraph=True)`` and ``cupy.fuse`` see.

array-api-compat makes ``sign`` propagate NaN with an indexed write (``out[isnan(x)] = nan``: torch's and CuPy's own
``sign`` give 0 for NaN). A data-dependent write cannot be held in a full graph (``torch.compile``) nor traced by
``cupy.fuse``; ``where(isnan(x), x, sign(x))`` gives the same result (``sign(0) = 0``, ``sign(nan) = nan``) as one
traceable expression.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TraceableNamespace"]


class TraceableNamespace:
    """``xp`` (array-api-compat's namespace of a framework) with ``sign`` written on the framework's own module.

    Args:
        xp: the array-api-compat namespace (every other function comes from it).
        raw: the framework module whose ``where``, ``isnan`` and ``sign`` build the traceable ``sign`` (``torch``,
            ``cupy``).
    """

    def __init__(self, xp: Any, raw: Any) -> None:
        self._xp = xp
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)

    def sign(self, x: Any) -> Any:
        raw = self._raw
        return raw.where(raw.isnan(x), x, raw.sign(x))
