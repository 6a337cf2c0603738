"""The torch CPU path: the core step kernel as one compiled C loop over the tensors' own memory.

Private module of the torch adapter. The loop is :mod:`xpoptim.adapters._cfuse`'s (the core kernel traced on
symbolic arrays and printed as IEEE-exact C, the same library the NumPy adapter uses); this module hands it the
``data_ptr()`` of every parameter, gradient (where backward left it), extra input and state tensor, so nothing is
gathered, packed or re-pointed. Large steps are split into one contiguous range of elements per thread
(``torch.get_num_threads()``): on torch's own OpenMP threads (:mod:`._torch_omp`), else on a thread pool of this
module (``ctypes`` releases the GIL, so its threads run the loop in parallel). The step
counters (one float32 scalar tensor per parameter, as in torch.optim) are read and set through their addresses too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from xpoptim.core import HOST, make_step_kernel, step_scalars
from xpoptim.core.spec import ElementwiseSpec

from . import _cfuse
from . import _torch_omp as _omp

__all__ = ["c_kernel", "run_spans", "SpanAddresses", "span_addresses", "written_overlap", "pointers", "MIN_ELEMENTS_PER_THREAD", "ENABLED"]

#: Use the compiled loop when a C compiler works (``False``: every CPU step runs op by op in torch).
ENABLED = True

#: A step is split over threads only when every thread gets at least this many elements (the hand-off costs
#: tens of microseconds; below this one thread is faster).
MIN_ELEMENTS_PER_THREAD = 1 << 16

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_KERNELS: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_POOL: list = []
_data_ptr = torch.Tensor.data_ptr


def _static_key(static: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in static.items()))


def c_kernel(spec: ElementwiseSpec, hp: dict, static: dict, maximize: bool, dtype: torch.dtype) -> _cfuse.CKernel | None:
    """The compiled loop of ``spec`` for ``dtype`` arrays, or ``None`` (no compiler, a rule with no exact C form, a
    dtype other than float32/float64, or ``ENABLED`` off): the caller then runs the rule op by op.

    Built once per (rule, static switches, maximize, dtype) and cached on disk by :mod:`._cfuse`.
    """
    if not ENABLED or dtype not in _NP_DTYPES or not spec.is_fusable(hp):
        return None
    key = (spec.name, _static_key(static), bool(maximize), dtype)
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            n_extra, n_state = len(spec.extras), len(spec.state)
            n_arrays = 2 + n_extra + n_state
            try:
                k = _cfuse.compile_kernel(
                    lambda xp: make_step_kernel(spec, xp, static, maximize=maximize),
                    _NP_DTYPES[dtype],
                    n_arrays,
                    len(step_scalars(spec, hp, 1, HOST)),
                    [0, *range(2 + n_extra, n_arrays)],
                )
            except _cfuse.TraceError as exc:
                k = f"not compiled: {exc}"
            _KERNELS[key] = k
    return k if isinstance(k, _cfuse.CKernel) else None


def kernel_note(spec: ElementwiseSpec, static: dict, maximize: bool, dtype: torch.dtype) -> str | None:
    """Why the compiled loop is not used for this rule (``None`` when it is, or was never asked for)."""
    k = _KERNELS.get((spec.name, _static_key(static), bool(maximize), dtype))
    return k if isinstance(k, str) else None


def pointers(columns: Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
    """``(m, len(columns))`` uintp addresses: row ``j`` holds ``columns[k][j].data_ptr()`` for every ``k``."""
    m = len(columns[0])
    out = np.empty((m, len(columns)), dtype=np.uintp)
    for k, col in enumerate(columns):
        out[:, k] = np.fromiter(map(_data_ptr, col), dtype=np.uintp, count=m)
    return out


def _forget_pool() -> None:
    _POOL.clear()  # a forked child has none of the parent's threads: it starts its own pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool(n: int) -> ThreadPoolExecutor:
    with _LOCK:
        if not _POOL or _POOL[0]._max_workers < n:
            _POOL[:] = [ThreadPoolExecutor(max_workers=n, thread_name_prefix="xpoptim-cpu")]
        return _POOL[0]


def _split(sizes: np.ndarray, ptrs: np.ndarray, itemsize: int, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut the spans into ``parts`` runs of (almost) equal element counts; a span on a cut is split in two."""
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    jobs = []
    for i in range(parts):
        lo, hi = total * i // parts, total * (i + 1) // parts
        if hi <= lo:
            continue
        j0 = int(np.searchsorted(ends, lo, side="right"))
        j1 = int(np.searchsorted(ends, hi, side="left"))
        s = sizes[j0 : j1 + 1].copy()
        p = ptrs[j0 : j1 + 1].copy()
        skip = lo - int(ends[j0] - sizes[j0])
        s[0] -= skip
        p[0] += np.uintp(skip * itemsize)
        s[-1] -= int(ends[j1]) - hi
        jobs.append((s, p))
    return jobs


