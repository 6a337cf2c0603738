"""Checks of thousands of torch tensors in one C call per step, through torch's stable C ABI.

Private module of the torch adapter. Before the compiled loop writes anything through raw addresses, the
steady-state step of a group (:class:`._torch_engine.FastGroup`) must know that every parameter, state tensor and
step counter is still where it was and laid out as it was, and that every fresh gradient is a contiguous CPU tensor
with its parameter's element count and dtype. Asked from Python, that is five calls per tensor through torch's
bindings (about 50 ns each, plus a cache miss on the tensor's metadata): on thousands of small tensors, more time than
the update itself. Here one C call (:meth:`Guard.rows`) asks torch's stable C ABI (the ``aoti_torch_get_*``
functions of ``torch/csrc/inductor/aoti_torch/c/shim.h``, exported by ``libtorch_cpu``) about handles to every
tensor of the step: owned ``at::Tensor`` references to the tensors' implementations, so ``p.data = x``, ``set_``,
``resize_``, ``as_strided_`` or a storage resize on a parameter are seen through its handle. The rows are split over
torch's OpenMP threads (:mod:`._torch_omp`) when the library is built with OpenMP; the state dicts' values are
compared by identity in a second call (:meth:`Guard.values`), under the GIL.

Handles come from ``torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors`` (the binding AOTInductor's Python runner
uses). The library is compiled once per machine (cached like the step kernels, :func:`._cfuse.build_library`),
against the Python headers and linked to ``libtorch_cpu``. Where any of that is missing (no Python headers, a torch
build without AOTInductor, no C compiler, another platform), :func:`guard` returns ``None`` and the engine asks the
same questions tensor by tensor in Python: same answers, slower.
"""

from __future__ import annotations

import ctypes
import os
import sysconfig
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import _cfuse
from . import _torch_omp as _omp

__all__ = ["Guard", "Handles", "Held", "guard", "ENABLED"]

#: Check in C when the library builds (``False``: always check in Python).
ENABLED = True

