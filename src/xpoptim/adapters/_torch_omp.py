"""The compiled loop on torch's own CPU threads: its OpenMP pool, as torch's kernels use it.

Private module of the torch adapter. A CPU step that is split over threads (:func:`._torch_ckernel.run_spans`)
should run on the threads torch's own kernels run on. torch's Linux wheels parallelise with OpenMP (``libgomp``,
shipped in ``torch/lib``); after a torch kernel the pool's threads spin for a while waiting for more work, so a
second pool of ours (a ``ThreadPoolExecutor``) finds its core taken, and right after backward a step split over it
could take longer than one thread. Here one small C function, compiled once per machine with ``-fopenmp`` and
linked to the ``libgomp`` torch loaded, runs the loop in an OpenMP parallel region: the loaded runtime is the one
torch's ``at::parallel_for`` uses, so the threads, their count (``torch.set_num_threads``) and their waiting policy
are torch's. The effect is measured in ``benchmarks/results/<machine>/torch_paths.md`` (``python -m
benchmarks.torch_section``).

Where that cannot be built (no compiler with OpenMP, a torch that does not use OpenMP, another platform) or the
library would be bound to another OpenMP runtime than torch's, :func:`runner` returns ``None`` and the step is split
over a ``ThreadPoolExecutor`` as before: same bits (each element is computed by the same loop either way), slower.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import numpy as np
import torch

from . import _cfuse

__all__ = ["Runner", "runner", "ENABLED"]

#: Run split steps in torch's OpenMP pool when the driver builds (``False``: always a ThreadPoolExecutor).
ENABLED = True

_SOURCE = r"""
/* xpoptim: run a compiled step loop over spans on torch's OpenMP threads (torch %(torch)s). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <omp.h>

/* xpoptim_step_ptrs of a compiled kernel: m spans, span j's array q at ptrs[j * k + q], sizes[j] elements. */
typedef void (*spans_fn)(int64_t, const int64_t*, void* const*, const double*);

/* The first span whose end (ends[j], cumulative element counts) is above x. */
static int64_t span_at(const int64_t* ends, int64_t m, int64_t x) {
    int64_t lo = 0, hi = m;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (ends[mid] > x) hi = mid; else lo = mid + 1;
    }
    return lo;
}

/* Elements [a, b) of span j alone (a span cut between two threads). */
static void part(spans_fn f, int64_t j, int64_t a, int64_t b, void* const* ptrs, int64_t k, int64_t itemsize,
                 const double* sc) {
    void* row[64];
    int64_t n = b - a;
    for (int64_t q = 0; q < k; q++) row[q] = (char*)ptrs[j * k + q] + a * itemsize;
    f(1, &n, row, sc);
}

/* Elements [lo, hi) of the concatenated spans. */
static void range(spans_fn f, int64_t m, const int64_t* sizes, const int64_t* ends, void* const* ptrs, int64_t k,
                  int64_t itemsize, const double* sc, int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    int64_t j = span_at(ends, m, lo);
    int64_t start = ends[j] - sizes[j];
    if (lo > start || hi < ends[j]) {  /* the first span is cut */
        part(f, j, lo - start, (hi < ends[j] ? hi : ends[j]) - start, ptrs, k, itemsize, sc);
        if (hi <= ends[j]) return;
        lo = ends[j];
        j++;
    }
    int64_t last = span_at(ends, m, hi - 1);  /* the span holding the range's last element */
    int64_t whole = (hi == ends[last]) ? last + 1 : last;
    if (whole > j) f(whole - j, sizes + j, ptrs + j * k, sc);
    if (whole == last) part(f, last, 0, hi - (ends[last] - sizes[last]), ptrs, k, itemsize, sc);
}

/* Run f over every element of the m spans, cut into `threads` runs of (almost) equal element counts, one per
   thread of the OpenMP pool. Returns the number of threads that ran. */
int xpoptim_omp_spans(void* fn, int64_t m, const int64_t* sizes, const int64_t* ends, void* const* ptrs, int64_t k,
                      int64_t itemsize, const double* sc, int threads) {
    spans_fn f = (spans_fn)fn;
    if (m <= 0) return 0;
    int64_t total = ends[m - 1];
    int ran = 1;
    if (threads <= 1 || k > 64) {
        range(f, m, sizes, ends, ptrs, k, itemsize, sc, 0, total);
        return 1;
    }
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (t == 0) ran = nt;
        range(f, m, sizes, ends, ptrs, k, itemsize, sc, total * t / nt, total * (t + 1) / nt);
    }
    return ran;
}

int xpoptim_omp_max_threads(void) { return omp_get_max_threads(); }

