"""Checks of thousands of torch tensors in one C call each, through torch's stable C ABI.

Private module of the torch adapter. Before the compiled loop writes anything through raw addresses, the
steady-state step of a group (:class:`._torch_engine.FastGroup`) must know that every parameter, state tensor and
step counter is still where it was and laid out as it was, and that every fresh gradient is a contiguous CPU tensor
with its parameter's element count and dtype. Asked from Python, that is five calls per tensor through torch's
bindings (about 50 ns each, plus a cache miss on the tensor's metadata): on thousands of small tensors, more time than
the update itself. Here each list is checked in one C call that asks torch's stable C ABI (the ``aoti_torch_get_*``
functions of ``torch/csrc/inductor/aoti_torch/c/shim.h``, exported by ``libtorch_cpu``) about handles to the
tensors: owned ``at::Tensor`` references to the tensors' implementations, so ``p.data = x``, ``set_``, ``resize_``,
``as_strided_`` or a storage resize on a parameter are seen through its handle.

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

__all__ = ["Guard", "Handles", "guard", "ENABLED"]

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

/* Fresh tensors (capsules, each deleted here): 1 when every one is plain; addresses into out[i * ld + col]. */
int xpoptim_guard_fresh(PyObject* capsules, int64_t n, const int64_t* numel, int32_t dtype, int32_t dev,
                        uintptr_t* out, int64_t ld, int64_t col) {
    int good = 1;
    for (int64_t i = 0; i < n; i++) {
        AtenTensorHandle h = unwrap(PyList_GET_ITEM(capsules, i));
        void* ptr = NULL;
        if (good && !plain(h, numel[i], dtype, dev, &ptr)) good = 0;
        out[i * ld + col] = (uintptr_t)ptr;
        if (h) aoti_torch_delete_tensor_object(h);
    }
    return good;
}

/* Held tensors: 1 when every one is plain and still at expect[i * ld + col]. */
int xpoptim_guard_same(const uintptr_t* handles, int64_t n, const int64_t* numel, int32_t dtype, int32_t dev,
                       const uintptr_t* expect, int64_t ld, int64_t col) {
    for (int64_t i = 0; i < n; i++) {
        void* ptr;
        if (!plain((AtenTensorHandle)handles[i], numel[i], dtype, dev, &ptr) || (uintptr_t)ptr != expect[i * ld + col])
            return 0;
    }
    return 1;
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


class Guard:
    """The compiled checks (see the module's docstring)."""

    def __init__(self, lib: Any) -> None:
        self._unwrap = lib.xpoptim_guard_unwrap
        self._unwrap.argtypes, self._unwrap.restype = [ctypes.py_object, _I64, _P], None
        self._delete = lib.xpoptim_guard_delete
        self._delete.argtypes, self._delete.restype = [_P, _I64], None
        self._fresh = lib.xpoptim_guard_fresh
        self._fresh.argtypes, self._fresh.restype = [ctypes.py_object, _I64, _P, _I32, _I32, _P, _I64, _I64], ctypes.c_int
        self._same = lib.xpoptim_guard_same
        self._same.argtypes, self._same.restype = [_P, _I64, _P, _I32, _I32, _P, _I64, _I64], ctypes.c_int
        self._values = lib.xpoptim_guard_values
        self._values.argtypes, self._values.restype = [ctypes.py_object, ctypes.py_object, _I64, _P], ctypes.c_int
        self.cpu = int(lib.aoti_torch_device_type_cpu())
        self.dtypes = {torch.float32: int(lib.aoti_torch_dtype_float32()), torch.float64: int(lib.aoti_torch_dtype_float64())}

    def handles(self, tensors: Sequence[torch.Tensor]) -> Handles:
        """Handles to ``tensors`` (held until the returned object is collected)."""
        return Handles(self, tensors)

    def fresh(self, tensors: Sequence[torch.Tensor], numel: np.ndarray, dtype: torch.dtype, out: np.ndarray, col: int) -> bool:
        """Whether every tensor is a contiguous CPU tensor of ``numel[i]`` elements of ``dtype``; their addresses
        are written to column ``col`` of ``out`` (uintp, C-contiguous, one row per tensor)."""
        capsules = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors if isinstance(tensors, list) else list(tensors))
        return bool(self._fresh(capsules, len(capsules), numel.ctypes.data, self.dtypes[dtype], self.cpu, out.ctypes.data, out.shape[1], col))

    def same(self, held: Handles, numel: np.ndarray, dtype: torch.dtype, expect: np.ndarray, col: int) -> bool:
        """Whether every held tensor is still a contiguous CPU tensor of ``numel[i]`` elements of ``dtype`` at the
        address in column ``col`` of ``expect`` (uintp, C-contiguous, one row per tensor; 1-D: one column)."""
        ld = expect.shape[1] if expect.ndim == 2 else 1
        return bool(self._same(held.array.ctypes.data, held.array.size, numel.ctypes.data, self.dtypes[dtype], self.cpu, expect.ctypes.data, ld, col))

    def values(self, dicts: list[dict], keys: tuple[str, ...], expect_ids: np.ndarray) -> bool:
        """Whether ``dicts[i][keys[j]] is`` the object whose ``id`` is ``expect_ids[j, i]`` for every ``i``, ``j``
        (the caller holds those objects, so their ids cannot be reused)."""
        return bool(self._values(dicts, keys, len(dicts), expect_ids.ctypes.data))


def _build() -> Guard | None:
    if not hasattr(getattr(torch._C, "_aoti", None), "unsafe_alloc_void_ptrs_from_tensors"):
        return None
    include = sysconfig.get_paths().get("include")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if not include or not os.path.exists(os.path.join(include, "Python.h")) or not os.path.isdir(torch_lib):
        return None
    source = _SOURCE % {"torch": torch.__version__}
    link = (f"-I{include}", f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}")
    try:
        return Guard(_cfuse.build_library(source, link, ctypes.PyDLL))
    except (_cfuse.TraceError, AttributeError):
        return None


def guard() -> Guard | None:
    """The compiled checks, or ``None`` (switched off, or they cannot be built here): check in Python then."""
    if not ENABLED:
        return None
    with _LOCK:
        if not _GUARD:
            _GUARD.append(_build())
        return _GUARD[0]
