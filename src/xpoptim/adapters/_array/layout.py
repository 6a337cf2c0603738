"""Layout objects of the array adapter: parameter entries, flat buckets and their segments, matrix stacks."""

from __future__ import annotations

from typing import Any

from xpoptim.core import ElementwiseSpec, MatrixSpec

from .namespace import _size


class _Entry:
    __slots__ = ("key", "array", "shape", "size", "group", "offset", "index", "mshape")

    def __init__(self, key: Any, array: Any, group: int) -> None:
        self.key = key
        self.array = array
        self.shape = tuple(array.shape)
        self.size = _size(self.shape)
        self.group = group
        self.offset = 0
        self.index = 0
        self.mshape: tuple | None = None


class _Segment:
    """A run of bucket elements: one array updated through a flat view, or a pack of arrays."""

    __slots__ = ("entries", "offset", "size", "view", "buffers", "pointers", "sizes")

    def __init__(self, entries: list, offset: int, size: int, view: Any = None) -> None:
        self.entries = entries
        self.offset = offset
        self.size = size
        self.view = view  # flat view of the single parameter (direct segments)
        self.buffers: dict | None = None  # reusable pack buffers (NumPy)
        self.pointers: Any = None  # NumPy, compiled: the parameters' addresses (False: a pack it cannot take)
        self.sizes: Any = None


class _Bucket:
    """Elementwise parameters of one group, one rule and one dtype: flat state, segments."""

    def __init__(self, spec: ElementwiseSpec, group: int, role: str, dtype: Any, state_dtype: Any, entries: list) -> None:
        self.spec = spec
        self.group = group
        self.role = role  # "main" or "fallback"
        self.dtype = dtype
        self.state_dtype = state_dtype
        self.entries = entries
        self.size = 0
        for e in entries:
            e.offset = self.size
            self.size += e.size
        self.state: dict[str, Any] = {}
        self.segments: list[_Segment] = []
        self.kernels: dict = {}
        self.fused: bool | None = None  # CuPy only: True when the step runs as one cupy.fuse kernel
        self.fuse_note = ""


class _MatrixStack:
    """Same-shape matrix parameters of one group and dtype, stepped together (one NS call)."""

    def __init__(self, spec: MatrixSpec, group: int, mshape: tuple, dtype: Any, state_dtype: Any, entries: list) -> None:
        self.spec = spec
        self.group = group
        self.mshape = mshape
        self.dtype = dtype
        self.state_dtype = state_dtype
        self.entries = entries
        for i, e in enumerate(entries):
            e.index = i
        self.state: dict[str, Any] = {}