_SOURCE = r"""
/* xpoptim: bulk checks of torch tensors (torch %(torch)s) through the stable C ABI. */
#include <Python.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct AtenTensorOpaque* AtenTensorHandle;
extern int32_t aoti_torch_get_data_ptr(AtenTensorHandle, void**);
extern int32_t aoti_torch_get_numel(AtenTensorHandle, int64_t*);
extern int32_t aoti_torch_get_dtype(AtenTensorHandle, int32_t*);
extern int32_t aoti_torch_get_device_type(AtenTensorHandle, int32_t*);
extern int32_t aoti_torch_is_contiguous(AtenTensorHandle, bool*);
extern int32_t aoti_torch_delete_tensor_object(AtenTensorHandle);

/* 1 when the tensor is a contiguous tensor of `numel` elements, `dtype` on device type `dev`; its address in *ptr. */
static int plain(AtenTensorHandle h, int64_t numel, int32_t dtype, int32_t dev, void** ptr) {
    int64_t n;
    int32_t dt, dv;
    bool contiguous;
    if (h == NULL) return 0;
    if (aoti_torch_get_numel(h, &n) || n != numel) return 0;
    if (aoti_torch_get_dtype(h, &dt) || dt != dtype) return 0;
    if (aoti_torch_get_device_type(h, &dv) || dv != dev) return 0;
    if (aoti_torch_is_contiguous(h, &contiguous) || !contiguous) return 0;
    if (aoti_torch_get_data_ptr(h, ptr)) return 0;
    return 1;
}

static AtenTensorHandle unwrap(PyObject* capsule) {
    AtenTensorHandle h = (AtenTensorHandle)PyCapsule_GetPointer(capsule, NULL);
    if (h == NULL) PyErr_Clear();
    return h;
}

/* The handles held by a list of capsules, into out[0..n). */
void xpoptim_guard_unwrap(PyObject* capsules, int64_t n, uintptr_t* out) {
    for (int64_t i = 0; i < n; i++) out[i] = (uintptr_t)unwrap(PyList_GET_ITEM(capsules, i));
}

void xpoptim_guard_delete(const uintptr_t* handles, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (handles[i]) aoti_torch_delete_tensor_object((AtenTensorHandle)handles[i]);
}

/* Row i of k held columns is good when, for every column c, handles[c][i] is a plain tensor of numel[c][i] elements
   (numel[c] NULL: one element) of dtypes[c], still at expect[c][i]. */
static int held_row(int64_t i, int64_t k, const uintptr_t* const* handles, const int64_t* const* numel,
                    const int32_t* dtypes, int32_t dev, const uintptr_t* const* expect) {
    for (int64_t c = 0; c < k; c++) {
        void* ptr;
        if (!plain((AtenTensorHandle)handles[c][i], numel[c] ? numel[c][i] : 1, dtypes[c], dev, &ptr)
            || (uintptr_t)ptr != expect[c][i])
            return 0;
    }
    return 1;
}

/* One step's checks of n rows: 1 when every row of the held columns is good (held_row), every fresh tensor (a list
   of n capsules, each deleted here) is plain with fresh_numel[i] elements of fresh_dtype (its address into
   out[i * ld + col]) and, when step_col >= 0, the float32 scalars of that held column all hold one value (into
   *step). Rows are split over `threads` threads: they only read tensor metadata; the fresh tensors' handles are
   unwrapped and released on this thread, which holds the GIL. */
int xpoptim_guard_rows(int64_t n, int64_t k, PyObject* fresh, const uintptr_t* const* handles,
                       const int64_t* const* numel, const int32_t* dtypes, const uintptr_t* const* expect, int32_t dev,
                       const int64_t* fresh_numel, int32_t fresh_dtype, uintptr_t* scratch, uintptr_t* out,
                       int64_t ld, int64_t col, int64_t step_col, float* step, int threads) {
    for (int64_t i = 0; i < n; i++) scratch[i] = (uintptr_t)unwrap(PyList_GET_ITEM(fresh, i));
    if (n == 0) return 1;
    void* ptr = NULL;
    int good = held_row(0, k, handles, numel, dtypes, dev, expect)
               && plain((AtenTensorHandle)scratch[0], fresh_numel[0], fresh_dtype, dev, &ptr);
    out[col] = (uintptr_t)ptr;
    const float t0 = (good && step_col >= 0) ? *(const float*)expect[step_col][0] : 0.0f;
    #pragma omp parallel for schedule(static) reduction(&:good) num_threads(threads) if(threads > 1)
    for (int64_t i = 1; i < n; i++) {
        void* p = NULL;
        int ok = held_row(i, k, handles, numel, dtypes, dev, expect)
                 && plain((AtenTensorHandle)scratch[i], fresh_numel[i], fresh_dtype, dev, &p);
        if (ok && step_col >= 0 && *(const float*)expect[step_col][i] != t0) ok = 0;
        out[i * ld + col] = (uintptr_t)p;
        good &= ok;
    }
    /* Released on this thread: dropping a reference may drop one on the tensor's Python object (the GIL's). */
    for (int64_t i = 0; i < n; i++)
        if (scratch[i]) aoti_torch_delete_tensor_object((AtenTensorHandle)scratch[i]);
    *step = t0;
    return good;
}

/* Dicts (a list of n dicts) and keys (a tuple of k strings): 1 when dicts[i][keys[j]] is the object whose address
   is expect[j * n + i], for every i and j. */
int xpoptim_guard_values(PyObject* dicts, PyObject* keys, int64_t n, const uintptr_t* expect) {
    Py_ssize_t k = PyTuple_GET_SIZE(keys);
    for (int64_t i = 0; i < n; i++) {
        PyObject* d = PyList_GET_ITEM(dicts, i);
        if (!PyDict_Check(d)) return 0;
        for (Py_ssize_t j = 0; j < k; j++) {
            PyObject* v = PyDict_GetItemWithError(d, PyTuple_GET_ITEM(keys, j));
            if (v == NULL) { PyErr_Clear(); return 0; }
            if ((uintptr_t)v != expect[j * n + i]) return 0;
        }
    }
    return 1;
}
"""