/* The file of the OpenMP runtime this library's regions run on. */
const char* xpoptim_omp_runtime(void) {
    Dl_info info;
    if (dladdr((void*)&omp_get_max_threads, &info) && info.dli_fname) return info.dli_fname;
    return "";
}
"""

_LOCK = threading.Lock()
_RUNNER: list = []
_USED: list = []  # [True] once a runner was handed out in this process (its OpenMP threads may exist)
_FORKED_AFTER_USE: list = []  # [True] in a child forked after that
_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class Runner:
    """The compiled driver (see the module's docstring)."""

    def __init__(self, lib: Any) -> None:
        self._spans = lib.xpoptim_omp_spans
        self._spans.argtypes = [_P, _I64, _P, _P, _P, _I64, _I64, _P, ctypes.c_int]
        self._spans.restype = ctypes.c_int
        self.max_threads = lib.xpoptim_omp_max_threads
        self.max_threads.argtypes, self.max_threads.restype = [], ctypes.c_int
        runtime = lib.xpoptim_omp_runtime
        runtime.argtypes, runtime.restype = [], ctypes.c_char_p
        #: The file of the OpenMP runtime the regions run on.
        self.runtime = os.fsdecode(runtime() or b"")

    def spans(self, kernel: _cfuse.CKernel, host: Any, sizes: np.ndarray, ends: np.ndarray, ptrs: np.ndarray, itemsize: int, threads: int) -> int:
        """Run ``kernel``'s span loop over every element of the spans, split into ``threads`` equal runs on torch's
        OpenMP threads (``ends``: the cumulative sum of ``sizes``, int64); the number of threads that ran."""
        return int(self._spans(kernel.spans_address, sizes.size, sizes.ctypes.data, ends.ctypes.data, ptrs.ctypes.data, ptrs.shape[1], itemsize, host, threads))


def _mapped_libgomp() -> list[str]:
    """The ``libgomp`` files mapped into this process (resolved paths; empty where that cannot be read)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({os.path.realpath(line.split()[-1]) for line in f if "libgomp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return []


def _torch_libgomp() -> str | None:
    """The ``libgomp`` torch runs its CPU kernels on: the one shipped in ``torch/lib`` (mapped), or the one
    mapped ``libgomp`` of a torch built against the system's; ``None`` when torch does not use OpenMP, or when it
    cannot be told which of several runtimes is torch's."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_dir = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep
    mapped = _mapped_libgomp()
    shipped = [p for p in mapped if p.startswith(torch_dir)]
    if shipped:
        return shipped[0] if len(shipped) == 1 else None
    return mapped[0] if len(mapped) == 1 else None


def openmp_link() -> tuple[str, ...] | None:
    """Compiler arguments that build a library whose OpenMP regions run on torch's OpenMP runtime (``-fopenmp``,
    linked where torch's ``libgomp`` lies), or ``None`` when torch's ``libgomp`` is not found here."""
    gomp = _torch_libgomp()
    if gomp is None:
        return None
    directory = os.path.dirname(gomp)
    return ("-fopenmp", f"-L{directory}", f"-Wl,-rpath,{directory}", "-ldl")


def same_runtime(r: Runner) -> bool:
    """Whether the runner's OpenMP regions run on torch's runtime (other runtimes may be loaded beside it, such as
    scikit-learn's own ``libgomp``: they do not matter as long as this library is bound to torch's)."""
    torch_gomp = _torch_libgomp()
    return bool(r.runtime) and torch_gomp is not None and os.path.realpath(r.runtime) == torch_gomp


def _build() -> Runner | None:
    link = openmp_link()
    if link is None:
        return None
    try:
        r = Runner(_cfuse.build_library(_SOURCE % {"torch": torch.__version__}, link))
    except (_cfuse.TraceError, AttributeError):
        return None
    return r if same_runtime(r) else None  # another runtime's threads would compete with torch's


def runner() -> Runner | None:
    """The compiled driver, or ``None`` (switched off, it cannot be built here, or this process was forked from one
    that used it): split over a Python thread pool then.

    Callers run OpenMP regions with what this returns, so a process that got a runner has started the pool. GNU
    OpenMP cannot start a parallel region in a process forked after that (the child waits forever for threads that
    were not copied, as torch's own kernels do in such a child); a child forked after a step that used the pool
    therefore gets ``None``."""
    if not ENABLED or _FORKED_AFTER_USE:
        return None
    with _LOCK:
        if not _RUNNER:
            _RUNNER.append(_build())
        if _RUNNER[0] is not None and not _USED:
            _USED.append(True)
        return _RUNNER[0]


def _after_fork_in_child() -> None:
    if _USED:
        _FORKED_AFTER_USE.append(True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