class SpanAddresses(NamedTuple):
    """The addresses of a ``sizes`` and a ``ptrs`` array of :func:`run_spans` (``.ctypes.data``), read once by a
    caller that keeps both arrays (reading them costs about a microsecond each, at every step otherwise)."""

    sizes: int
    ptrs: int


def span_addresses(sizes: np.ndarray, ptrs: np.ndarray) -> SpanAddresses:
    """The :class:`SpanAddresses` of ``sizes`` and ``ptrs``, valid while both arrays live unchanged in shape."""
    return SpanAddresses(sizes.ctypes.data, ptrs.ctypes.data)


def written_overlap(ptrs: np.ndarray, columns: Sequence[int], sizes: np.ndarray, itemsize: int) -> bool:
    """Whether the memory written by the spans overlaps: any two of the ranges ``[ptrs[j, c], ptrs[j, c] + sizes[j] *
    itemsize)``, over the spans ``j`` and the written columns ``c`` (the parameter and state columns), share a byte.

    Parameters that are views of one storage with overlapping elements (``Parameter(base[:n])`` and
    ``Parameter(base[k:])``) are stepped one after the other by torch.optim's for-loop, the later one reading what the
    earlier one wrote; the loop then runs on one thread, in the same order (split over threads, two threads would
    update the shared elements at the same time)."""
    if not columns or sizes.size < 2:
        return False
    nbytes = np.tile(sizes.astype(np.uint64) * np.uint64(itemsize), len(columns))
    starts = np.concatenate([ptrs[:, c].astype(np.uint64) for c in columns])
    keep = nbytes > 0
    starts, ends = starts[keep], starts[keep] + nbytes[keep]
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    return bool(np.any(starts[1:] < np.maximum.accumulate(ends)[:-1]))


def run_spans(
    kernel: _cfuse.CKernel,
    host: Any,
    sizes: np.ndarray,
    ptrs: np.ndarray,
    itemsize: int,
    ends: np.ndarray | None = None,
    at: SpanAddresses | None = None,
    serial: bool = False,
    written: Sequence[int] = (),
) -> None:
    """Run ``kernel`` over the spans (``sizes`` int64, ``ptrs`` from :func:`pointers`), on up to
    ``torch.get_num_threads()`` threads, each a contiguous range of elements: torch's own OpenMP threads where
    :mod:`._torch_omp` builds, else a thread pool of this module. The spans run on one thread, one after the other,
    when the memory they write overlaps (:func:`written_overlap`): ``serial`` says so where the caller knows it, else
    the ``written`` columns of ``ptrs`` are checked, only when the step would be split. ``ends`` (the cumulative sum
    of ``sizes``) may be given when it is at hand, and ``at`` (:func:`span_addresses` of ``sizes`` and ``ptrs``) when
    the caller keeps the arrays."""
    total = int(ends[-1]) if ends is not None and ends.size else int(sizes.sum()) if sizes.size else 0
    threads = 1 if serial else min(torch.get_num_threads(), total // MIN_ELEMENTS_PER_THREAD)
    if threads > 1 and written and written_overlap(ptrs, written, sizes, itemsize):
        threads = 1
    if threads <= 1:
        if at is not None:
            kernel.spans_at(sizes.size, at.sizes, at.ptrs, host)
        else:
            kernel.spans(sizes, ptrs, host)
        return
    omp = _omp.runner()
    if omp is not None:
        omp.spans(kernel, host, sizes, np.cumsum(sizes) if ends is None else ends, ptrs, itemsize, threads)
        return
    jobs = _split(sizes, ptrs, itemsize, threads)
    futures = [_pool(threads - 1).submit(kernel.spans, s, p, host) for s, p in jobs[1:]]
    kernel.spans(jobs[0][0], jobs[0][1], host)
    for f in futures:
        f.result()