_LOCK = threading.Lock()
_GUARD: list = []
_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


class Handles:
    """Owned handles (``at::Tensor`` references) to a list of tensors, released when this object is collected.

    Attributes:
        array: uintp, one handle per tensor.
    """

    __slots__ = ("array", "__weakref__")

    def __init__(self, g: Guard, tensors: Sequence[torch.Tensor]) -> None:
        capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(tensors))
        self.array = np.zeros(len(capsules), dtype=np.uintp)
        g._unwrap(capsules, len(capsules), self.array.ctypes.data)
        fin = weakref.finalize(self, _release, g._delete, self.array)
        fin.atexit = False  # at exit the process's memory goes anyway; torch's library may already be unloaded


def _release(delete: Any, array: np.ndarray) -> None:
    delete(array.ctypes.data, array.size)


class Held:
    """Handles to ``k`` columns of ``n`` tensors each (a step's parameters, each state tensor, the step counters),
    with what every one of them must still be (element count, dtype, address), what the step's fresh tensors must be
    (element counts, dtype) and where their addresses go: everything :meth:`Guard.rows` passes to C but the fresh
    tensors, resolved once to the integers the call takes.

    Args:
        g: the compiled checks.
        columns: ``k`` lists of ``n`` tensors, held (as handles) while this object lives.
        numel: per column, int64 element counts (``None``: one element each).
        dtypes: per column, the dtype.
        expect: per column, uintp addresses.
        fresh_numel: int64 element counts of the fresh tensors.
        fresh_dtype: their dtype.
        out: uintp, C-contiguous, one row per tensor: their addresses go to column ``col`` (kept alive here).
        col: that column.
        step_col: a column of float32 step counters, or ``-1``.

    Attributes:
        n: rows (tensors per column).
        columns: the :class:`Handles` of each column.
        step_col: the column of float32 step counters whose values are read (``-1``: none).
    """

    __slots__ = ("n", "columns", "step_col", "_keep", "_args", "_step")

    def __init__(
        self,
        g: Guard,
        columns: Sequence[Sequence[torch.Tensor]],
        numel: Sequence[np.ndarray | None],
        dtypes: Sequence[torch.dtype],
        expect: Sequence[np.ndarray],
        fresh_numel: np.ndarray,
        fresh_dtype: torch.dtype,
        out: np.ndarray,
        col: int,
        step_col: int = -1,
    ) -> None:
        self.n = len(columns[0]) if columns else 0
        self.columns = [g.handles(col) for col in columns]
        self.step_col = step_col
        nums = [np.ascontiguousarray(x, dtype=np.int64) if x is not None else None for x in numel]
        exps = [np.ascontiguousarray(e, dtype=np.uintp) for e in expect]
        handles = np.array([h.array.ctypes.data for h in self.columns], dtype=np.uintp)
        num_ptrs = np.array([0 if x is None else x.ctypes.data for x in nums], dtype=np.uintp)
        dts = np.array([g.dtypes[d] for d in dtypes], dtype=np.int32)
        exp_ptrs = np.array([e.ctypes.data for e in exps], dtype=np.uintp)
        fresh_n = np.ascontiguousarray(fresh_numel, dtype=np.int64)
        scratch = np.zeros(self.n, dtype=np.uintp)
        self._step = np.zeros(1, dtype=np.float32)
        if out.dtype != np.uintp or not out.flags.c_contiguous or out.ndim != 2 or out.shape[0] != self.n:
            raise ValueError(f"out must be a C-contiguous uintp array of {self.n} rows")
        # Every array the C call reads or writes through an address is kept alive here.
        self._keep = (nums, exps, handles, num_ptrs, dts, exp_ptrs, fresh_n, scratch, out)
        self._args = (
            handles.ctypes.data, num_ptrs.ctypes.data, dts.ctypes.data, exp_ptrs.ctypes.data, g.cpu,
            fresh_n.ctypes.data, g.dtypes[fresh_dtype], scratch.ctypes.data, out.ctypes.data, out.shape[1], col,
            step_col, self._step.ctypes.data,
        )  # fmt: skip


class Guard:
    """The compiled checks (see the module's docstring)."""

    def __init__(self, lib: Any) -> None:
        self._unwrap = lib.xpoptim_guard_unwrap
        self._unwrap.argtypes, self._unwrap.restype = [ctypes.py_object, _I64, _P], None
        self._delete = lib.xpoptim_guard_delete
        self._delete.argtypes, self._delete.restype = [_P, _I64], None
        self._rows = lib.xpoptim_guard_rows
        self._rows.argtypes = [_I64, _I64, ctypes.py_object, _P, _P, _P, _P, _I32, _P, _I32, _P, _P, _I64, _I64, _I64, _P, ctypes.c_int]
        self._rows.restype = ctypes.c_int
        self._values = lib.xpoptim_guard_values
        self._values.argtypes, self._values.restype = [ctypes.py_object, ctypes.py_object, _I64, _P], ctypes.c_int
        self.cpu = int(lib.aoti_torch_device_type_cpu())
        self.dtypes = {torch.float32: int(lib.aoti_torch_dtype_float32()), torch.float64: int(lib.aoti_torch_dtype_float64())}

    def handles(self, tensors: Sequence[torch.Tensor]) -> Handles:
        """Handles to ``tensors`` (held until the returned object is collected)."""
        return Handles(self, tensors)

    def rows(self, held: Held, fresh: list[torch.Tensor], threads: int = 1) -> float | None:
        """One step's checks, split over ``threads`` of torch's OpenMP threads where the library has them.

        Every held tensor must still be a contiguous CPU tensor of its element count and dtype at its address, and
        every ``fresh`` tensor (the step's gradients, ``held.n`` of them) a contiguous CPU tensor of the element
        count and dtype ``held`` names; the fresh tensors' addresses go to ``held``'s output column.

        Returns:
            ``None`` when any check fails, else the one value of the step counters (``held.step_col``; 0.0 when
            there is none), ``None`` as well when they differ.
        """
        capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(fresh)
        if len(capsules) != held.n:
            raise ValueError(f"{len(capsules)} fresh tensors for {held.n} rows")
        ok = self._rows(held.n, len(held.columns), capsules, *held._args, threads)
        return float(held._step[0]) if ok else None

    def values(self, dicts: list[dict], keys: tuple[str, ...], expect_ids: np.ndarray) -> bool:
        """Whether ``dicts[i][keys[j]] is`` the object whose ``id`` is ``expect_ids[j, i]`` for every ``i``, ``j``
        (the caller holds those objects, so their ids cannot be reused)."""
        return self.values_at(dicts, keys, expect_ids.ctypes.data)

    def values_at(self, dicts: list[dict], keys: tuple[str, ...], expect_ids: int) -> bool:
        """:meth:`values` with the uintp array of ids given by its address (``.ctypes.data``, read once by a caller
        that keeps the array)."""
        return bool(self._values(dicts, keys, len(dicts), expect_ids))


def _build() -> Guard | None:
    if not hasattr(getattr(torch._C, "_aoti", None), "unsafe_alloc_void_ptrs_from_tensors"):
        return None
    include = sysconfig.get_paths().get("include")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if not include or not os.path.exists(os.path.join(include, "Python.h")) or not os.path.isdir(torch_lib):
        return None
    source = _SOURCE % {"torch": torch.__version__}
    link = (f"-I{include}", f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}")
    openmp = _omp.openmp_link()
    # With OpenMP where it builds (the rows split over torch's threads), else without it (the rows on one thread).
    for extra in ((openmp, ()) if openmp else ((),)):
        try:
            return Guard(_cfuse.build_library(source, (*link, *extra), ctypes.PyDLL))
        except (_cfuse.TraceError, AttributeError):
            continue
    return None


def guard() -> Guard | None:
    """The compiled checks, or ``None`` (switched off, or they cannot be built here): check in Python then."""
    if not ENABLED:
        return None
    with _LOCK:
        if not _GUARD:
            _GUARD.append(_build())
        return _GUARD[0]
