"""Optimizers over plain arrays (NumPy, CuPy, or any Python Array API namespace).

For models whose parameters live in NumPy or CuPy arrays with hand-written gradients. Two layers:

* **Stateful** (:class:`Optimizer`, one subclass per optimizer named by ``spec.title``, and
  :func:`create`): ``opt = Adam([w, b], lr=1e-3)``; ``opt.step([gw, gb])`` updates the user's arrays
  **in place** (they must be writable: read-only NumPy arrays and JAX arrays are refused with a
  pointer to the functional layer). Parameters are given as a list or a dict of arrays, or as a list
  of parameter groups (``{"params": [...], "lr": 0.1}``, torch style) with per-group
  hyperparameters. ``opt.param_groups[i]["lr"] = ...``, ``opt.set_hyperparams(lr=...)`` or
  ``opt.lr = ...`` change hyperparameters between steps (read and validated at every step, so LR
  schedules just write them). ``state_dict()`` / ``load_state_dict()`` hold NumPy arrays only, so a
  checkpoint moves between NumPy, CuPy, torch and JAX.
* **Functional** (:func:`functional`): ``tx = functional("adam", lr=1e-3)``; ``state = tx.init(params)``;
  ``new_params, state = tx.update(grads, state, params)``. Pure (no input is written), eager, and it
  works on any array-API namespace, JAX arrays included. It is the per-array reference
  (``xpoptim.core.functional``) and gives the same numbers as the stateful layer.
  ``tx.state_dict(state)`` / ``tx.load_state_dict(checkpoint, params)`` convert to and from the
  NumPy checkpoint format of the stateful layer (so a NumPy run can resume on JAX and back).

Layout (no math here; the rules are ``xpoptim.core``'s):

* Elementwise rules run once per *flat bucket*: one bucket per (parameter group, rule, dtype). On
  NumPy (float32 and float64) the core step kernel is compiled once into one C loop
  (:mod:`xpoptim.adapters._cfuse`: traced on symbolic arrays, printed as IEEE-exact C, built with the
  system C compiler and cached on disk), which gives the op-by-op path's bits in one pass over memory; the
  ``fused`` attribute says whether every bucket runs that way and ``fuse_notes`` why not (no compiler, a
  rule calling ``erf``, float16 parameters with float32 state, ``fuse=False``). Either way large
  C-contiguous arrays are updated through flat views of themselves (no gather) and small arrays are
  grouped in packs of about ``chunk_size`` elements (65536 by default, 262144 with several threads).
  Compiled, the loop updates a pack's parameters through their addresses and only the gradients are
  gathered (one ``numpy.concatenate(out=)`` into a reusable buffer); op by op, a pack's parameters are
  gathered too and scattered back, and large arrays are processed in chunks of ``chunk_size``. Packs,
  arrays and chunks are shared by ``threads`` threads (NumPy and the compiled loop release the GIL; by
  default the available cores, at most 2).
  State is kept in flat buffers per bucket. On CuPy (and other namespaces) a bucket
  is processed whole; on CuPy the core step kernel is compiled with ``cupy.fuse`` and writes its
  results in place (``fused`` attribute per bucket; op by op, with a warning, when the rule is not
  fusable or fusion fails).
* Matrix rules (Muon, DeVA_Sinf) take every parameter with ``ndim >= 2``; arrays with more than two
  axes are flattened to ``(shape[0], prod(rest))`` for ``layout="out_in"`` (torch ``Linear`` / conv
  weights) or ``(prod(shape[:-1]), shape[-1])`` for ``layout="in_out"`` (flax kernels). Same-shape
  matrices of one group are stacked into one Newton-Schulz call. Other parameters go to the
  elementwise fallback rule (``spec.fallback``, with ``spec.fallback_defaults``; override with
  ``fallback=`` and ``fallback_hyperparams=``).
* State for float16/bfloat16 parameters is float32 by default (``state_dtype=`` to choose).

Checkpoint format (``state_dict()``)::

    {"version": core.STATE_VERSION, "optimizer": "adamw", "step": 3,
     "param_groups": [{"keys": [0, 1], "lr": ..., ...}],   # hyperparameters per group
     "state": {0: {"exp_avg": ndarray, "exp_avg_sq": ndarray}, 1: {...}}}

State names are the core spec's (``spec.state``; ``momentum_buffer`` for Muon; ``L, R, QL, QR,
exp_avg, exp_avg_sq, gamma`` for DeVA_Sinf, with ``None`` for a side larger than
``max_precond_dim``). Elementwise state has the parameter's shape; matrix-rule state has the
flattened matrix shape. Keys are the dict keys (named parameters) or the parameter's position.

CuPy: all parameters must be on one device; the work is issued under that device, on its current
stream. Mixed devices are refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import array_api_compat
import numpy as np

from xpoptim.core import SPECS, STATE_VERSION, ElementwiseSpec, MatrixSpec, get_spec
from xpoptim.core import functional as core_functional
from xpoptim.core._backend import HOST
from xpoptim.core.spec import make_step_kernel, step_scalars

from . import _cfuse

__all__ = [
    "Optimizer",
    "FunctionalOptimizer",
    "create",
    "functional",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_THREADED_CHUNK_SIZE",
    "MAX_AUTO_THREADS",
    "COMPILED_TASK_SIZE",
    *(s.title for s in SPECS.values()),
]

#: Elements per chunk on NumPy with one thread (256 KiB of float32: a few buffers stay in L2).
DEFAULT_CHUNK_SIZE = 65536
#: Elements per chunk on NumPy with several threads: larger chunks, so that each thread spends most of its time
#: inside NumPy's loops (GIL released) rather than in the rule's Python (GIL held). Measured on 2 cores, 16M
#: float32 parameters: Adam 36 -> 25 ms with 2 threads at this size, but 41 ms with 2 threads at 65536.
DEFAULT_THREADED_CHUNK_SIZE = 262144
#: ``threads=None`` uses this many threads at most (or fewer, when fewer cores are available to the process).
MAX_AUTO_THREADS = 2
#: NumPy, compiled step (:mod:`._cfuse`), several threads: elements per task.
COMPILED_TASK_SIZE = 1 << 22


def _auto_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_THREADS, cores))


_LAYOUTS = ("out_in", "in_out")
_GROUP_EXTRA_KEYS = ("params", "fallback_hyperparams")


# ----------------------------------------------------------------------------------------------
# Namespace helpers (no math)
# ----------------------------------------------------------------------------------------------


def _backend_name(x: Any) -> str:
    if array_api_compat.is_numpy_array(x):
        return "numpy"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    return "other"


def _is_array(x: Any) -> bool:
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, (int, float, complex, bool))


def _size(shape: tuple) -> int:
    return int(math.prod(shape))


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` (host memory), whatever its namespace."""
    kind = _backend_name(x)
    if kind == "numpy":
        return np.array(x, copy=True)
    if kind == "cupy":
        return x.get()
    if kind == "torch":
        return x.detach().cpu().numpy().copy()
    if kind == "jax":
        return np.array(x, copy=True)
    try:
        return np.array(np.from_dlpack(x), copy=True)
    except Exception:
        return np.array(x, copy=True)


def _from_numpy(xp: Any, arr: np.ndarray, device: Any, dtype: Any) -> Any:
    """``arr`` (NumPy) as an array of namespace ``xp`` on ``device`` with ``dtype``."""
    name = getattr(xp, "__name__", "")
    if "numpy" in name:
        return np.array(arr, dtype=dtype, copy=True)
    if "cupy" in name:
        import cupy  # noqa: PLC0415  (only reached with CuPy arrays in hand)

        with device:
            return cupy.asarray(arr).astype(dtype, copy=False)
    try:
        out = xp.asarray(arr, device=device)
    except Exception:
        out = xp.asarray(arr)
    return out if out.dtype == dtype else xp.astype(out, dtype)


def _device_context(device: Any) -> Any:
    """CuPy: make ``device`` current (work goes to its current stream). Others: nothing."""
    if type(device).__module__.startswith("cupy"):
        return device
    return contextlib.nullcontext()


def _no_grad(kind: str) -> Any:
    """torch tensors through this adapter: in-place writes on leaves that require grad need no_grad."""
    if kind == "torch":
        import sys  # noqa: PLC0415

        return sys.modules["torch"].no_grad()
    return contextlib.nullcontext()


def _is_low_precision(dtype: Any) -> bool:
    s = str(dtype)
    return "float16" in s  # float16 and bfloat16 (numpy, cupy, torch, jax)


def _is_real_floating(xp: Any, dtype: Any) -> bool:
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except Exception:
        return "float" in str(dtype) and "complex" not in str(dtype)


def _default_state_dtype(xp: Any, dtype: Any, state_dtype: Any) -> Any:
    if state_dtype is not None:
        return state_dtype
    return xp.float32 if _is_low_precision(dtype) else dtype


def _matrix_shape(shape: tuple, layout: str) -> tuple:
    if layout == "out_in":
        return (shape[0], _size(shape[1:]))
    return (_size(shape[:-1]), shape[-1])


def _reshape(xp: Any, x: Any, shape: tuple) -> Any:
    return x if tuple(x.shape) == tuple(shape) else xp.reshape(x, shape)


# ----------------------------------------------------------------------------------------------
# Parameter structure
# ----------------------------------------------------------------------------------------------


def _parse_groups(params: Any) -> tuple[list[dict], bool]:
    """Normalise ``params`` to a list of groups ``{"params": list, "names": list | None, **hp}``."""
    if _is_array(params):
        raise TypeError(
            f"params must be a list or dict of arrays (or a list of parameter groups), got a single "
            f"{type(params).__name__}: wrap it in a list"
        )
    if isinstance(params, Mapping):
        if "params" in params:
            raise TypeError("params: a single parameter group must be given inside a list: [{'params': ..., 'lr': ...}]")
        raw = [{"params": params}]
    elif isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(f"params must be a list or dict of arrays, got {type(params).__name__}")
    else:
        items = list(params)
        if not items:
            raise ValueError("params is empty: expected at least one array")
        if all(isinstance(g, Mapping) and "params" in g for g in items):
            raw = [dict(g) for g in items]
        elif any(isinstance(g, Mapping) for g in items):
            raise TypeError("params: either a list of arrays or a list of parameter groups (dicts with 'params'), not a mix")
        else:
            raw = [{"params": items}]
    groups, named_flags = [], []
    for i, g in enumerate(raw):
        p = g["params"]
        if isinstance(p, Mapping):
            names = list(p.keys())
            arrays = list(p.values())
            named_flags.append(True)
        elif _is_array(p):
            names, arrays = None, [p]
            named_flags.append(False)
        else:
            names, arrays = None, list(p)
            named_flags.append(False)
        if not arrays:
            raise ValueError(f"param group {i} has no parameters")
        for j, a in enumerate(arrays):
            if not _is_array(a):
                raise TypeError(f"param group {i}, entry {names[j] if names else j}: expected an array, got {type(a).__name__}")
        out = {k: v for k, v in g.items() if k != "params"}
        out["params"] = arrays
        out["names"] = names
        groups.append(out)
    if len(set(named_flags)) > 1:
        raise TypeError("params: either every group is a dict of named arrays or every group is a list; not a mix")
    return groups, named_flags[0]


# ----------------------------------------------------------------------------------------------
# Internal layout objects
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The stateful optimizer
# ----------------------------------------------------------------------------------------------


class Optimizer:
    """Stateful optimizer over plain arrays; ``step(grads)`` updates the arrays in place.

    Args:
        params: a list of arrays, a dict of named arrays, or a list of parameter groups
            (``{"params": list-or-dict, **hyperparameters}``).
        optimizer: registry name or title of the optimizer (``"adamw"``, ``"MVNGrad"``).
        maximize: ascend instead of descend.
        layout: ``"out_in"`` or ``"in_out"``: how matrix rules read ``ndim >= 2`` arrays.
        fallback: matrix optimizers only: the elementwise rule for other arrays (default
            ``spec.fallback``).
        fallback_hyperparams: hyperparameters of the fallback rule (over ``spec.fallback_defaults``
            when the default fallback is used); per group with the group key of the same name.
        state_dtype: dtype of the optimizer state (default: the parameter's; float32 for
            float16/bfloat16 parameters).
        chunk_size: elements per chunk for NumPy (``None``: whole buckets; default
            ``DEFAULT_CHUNK_SIZE`` with one thread, ``DEFAULT_THREADED_CHUNK_SIZE`` with more);
            other namespaces process whole buckets unless a size is given.
        fuse: compile the elementwise step: on CuPy with ``cupy.fuse``, on NumPy into one C loop with the system C
            compiler (``$CC``, ``cc``, ``gcc`` or ``clang``; the first step of a new rule pays about 0.1-0.3 s, cached
            on disk under ``$XPOPTIM_CACHE_DIR``, default ``~/.cache/xpoptim``). Without a compiler, or
            ``fuse=False``, the step runs op by op (same numbers).
        threads: NumPy: threads sharing the chunks of one bucket (NumPy and the compiled loop release the
            GIL; the chunks write disjoint slices, so the bits do not depend on it; compiled buckets run in tasks of
            about ``COMPILED_TASK_SIZE`` elements: large arrays split, small ones grouped). Default
            ``None``: the cores available to the process, at most ``MAX_AUTO_THREADS`` (2; measured
            1.3-1.5x faster than one thread on an idle 2-core machine, slower on a busy one: pass
            ``threads=1`` there). Ignored elsewhere.
        **hyperparams: the optimizer's hyperparameters (``spec.hyperparams``).

    Raises:
        TypeError: unknown hyperparameters, JAX arrays, params that are not arrays.
        ValueError: invalid hyperparameter values, read-only arrays, mixed devices or namespaces,
            non-floating dtypes, a parameter given twice.
    """

    #: Registry name when the class is bound to one optimizer (generated subclasses).
    optimizer_name: str | None = None
    #: Restrict parameters to one backend (``"numpy"`` / ``"cupy"``) in the bound modules.
    backend: str | None = None

    def __init__(
        self,
        params: Any,
        optimizer: str | None = None,
        *,
        maximize: bool = False,
        layout: str = "out_in",
        fallback: str | None = None,
        fallback_hyperparams: Mapping[str, Any] | None = None,
        state_dtype: Any = None,
        chunk_size: int | None | str = "auto",
        fuse: bool = True,
        threads: int | None = None,
        **hyperparams: Any,
    ) -> None:
        name = optimizer if optimizer is not None else self.optimizer_name
        if name is None:
            raise TypeError("Optimizer needs the optimizer name, e.g. Optimizer(params, 'adamw', lr=1e-3)")
        self.spec = get_spec(name)
        if not isinstance(maximize, bool):
            raise ValueError(f"maximize={maximize!r} is invalid: expected True or False")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout={layout!r} is invalid: expected one of {_LAYOUTS}")
        self.maximize = maximize
        self.layout = layout
        self.fuse = bool(fuse)
        self.fallback_spec: ElementwiseSpec | None = None
        self._fallback_base: dict = {}
        if isinstance(self.spec, MatrixSpec):
            self.fallback_spec, self._fallback_base = self.spec.resolve_fallback(fallback, fallback_hyperparams)
        elif fallback is not None or fallback_hyperparams is not None:
            raise TypeError(f"{self.spec.title} is elementwise: fallback/fallback_hyperparams apply to Muon and DeVASinf only")
        self.spec.validate(**hyperparams)  # unknown names -> TypeError, bad values -> ValueError

        groups, self._named = _parse_groups(params)
        self._entries: list[_Entry] = []
        self.param_groups: list[dict] = []
        seen: set[int] = set()
        index = 0
        for gi, g in enumerate(groups):
            hp = {**hyperparams, **{k: v for k, v in g.items() if k not in (*_GROUP_EXTRA_KEYS, "names")}}
            hp = self.spec.validate(**hp)
            group = {"params": g["params"], **hp}
            if self.fallback_spec is not None:
                fbh = {**self._fallback_base, **dict(g.get("fallback_hyperparams", {}))}
                self.fallback_spec.validate(**fbh)
                group["fallback_hyperparams"] = fbh
            elif "fallback_hyperparams" in g:
                raise TypeError(f"{self.spec.title} is elementwise: fallback_hyperparams apply to Muon and DeVASinf only")
            self.param_groups.append(group)
            for j, a in enumerate(g["params"]):
                if id(a) in seen:
                    raise ValueError(f"parameter {g['names'][j] if g['names'] else index} appears more than once in params")
                seen.add(id(a))
                key = g["names"][j] if g["names"] is not None else index
                self._entries.append(_Entry(key, a, gi))
                index += 1
        keys = [e.key for e in self._entries]
        if len(set(keys)) != len(keys):
            raise ValueError("params: parameter names must be unique across groups")

        arrays = [e.array for e in self._entries]
        kinds = {_backend_name(a) for a in arrays}
        if "jax" in kinds:
            raise TypeError(
                "JAX arrays are immutable, so they cannot be updated in place: use "
                "xpoptim.adapters.array.functional(...).init/update (pure) or xpoptim.adapters.optax"
            )
        if self.backend is not None and kinds != {self.backend}:
            raise TypeError(
                f"xpoptim.adapters.{self.backend}.{type(self).__name__} takes {self.backend} arrays, got "
                f"{sorted(kinds)}; use xpoptim.adapters.array for other array-API namespaces"
            )
        try:
            self.xp = array_api_compat.array_namespace(*arrays)
        except TypeError as exc:
            raise TypeError(f"params mix array namespaces ({sorted(kinds)}): {exc}") from None
        self._kind = kinds.pop()
        devices = []
        for a in arrays:
            d = array_api_compat.device(a)
            if all(d != o for o in devices):
                devices.append(d)
        if len(devices) > 1:
            raise ValueError(f"params live on several devices {devices}: all arrays must be on one device")
        self.device = devices[0]
        for e in self._entries:
            if not _is_real_floating(self.xp, e.array.dtype):
                raise ValueError(f"parameter {e.key!r} has dtype {e.array.dtype}: expected a real floating dtype")
        self._check_writable()

        if threads is None:
            threads = _auto_threads() if self._kind == "numpy" else 1
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads={threads!r} is invalid: expected an integer >= 1 or None")
        self.threads = threads
        if chunk_size == "auto":
            chunk_size = None if self._kind != "numpy" else DEFAULT_CHUNK_SIZE if threads == 1 else DEFAULT_THREADED_CHUNK_SIZE
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size!r} is invalid: expected an integer >= 1 or None")
        self.chunk_size = chunk_size
        self._state_dtype_opt = state_dtype
        self._step = 0
        self._pos = {id(e): i for i, e in enumerate(self._entries)}
        self._build()

    # -- construction -------------------------------------------------------------------------

    def _is_matrix(self, e: _Entry) -> bool:
        return isinstance(self.spec, MatrixSpec) and len(e.shape) >= 2

    def _build(self) -> None:
        xp = self.xp
        buckets: dict = {}
        stacks: dict = {}
        for e in self._entries:
            dtype = e.array.dtype
            sd = _default_state_dtype(xp, dtype, self._state_dtype_opt)
            if self._is_matrix(e):
                e.mshape = _matrix_shape(e.shape, self.layout)
                stacks.setdefault((e.group, e.mshape, str(dtype)), (dtype, sd, []))[2].append(e)
            else:
                role = "fallback" if isinstance(self.spec, MatrixSpec) else "main"
                buckets.setdefault((e.group, str(dtype)), (role, dtype, sd, []))[3].append(e)
        self._buckets: list[_Bucket] = []
        for (g, _), (role, dtype, sd, entries) in buckets.items():
            spec = self.fallback_spec if role == "fallback" else self.spec
            b = _Bucket(spec, g, role, dtype, sd, entries)
            with _device_context(self.device):
                b.state = {n: xp.zeros((b.size,), dtype=sd, device=self.device) for n in spec.state}
            b.segments = self._segments(b)
            self._buckets.append(b)
        self._stacks: list[_MatrixStack] = []
        for (g, mshape, _), (dtype, sd, entries) in stacks.items():
            st = _MatrixStack(self.spec, g, mshape, dtype, sd, entries)
            hp = self.param_groups[g]
            with _device_context(self.device):
                like = xp.zeros((len(entries), *mshape), dtype=dtype, device=self.device)
                st.state = core_functional.init(self.spec, like, _spec_hp(self.spec, hp), state_dtype=sd)
            self._stacks.append(st)

    def _viewable(self, a: Any) -> bool:
        if self._kind in ("numpy", "cupy"):
            return bool(a.flags.c_contiguous)
        if self._kind == "torch":
            return bool(a.is_contiguous())
        return False

    def _segments(self, b: _Bucket) -> list[_Segment]:
        xp = self.xp
        chunk = self.chunk_size
        segs: list[_Segment] = []
        pack: list[_Entry] = []

        def close() -> None:
            if pack:
                segs.append(_Segment(list(pack), pack[0].offset, sum(e.size for e in pack)))
                pack.clear()

        for e in b.entries:
            # Arrays of at least half a one-thread chunk are stepped through views of themselves (packing them
            # would add a gather and a scatter pass), whatever the chunk size.
            large = chunk is None or e.size >= min(chunk, DEFAULT_CHUNK_SIZE) // 2
            if large and self._viewable(e.array) and (chunk is not None or len(b.entries) == 1):
                close()
                segs.append(_Segment([e], e.offset, e.size, view=xp.reshape(e.array, (-1,))))
                continue
            if chunk is not None and pack and sum(x.size for x in pack) + e.size > chunk:
                close()
            pack.append(e)
        close()
        return segs

    # -- hyperparameters ----------------------------------------------------------------------

    def _group_hp(self, gi: int) -> tuple[dict, dict | None]:
        g = self.param_groups[gi]
        hp = self.spec.validate(**{k: v for k, v in g.items() if k not in _GROUP_EXTRA_KEYS})
        fb = None
        if self.fallback_spec is not None:
            fb = self.fallback_spec.validate(**{"lr": hp["lr"], **dict(g.get("fallback_hyperparams", {}))})  # lr follows the group's
        return hp, fb

    def set_hyperparams(self, group: int | None = None, **hyperparams: Any) -> None:
        """Validate and set hyperparameters for one group (``group=i``) or all groups.

        Args:
            group: the group index, or ``None`` for every group.
            **hyperparams: new values (``lr=...``); ``fallback_hyperparams={...}`` updates the
                fallback rule's.

        Raises:
            TypeError, ValueError: as ``spec.validate``; nothing is changed then.
        """
        idx = range(len(self.param_groups)) if group is None else [group]
        fbh = hyperparams.pop("fallback_hyperparams", None)
        if fbh is not None and self.fallback_spec is None:
            raise TypeError(f"{self.spec.title} is elementwise: fallback_hyperparams apply to Muon and DeVASinf only")
        staged = []
        for i in idx:
            g = self.param_groups[i]
            hp = {k: v for k, v in g.items() if k not in _GROUP_EXTRA_KEYS}
            hp.update(hyperparams)
            self.spec.validate(**hp)
            new_fb = None
            if fbh is not None:
                new_fb = {**g["fallback_hyperparams"], **fbh}
                self.fallback_spec.validate(**new_fb)
            staged.append((g, new_fb))
        for g, new_fb in staged:
            g.update(hyperparams)
            if new_fb is not None:
                g["fallback_hyperparams"] = new_fb

    @property
    def hyperparams(self) -> dict:
        """The hyperparameters of group 0 (a copy; write through ``set_hyperparams``)."""
        return {k: v for k, v in self.param_groups[0].items() if k != "params"}

    @property
    def lr(self) -> Any:
        """Learning rate of group 0; setting it sets every group's (validated)."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: Any) -> None:
        self.set_hyperparams(lr=value)

    @property
    def step_count(self) -> int:
        """Number of steps taken."""
        return self._step

    @property
    def fused(self) -> bool | None:
        """True when every elementwise bucket runs as one fused kernel (CuPy: ``cupy.fuse``; NumPy: a compiled C
        loop), False when one runs op by op (:attr:`fuse_notes` says why); None before the first step and for
        other namespaces."""
        flags = [b.fused for b in self._buckets if b.fused is not None]
        return None if not flags else all(flags)

    @property
    def fuse_notes(self) -> list[str]:
        """Why each bucket that runs op by op is not fused (``"<rule> <dtype>: <reason>"``)."""
        return [f"{b.spec.title} {_numpy_dtype(b.dtype) if self._kind == 'numpy' else b.dtype}: {b.fuse_note}" for b in self._buckets if b.fused is False]

    # -- checks -------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        for e in self._entries:
            if self._kind == "numpy" and not e.array.flags.writeable:
                raise ValueError(
                    f"parameter {e.key!r} is a read-only NumPy array: the stateful optimizer updates arrays in "
                    "place; pass a writable array (numpy.array(x)) or use the pure "
                    "xpoptim.adapters.array.functional(...).init/update"
                )

    def _match(self, values: Any, what: str) -> list:
        """``values`` (same structure as params) as a list in entry order."""
        n = len(self._entries)
        if self._named:
            if not isinstance(values, Mapping):
                raise TypeError(f"{what} must be a dict with the parameter names as keys, got {type(values).__name__}")
            keys = [e.key for e in self._entries]
            missing = [k for k in keys if k not in values]
            extra = [k for k in values if k not in set(keys)]
            if missing or extra:
                raise ValueError(f"{what}: keys do not match the parameters (missing {missing}, unexpected {extra})")
            return [self._coerce(values[k]) for k in keys]
        if isinstance(values, Mapping) or _is_array(values) or isinstance(values, (str, bytes)):
            raise TypeError(f"{what} must be a list of arrays in parameter order, got {type(values).__name__}")
        out = [self._coerce(v) for v in values]
        if len(out) != n:
            raise ValueError(f"{what}: got {len(out)} arrays for {n} parameters")
        return out

    def _coerce(self, v: Any) -> Any:
        # NumPy returns scalars (numpy.float64) from operations on 0-D arrays: accept them.
        return np.asarray(v) if self._kind == "numpy" and isinstance(v, np.generic) else v

    def _check_inputs(self, arrays: list, what: str) -> None:
        if self._kind == "numpy":
            # Fast path (thousands of small arrays): the full check below only to word the error.
            ok = True
            for e, g in zip(self._entries, arrays):
                if type(g) is not np.ndarray or g.shape != e.shape or g.dtype != e.array.dtype:
                    ok = False
                    break
            if ok:
                return
        for e, g in zip(self._entries, arrays):
            if g is None:
                raise ValueError(f"{what}[{e.key!r}] is None: every parameter needs a {what} array")
            if not _is_array(g) or _backend_name(g) != self._kind or (self._kind == "other" and array_api_compat.array_namespace(g) is not self.xp):
                raise TypeError(f"{what}[{e.key!r}] is a {type(g).__name__}: expected an array of the parameters' namespace")
            if tuple(g.shape) != e.shape:
                raise ValueError(f"{what}[{e.key!r}] has shape {tuple(g.shape)}: expected the parameter's shape {e.shape}")
            if g.dtype != e.array.dtype:
                raise ValueError(f"{what}[{e.key!r}] has dtype {g.dtype}: expected the parameter's dtype {e.array.dtype}")
            if array_api_compat.device(g) != self.device:
                raise ValueError(f"{what}[{e.key!r}] is on device {array_api_compat.device(g)}: expected {self.device}")

    # -- the step -----------------------------------------------------------------------------

    def step(self, grads: Any, **extras: Any) -> None:
        """Take one step: update every parameter array in place.

        Args:
            grads: gradients, same structure as ``params`` (a list in parameter order, or a dict).
            **extras: the rule's extra inputs by name (``grad_variance=`` for ``msvag_mb`` and
                ``adam_star_mb``), same structure as ``grads``.

        Raises:
            TypeError, ValueError: a mismatch in structure, shape, dtype, namespace or device, a
                read-only parameter, an invalid hyperparameter; parameters and state are unchanged.
        """
        g_list = self._match(grads, "grads")
        self._check_inputs(g_list, "grads")
        needed = self._needed_extras()
        unknown = sorted(set(extras) - set(needed))
        if unknown:
            raise TypeError(f"{self.spec.title}: unknown extra input(s) {unknown}; expected {sorted(needed)}")
        x_lists = {}
        for name in needed:
            if name not in extras:
                raise TypeError(f"{self.spec.title} needs the extra input {name}= (same structure as grads)")
            x_lists[name] = self._match(extras[name], name)
            self._check_inputs(x_lists[name], name)
        self._check_writable()
        hps = [self._group_hp(i) for i in range(len(self.param_groups))]
        t = self._step + 1
        pos = self._pos
        xp = self.xp
        with _device_context(self.device), _no_grad(self._kind):
            # Matrix rules first: pure, so a failure there leaves everything untouched.
            pending = []
            for st in self._stacks:
                hp = _spec_hp(self.spec, hps[st.group][0])
                ps = xp.stack([_reshape(xp, e.array, st.mshape) for e in st.entries])
                gs = xp.stack([_reshape(xp, g_list[pos[id(e)]], st.mshape) for e in st.entries])
                new_p, new_state = core_functional.step(
                    self.spec, ps, gs, st.state, hp, t, maximize=self.maximize, layout=self.layout
                )
                pending.append((st, new_p, new_state))
            for b in self._buckets:
                hp = hps[b.group][0] if b.role == "main" else hps[b.group][1]
                self._run_bucket(b, g_list, x_lists, pos, hp, t)
            for st, new_p, new_state in pending:
                for i, e in enumerate(st.entries):
                    v = _reshape(xp, new_p[i, ...], e.shape)
                    e.array[...] = v if v.dtype == e.array.dtype else xp.astype(v, e.array.dtype)
                st.state = new_state
        self._step = t

    def _needed_extras(self) -> tuple:
        specs = [b.spec for b in self._buckets]
        names: list = []
        for s in specs:
            for n in s.extras:
                if n not in names:
                    names.append(n)
        return tuple(names)

    def _kernel(self, b: _Bucket, hp: dict) -> tuple:
        static = b.spec.static(hp)
        key = tuple(sorted((k, repr(v)) for k, v in static.items()))
        if key not in b.kernels:
            kernel = make_step_kernel(b.spec, self.xp, static, maximize=self.maximize)
            fused = None
            if self._kind == "cupy":
                fused = False
                if not self.fuse:
                    b.fuse_note = "fuse=False"
                elif not b.spec.is_fusable(hp):
                    b.fuse_note = f"{b.spec.title} with {static} calls a non-fusable function (erf)"
                elif b.state_dtype != b.dtype:
                    b.fuse_note = "state dtype differs from the parameter dtype"
                else:
                    fused = _make_fused_inplace(kernel, len(b.spec.extras), len(b.spec.state))
                if fused is False:
                    _warn_unfused(b)
            elif self._kind == "numpy":
                fused = self._compile_numpy(b, hp, static)
            b.kernels[key] = [kernel, fused]
        return b.kernels[key]

    def _compile_numpy(self, b: _Bucket, hp: dict, static: dict) -> Any:
        """The core step kernel as one compiled C loop (:mod:`._cfuse`), or False (op by op; ``b.fuse_note`` says why)."""
        b.fused = False
        if not self.fuse:
            b.fuse_note = "fuse=False"
            return False
        if b.state_dtype != b.dtype:
            b.fuse_note = "state dtype differs from the parameter dtype"
            return False
        if not b.spec.is_fusable(hp):
            b.fuse_note = f"{b.spec.title} with {static} calls erf, which has no exact C form shared with NumPy"
            return False
        n_extra, n_state = len(b.spec.extras), len(b.spec.state)
        n_arrays = 2 + n_extra + n_state
        spec, maximize = b.spec, self.maximize
        try:
            ck = _cfuse.compile_kernel(
                lambda xp: make_step_kernel(spec, xp, static, maximize=maximize),
                _numpy_dtype(b.dtype),
                n_arrays,
                len(step_scalars(spec, hp, 1, HOST)),
                [0, *range(2 + n_extra, n_arrays)],
            )
        except _cfuse.TraceError as exc:
            b.fuse_note = f"not compiled: {exc}"
            return False
        b.fused = True
        b.fuse_note = ""
        return ck

    def _run_bucket(self, b: _Bucket, g_list: list, x_lists: dict, pos: dict, hp: dict, t: int) -> None:
        xp = self.xp
        kernel_slot = self._kernel(b, hp)
        scalars = step_scalars(b.spec, hp, t, HOST)
        chunk = self.chunk_size
        xnames = b.spec.extras
        # NumPy with several threads: every chunk of every segment is one task (NumPy releases the GIL in its
        # loops; tasks write disjoint slices, and each pack has its own buffers), so that many arrays smaller
        # than a chunk (layout B) share the threads as well as one large array does.
        threaded = self._kind == "numpy" and self.threads > 1
        # The compiled loop's host scalars, once per bucket and step (None: op by op, e.g. for a NumPy-scalar lr).
        fused = kernel_slot[1]
        host = fused.host_scalars(scalars) if isinstance(fused, _cfuse.CKernel) else None
        compiled = host is not None
        if threaded and chunk is not None and compiled:
            # One compiled pass is bandwidth-bound: larger tasks (fewer hand-offs) measured faster (16M AdamW, 2
            # threads: 9.5 ms in 256k tasks, 7.5-8.0 ms in 4M tasks; one thread 9-10 ms).
            chunk = max(chunk, COMPILED_TASK_SIZE)
        tasks: list = []
        sizes: list[int] = []
        for seg in b.segments:
            if seg.view is not None:
                e = seg.entries[0]
                i = pos[id(e)]
                p = seg.view
                g = xp.reshape(g_list[i], (-1,))
                xs = [xp.reshape(x_lists[n][i], (-1,)) for n in xnames]
                if threaded and chunk is not None and seg.size > chunk:
                    for a in range(0, seg.size, chunk):
                        z = min(seg.size, a + chunk)
                        tasks.append((self._run_span, (b, kernel_slot, p[a:z], g[a:z], [x[a:z] for x in xs], seg.offset + a, z - a, scalars, None, host)))
                        sizes.append(z - a)
                else:
                    tasks.append((self._run_span, (b, kernel_slot, p, g, xs, seg.offset, seg.size, scalars, chunk, host)))
                    sizes.append(seg.size)
                continue
            tasks.append((self._run_pack, (b, kernel_slot, seg, g_list, x_lists, pos, scalars, chunk, host)))
            sizes.append(seg.size)
        if threaded and compiled and len(tasks) > self.threads:
            # Many small compiled tasks (hundreds of arrays, layout B): run them in a few groups of consecutive
            # tasks, about min(COMPILED_TASK_SIZE, bucket / threads) elements each, rather than one hand-off each.
            tasks = _grouped(tasks, sizes, min(COMPILED_TASK_SIZE, -(-b.size // self.threads)))
        if threaded and len(tasks) > 1:
            if not compiled:
                _tune_glibc_malloc()
            list(_pool(self.threads).map(_call, tasks))
        else:
            for fn, args in tasks:
                fn(*args)

    def _run_pack(self, b: _Bucket, kernel_slot: list, seg: _Segment, g_list: list, x_lists: dict, pos: dict, scalars: tuple, chunk: int | None, host: Any = None) -> None:
        """A pack of small arrays: gather them into the pack's buffers, run the kernel, scatter back (op by op).

        Compiled on NumPy, the parameters are updated where they are (the loop takes their addresses): only the
        gradients (and extra inputs) are gathered, and nothing is scattered. ``host``: the compiled loop's host
        scalars (``None``: op by op)."""
        xp = self.xp
        fused = kernel_slot[1]
        if host is not None and self._packable(seg, fused.dtype):
            _, g, xs = self._gather(seg, g_list, x_lists, pos, b.spec.extras, with_params=False)
            off, n = seg.offset, seg.size
            fused.packed(seg.sizes, seg.pointers, [g, *xs, *(b.state[k][off : off + n] for k in b.spec.state)], host)
            return
        p, g, xs = self._gather(seg, g_list, x_lists, pos, b.spec.extras)
        self._run_span(b, kernel_slot, p, g, xs, seg.offset, seg.size, scalars, chunk, host)
        if self._kind == "numpy":
            for e in seg.entries:
                a = e.offset - seg.offset
                e.array[...] = p[a : a + e.size].reshape(e.shape)
            return
        for e in seg.entries:
            a = e.offset - seg.offset
            e.array[...] = _reshape(xp, p[a : a + e.size], e.shape)

    @staticmethod
    def _packable(seg: _Segment, dtype: np.dtype) -> bool:
        """Can the compiled loop update this pack's parameters through their addresses (every one C-contiguous, of
        the loop's dtype)? Decided once per pack: a NumPy array's address, layout and dtype do not change while
        the optimizer holds it (``resize`` refuses an array referenced elsewhere)."""
        if seg.pointers is None:
            ok = all(e.array.flags.c_contiguous and e.array.dtype == dtype for e in seg.entries)
            seg.pointers = np.array([e.array.ctypes.data for e in seg.entries], dtype=np.uintp) if ok else False
            seg.sizes = np.array([e.size for e in seg.entries], dtype=np.int64)
        return seg.pointers is not False

    def _gather(self, seg: _Segment, g_list: list, x_lists: dict, pos: dict, xnames: tuple, with_params: bool = True) -> tuple:
        xp = self.xp
        idx = [pos[id(e)] for e in seg.entries]
        srcs = {"p": [e.array for e in seg.entries]} if with_params else {}
        srcs["g"] = [g_list[i] for i in idx]
        for n in xnames:
            srcs[n] = [x_lists[n][i] for i in idx]
        if self._kind == "numpy":
            if seg.buffers is None:
                seg.buffers = {}
            for k, arrs in srcs.items():
                if k not in seg.buffers:
                    seg.buffers[k] = np.empty(seg.size, dtype=seg.entries[0].array.dtype)
                np.concatenate(arrs, axis=None, out=seg.buffers[k])
            bufs = seg.buffers
        else:
            bufs = {k: xp.concat([xp.reshape(a, (-1,)) for a in arrs]) for k, arrs in srcs.items()}
        return bufs["p"] if with_params else None, bufs["g"], [bufs[n] for n in xnames]

    def _run_span(self, b: _Bucket, kernel_slot: list, p: Any, g: Any, xs: list, off: int, n: int, scalars: tuple, chunk: int | None, host: Any = None) -> None:
        """Run the kernel over ``p[0:n]`` (flat, written in place) and state ``[off, off+n)``; compiled when
        ``host`` (the compiled loop's host scalars) is given."""
        xp = self.xp
        kernel, fused = kernel_slot
        names = b.spec.state
        sd = b.state_dtype
        if host is not None:
            states = [b.state[k][off : off + n] for k in names]
            arrays = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in (g, *xs)]
            fused(n, [p, *arrays, *states], host)
            return
        if self._kind == "cupy" and fused:
            states = [b.state[k][off : off + n] if (off, n) != (0, b.size) else b.state[k] for k in names]
            typed = tuple(np.dtype(str(sd).split(".")[-1]).type(s) for s in scalars)
            errors = []
            while kernel_slot[1]:
                try:
                    kernel_slot[1][0](p, g, *xs, *states, *typed)
                    b.fused = True
                    kernel_slot[1] = kernel_slot[1][:1]  # keep the variant that compiled
                    return
                except Exception as exc:  # compilation failed: nothing was written
                    errors.append(f"{type(exc).__name__}: {exc}")
                    kernel_slot[1] = kernel_slot[1][1:]
            kernel_slot[1] = False
            b.fuse_note = "cupy.fuse failed: " + "; ".join(errors)
            _warn_unfused(b)
        if b.fused is None and self._kind == "cupy":
            b.fused = bool(kernel_slot[1])
        step = n if chunk is None else chunk
        if self._kind == "numpy" and step < n:
            _tune_glibc_malloc()

        def run(a: int) -> None:
            z = min(n, a + step)
            whole = a == 0 and z == n
            pc = p if whole else p[a:z]
            gc = g if whole else g[a:z]
            xc = [x if whole else x[a:z] for x in xs]
            if pc.dtype != sd:
                pc = xp.astype(pc, sd)
                gc = xp.astype(gc, sd)
            full = (off + a, off + z) == (0, b.size)
            st = [b.state[k] if full else b.state[k][off + a : off + z] for k in names]
            out = kernel(pc, gc, *xc, *st, *scalars)
            new_p = out[0] if out[0].dtype == p.dtype else xp.astype(out[0], p.dtype)
            if whole:
                p[...] = new_p
            else:
                p[a:z] = new_p
            for k, v in zip(names, out[1:]):
                if v.dtype != sd:
                    v = xp.astype(v, sd)
                if full and self._kind != "numpy":
                    b.state[k] = v  # rebind: the buffer is ours
                else:
                    b.state[k][off + a : off + z] = v

        for a in range(0, n, step):
            run(a)

    # -- state dict ---------------------------------------------------------------------------

    def _entry_state(self) -> dict:
        xp = self.xp
        out: dict = {}
        for b in self._buckets:
            for e in b.entries:
                out[e.key] = {k: _reshape(xp, b.state[k][e.offset : e.offset + e.size], e.shape) for k in b.spec.state}
        for st in self._stacks:
            for e in st.entries:
                out[e.key] = {k: (None if v is None else v[e.index, ...]) for k, v in st.state.items()}
        return out

    def state_dict(self) -> dict:
        """A checkpoint with NumPy arrays only (see the module docstring for the format).

        Returns:
            ``{"version", "optimizer", "step", "param_groups", "state"}``; arrays are copies.
        """
        per = self._entry_state()
        groups = []
        for gi, g in enumerate(self.param_groups):
            d = {k: v for k, v in g.items() if k != "params"}
            if "fallback_hyperparams" in d:
                d["fallback_hyperparams"] = dict(d["fallback_hyperparams"])
            d["keys"] = [e.key for e in self._entries if e.group == gi]
            groups.append(d)
        return {
            "version": STATE_VERSION,
            "optimizer": self.spec.name,
            "step": self._step,
            "param_groups": groups,
            "state": {e.key: {k: (None if v is None else _to_numpy(v)) for k, v in per[e.key].items()} for e in self._entries},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a checkpoint from ``state_dict()`` (of any backend's array optimizer).

        Hyperparameters, the step count and every state array are restored. Everything is checked
        first; on any error nothing changes.

        Raises:
            ValueError: another version, optimizer, parameter set, state name, shape or dtype kind.
            TypeError: not a mapping.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("version", "optimizer", "step", "param_groups", "state") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing the key(s) {missing}")
        if state_dict["version"] != STATE_VERSION:
            raise ValueError(f"state_dict version={state_dict['version']!r} is not supported: expected {STATE_VERSION}")
        if state_dict["optimizer"] not in (self.spec.name, self.spec.title):
            raise ValueError(f"state_dict optimizer={state_dict['optimizer']!r} does not match this optimizer ({self.spec.name!r})")
        step = state_dict["step"]
        if isinstance(step, np.ndarray) and step.ndim == 0 and step.dtype.kind in "iu":
            step = step.item()  # numpy.savez / numpy.load give a 0-D array
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"state_dict step={step!r} is invalid: expected an integer >= 0")
        groups = state_dict["param_groups"]
        if not isinstance(groups, Sequence) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, Sequence) else groups!r} param groups: expected {len(self.param_groups)}")
        new_groups = []
        for gi, sg in enumerate(groups):
            want = [e.key for e in self._entries if e.group == gi]
            if list(sg.get("keys", [])) != want:
                raise ValueError(f"state_dict param group {gi} has keys {sg.get('keys')!r}: expected {want}")
            hp = {k: v for k, v in sg.items() if k not in ("keys", "fallback_hyperparams", "params")}
            self.spec.validate(**hp)
            fbh = None
            if self.fallback_spec is not None:
                fbh = dict(sg.get("fallback_hyperparams", self.param_groups[gi]["fallback_hyperparams"]))
                self.fallback_spec.validate(**fbh)
            new_groups.append((hp, fbh))
        st = state_dict["state"]
        if not isinstance(st, Mapping):
            raise ValueError("state_dict['state'] must be a dict keyed by parameter")
        keys = [e.key for e in self._entries]
        if set(st.keys()) != set(keys):
            raise ValueError(
                f"state_dict['state'] keys do not match the parameters (missing {[k for k in keys if k not in st]}, "
                f"unexpected {[k for k in st if k not in set(keys)]})"
            )
        current = self._entry_state()
        staged: dict = {}
        for e in self._entries:
            entry = st[e.key]
            cur = current[e.key]
            if not isinstance(entry, Mapping) or set(entry) != set(cur):
                got = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
                raise ValueError(f"state_dict['state'][{e.key!r}] has state {got}: expected {sorted(cur)}")
            staged[e.key] = {}
            for k, ref in cur.items():
                v = entry[k]
                if ref is None or v is None:
                    if (ref is None) != (v is None):
                        raise ValueError(f"state_dict['state'][{e.key!r}][{k!r}] is {'None' if v is None else 'an array'}: expected {'None' if ref is None else 'an array'}")
                    staged[e.key][k] = None
                    continue
                arr = _to_numpy(v) if _is_array(v) else np.asarray(v)
                if tuple(arr.shape) != tuple(ref.shape):
                    raise ValueError(f"state_dict['state'][{e.key!r}][{k!r}] has shape {tuple(arr.shape)}: expected {tuple(ref.shape)}")
                if arr.dtype.kind != "f":
                    raise ValueError(f"state_dict['state'][{e.key!r}][{k!r}] has dtype {arr.dtype}: expected a real floating dtype")
                staged[e.key][k] = arr
        # Build the new storage (host side first, then one transfer per buffer), then commit.
        xp = self.xp
        new_b = []
        for b in self._buckets:
            sd_np = _numpy_dtype(b.state_dtype)
            bufs = {}
            for k in b.spec.state:
                host = np.concatenate([np.reshape(staged[e.key][k], -1).astype(sd_np, copy=False) for e in b.entries])
                with _device_context(self.device):
                    bufs[k] = _from_numpy(xp, host, self.device, b.state_dtype)
            new_b.append(bufs)
        new_s = []
        for stk in self._stacks:
            sd_np = _numpy_dtype(stk.state_dtype)
            bufs = {}
            for k, v in stk.state.items():
                if v is None:
                    bufs[k] = None
                    continue
                host = np.stack([staged[e.key][k].astype(sd_np, copy=False) for e in stk.entries])
                with _device_context(self.device):
                    bufs[k] = _from_numpy(xp, host, self.device, v.dtype)
            new_s.append(bufs)
        for b, bufs in zip(self._buckets, new_b):
            if self._kind == "numpy":
                for k in b.spec.state:
                    b.state[k][...] = bufs[k]
            else:
                b.state = bufs
        for stk, bufs in zip(self._stacks, new_s):
            stk.state = bufs
        for g, (hp, fbh) in zip(self.param_groups, new_groups):
            for k in [k for k in g if k not in _GROUP_EXTRA_KEYS]:
                del g[k]
            g.update(hp)
            if fbh is not None:
                g["fallback_hyperparams"] = fbh
        self._step = int(step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._entries)} arrays, {len(self.param_groups)} group(s), step {self._step})"

    def export_state(self) -> Any:
        """The framework-neutral state (:class:`xpoptim.portable.PortableState`); see :mod:`xpoptim.portable`."""
        from xpoptim.portable.array_state import export_array  # noqa: PLC0415

        return export_array(self)

    def import_state(self, portable: Any) -> None:
        """Load a :class:`xpoptim.portable.PortableState` (keys ``str(key)``); hyperparameters are kept."""
        from xpoptim.portable.array_state import import_array  # noqa: PLC0415

        import_array(self, portable)


_POOLS: dict = {}
if hasattr(os, "register_at_fork"):
    # A forked child inherits the pools but not their threads: a task sent to one would never run. The child
    # starts its own pools instead.
    os.register_at_fork(after_in_child=_POOLS.clear)


#: glibc ``mallopt`` settings applied once, the first time a NumPy bucket is stepped in chunks (``M_MMAP_THRESHOLD``
#: 4 MiB, ``M_TOP_PAD`` 16 MiB). Set ``XPOPTIM_MALLOPT=0`` in the environment to leave the allocator alone.
MALLOPT_SETTINGS = ((-3, 4 << 20), (-2, 16 << 20))
_MALLOPT_DONE: list[bool] = []


def _tune_glibc_malloc() -> None:
    """Keep chunk temporaries out of the page-fault path (glibc only; once per process).

    A chunked NumPy step allocates a dozen 256 KiB temporaries per chunk. With glibc's defaults the top of the
    heap is handed back to the OS whenever more than twice the (dynamic) mmap threshold is free there, so each chunk
    can fault its temporaries in again; whether that happens depends on what else sits at the top of the heap
    (measured on 16M float32 parameters, NumPy only: AdamW 118-200 ms per step in some processes, 33 ms in others;
    with these settings 33 ms in every process). A fixed 4 MiB mmap threshold is within the range glibc's own
    dynamic threshold moves in (up to 32 MiB); a 16 MiB top pad keeps at most that much freed memory mapped.
    """
    if _MALLOPT_DONE:
        return
    _MALLOPT_DONE.append(True)
    import os  # noqa: PLC0415
    import platform  # noqa: PLC0415

    if os.environ.get("XPOPTIM_MALLOPT", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return
    try:
        import ctypes  # noqa: PLC0415

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for param, value in MALLOPT_SETTINGS:
        mallopt(param, value)


def _call(task: tuple) -> Any:
    fn, args = task
    return fn(*args)


def _call_all(tasks: list) -> None:
    for fn, args in tasks:
        fn(*args)


def _grouped(tasks: list, sizes: list[int], target: int) -> list:
    """Consecutive tasks joined into tasks of at least ``target`` elements (the last one may be smaller)."""
    out: list = []
    group: list = []
    total = 0
    for task, n in zip(tasks, sizes):
        group.append(task)
        total += n
        if total >= target:
            out.append((_call_all, (group,)))
            group, total = [], 0
    if group:
        out.append((_call_all, (group,)))
    return out


def _pool(n: int) -> Any:
    if n not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="xpoptim-array")
    return _POOLS[n]


def _numpy_dtype(dtype: Any) -> np.dtype:
    s = str(dtype).split(".")[-1]
    if s == "bfloat16":
        return np.dtype(np.float32)
    return np.dtype(s)


def _spec_hp(spec: Any, hp: Mapping[str, Any]) -> dict:
    return {k: v for k, v in hp.items() if k not in _GROUP_EXTRA_KEYS}


def _warn_unfused(b: _Bucket) -> None:
    b.fused = False
    warnings.warn(f"{b.spec.title}: the CuPy step runs op by op, not as one fused kernel ({b.fuse_note})", UserWarning, stacklevel=4)


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


# ----------------------------------------------------------------------------------------------
# The functional layer
# ----------------------------------------------------------------------------------------------


class FunctionalOptimizer:
    """Pure ``init`` / ``update`` over a list or dict of arrays (any namespace, JAX included).

    ``state = {"version", "optimizer", "step", "state": {key: {name: array}}}`` with arrays in the
    parameters' namespace (the ``state`` part has the layout of ``Optimizer.state_dict()``).
    ``update`` runs ``xpoptim.core.functional.step`` per array (eager: not meant for ``jax.jit``;
    use the optax adapter there), routing as the stateful optimizer does.

    Args:
        optimizer: registry name or title.
        maximize, layout, fallback, fallback_hyperparams, state_dtype: as :class:`Optimizer`.
        **hyperparams: the optimizer's hyperparameters.
    """

    def __init__(
        self,
        optimizer: str,
        *,
        maximize: bool = False,
        layout: str = "out_in",
        fallback: str | None = None,
        fallback_hyperparams: Mapping[str, Any] | None = None,
        state_dtype: Any = None,
        **hyperparams: Any,
    ) -> None:
        self.spec = get_spec(optimizer)
        if not isinstance(maximize, bool):
            raise ValueError(f"maximize={maximize!r} is invalid: expected True or False")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout={layout!r} is invalid: expected one of {_LAYOUTS}")
        self.maximize, self.layout, self.state_dtype = maximize, layout, state_dtype
        self.hyperparams = self.spec.validate(**hyperparams)
        self.fallback_spec = None
        self.fallback_hyperparams = None
        if isinstance(self.spec, MatrixSpec):
            self.fallback_spec, base = self.spec.resolve_fallback(fallback, fallback_hyperparams)
            self.fallback_hyperparams = self.fallback_spec.validate(**{"lr": self.hyperparams["lr"], **base})  # lr follows lr
        elif fallback is not None or fallback_hyperparams is not None:
            raise TypeError(f"{self.spec.title} is elementwise: fallback/fallback_hyperparams apply to Muon and DeVASinf only")

    def _items(self, params: Any, what: str) -> tuple[list, list, bool]:
        if isinstance(params, Mapping):
            return list(params.keys()), list(params.values()), True
        if _is_array(params) or isinstance(params, (str, bytes)):
            raise TypeError(f"{what} must be a list or dict of arrays, got {type(params).__name__}")
        vals = list(params)
        return list(range(len(vals))), vals, False

    def _route(self, x: Any) -> tuple:
        if isinstance(self.spec, MatrixSpec) and x.ndim >= 2:
            return self.spec, self.hyperparams, _matrix_shape(tuple(x.shape), self.layout)
        if isinstance(self.spec, MatrixSpec):
            return self.fallback_spec, self.fallback_hyperparams, None
        return self.spec, self.hyperparams, None

    def init(self, params: Any) -> dict:
        """Zero state for ``params`` (a list or dict of arrays)."""
        keys, vals, _ = self._items(params, "params")
        state = {}
        for k, p in zip(keys, vals):
            spec, hp, mshape = self._route(p)
            xp = array_api_compat.array_namespace(p)
            like = p if mshape is None else xp.reshape(p, mshape)
            sd = _default_state_dtype(xp, p.dtype, self.state_dtype)
            state[k] = core_functional.init(spec, like, hp, state_dtype=sd)
        return {"version": STATE_VERSION, "optimizer": self.spec.name, "step": 0, "state": state}

    def update(self, grads: Any, state: Mapping[str, Any], params: Any, **extras: Any) -> tuple[Any, dict]:
        """One step; returns ``(new_params, new_state)`` with the structure of ``params``.

        Args:
            grads: gradients, same structure as ``params``.
            state: from ``init`` or the previous ``update``.
            params: the current parameters (not modified).
            **extras: extra inputs (``grad_variance=``), same structure.

        Raises:
            ValueError, TypeError: mismatched structure, shapes or dtypes, or a foreign state.
        """
        keys, vals, named = self._items(params, "params")
        gkeys, gvals, _ = self._items(grads, "grads")
        if gkeys != keys:
            raise ValueError(f"grads: structure does not match params (keys {gkeys} vs {keys})")
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION or state.get("optimizer") != self.spec.name:
            raise ValueError(f"state is not a {self.spec.title} state of version {STATE_VERSION} (use init(params))")
        if set(state["state"]) != set(keys):
            raise ValueError("state: keys do not match params")
        xl = {}
        for name, v in extras.items():
            xk, xv, _ = self._items(v, name)
            if xk != keys:
                raise ValueError(f"{name}: structure does not match params")
            xl[name] = xv
        t = int(state["step"]) + 1
        new_p, new_s = [], {}
        for i, (k, p, g) in enumerate(zip(keys, vals, gvals)):
            if tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
                raise ValueError(f"grads[{k!r}] has shape {tuple(g.shape)} and dtype {g.dtype}: expected {tuple(p.shape)} and {p.dtype}")
            spec, hp, mshape = self._route(p)
            xp = array_api_compat.array_namespace(p, g)
            ex = tuple(xl[n][i] for n in spec.extras) if isinstance(spec, ElementwiseSpec) else ()
            if isinstance(spec, ElementwiseSpec) and len(ex) != len(spec.extras):
                raise TypeError(f"{spec.title} needs the extra input(s) {spec.extras}")
            if mshape is not None:
                np_, ns = core_functional.step(
                    spec, xp.reshape(p, mshape), xp.reshape(g, mshape), state["state"][k], hp, t, maximize=self.maximize, layout=self.layout
                )
                np_ = xp.reshape(np_, tuple(p.shape))
                if np_.dtype != p.dtype:
                    np_ = xp.astype(np_, p.dtype)
            else:
                np_, ns = core_functional.step(spec, p, g, state["state"][k], hp, t, extras=ex, maximize=self.maximize)
            new_p.append(np_)
            new_s[k] = ns
        out = dict(zip(keys, new_p)) if named else (type(params)(new_p) if isinstance(params, (list, tuple)) else new_p)
        return out, {"version": STATE_VERSION, "optimizer": self.spec.name, "step": t, "state": new_s}


    def state_dict(self, state: Mapping[str, Any]) -> dict:
        """The functional ``state`` as a NumPy checkpoint (the format of ``Optimizer.state_dict()``).

        Args:
            state: from ``init`` / ``update``.

        Returns:
            A dict that ``Optimizer.load_state_dict`` of any backend (or :meth:`load_state_dict`)
            accepts.
        """
        group = dict(self.hyperparams)
        if self.fallback_hyperparams is not None:
            group["fallback_hyperparams"] = dict(self.fallback_hyperparams)
        group["keys"] = list(state["state"].keys())
        return {
            "version": STATE_VERSION,
            "optimizer": self.spec.name,
            "step": int(state["step"]),
            "param_groups": [group],
            "state": {k: {n: (None if v is None else _to_numpy(v)) for n, v in e.items()} for k, e in state["state"].items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], params: Any) -> dict:
        """A functional state from a checkpoint, with arrays like ``params`` (namespace, device).

        The checkpoint's hyperparameters are not applied (this object's are fixed at creation).

        Args:
            state_dict: from ``Optimizer.state_dict()`` or :meth:`state_dict`.
            params: the parameters the state is for (a list or dict of arrays).

        Returns:
            The state for :meth:`update`.

        Raises:
            ValueError: another version, optimizer, parameter set, state name or shape.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for k in ("version", "optimizer", "step", "state"):
            if k not in state_dict:
                raise ValueError(f"state_dict is missing the key {k!r}")
        if state_dict["version"] != STATE_VERSION:
            raise ValueError(f"state_dict version={state_dict['version']!r} is not supported: expected {STATE_VERSION}")
        if state_dict["optimizer"] not in (self.spec.name, self.spec.title):
            raise ValueError(f"state_dict optimizer={state_dict['optimizer']!r} does not match this optimizer ({self.spec.name!r})")
        ref = self.init(params)
        keys = list(ref["state"])
        st = state_dict["state"]
        if not isinstance(st, Mapping) or set(st) != set(keys):
            raise ValueError("state_dict['state'] keys do not match params")
        _, vals, _ = self._items(params, "params")
        out = {}
        for key, p in zip(keys, vals):
            cur = ref["state"][key]
            entry = st[key]
            if not isinstance(entry, Mapping) or set(entry) != set(cur):
                raise ValueError(f"state_dict['state'][{key!r}] has state {sorted(entry) if isinstance(entry, Mapping) else entry!r}: expected {sorted(cur)}")
            xp = array_api_compat.array_namespace(p)
            out[key] = {}
            for n, r in cur.items():
                v = entry[n]
                if (r is None) != (v is None):
                    raise ValueError(f"state_dict['state'][{key!r}][{n!r}]: expected {'None' if r is None else 'an array'}")
                if r is None:
                    out[key][n] = None
                    continue
                host = _to_numpy(v) if _is_array(v) else np.asarray(v)
                if tuple(host.shape) != tuple(r.shape) or host.dtype.kind != "f":
                    raise ValueError(f"state_dict['state'][{key!r}][{n!r}] has shape {host.shape} and dtype {host.dtype}: expected {tuple(r.shape)}, floating")
                out[key][n] = _from_numpy(xp, host.astype(_numpy_dtype(r.dtype), copy=False), array_api_compat.device(p), r.dtype)
        return {"version": STATE_VERSION, "optimizer": self.spec.name, "step": int(state_dict["step"]), "state": out}


def functional(optimizer: str, **kwargs: Any) -> FunctionalOptimizer:
    """The pure ``init`` / ``update`` pair for ``optimizer`` (see :class:`FunctionalOptimizer`)."""
    return FunctionalOptimizer(optimizer, **kwargs)


def create(name: str, params: Any, **hyperparams: Any) -> Optimizer:
    """``create("adamw", [w, b], lr=1e-3)``: the stateful optimizer by registry name or title."""
    return Optimizer(params, name, **hyperparams)


def _make_class(spec: Any, backend: str | None = None, module: str = __name__) -> type:
    doc = (
        f"{spec.title} over plain arrays (``xpoptim.core`` spec ``{spec.name!r}``): ``step(grads)`` updates "
        f"the arrays in place.\n\n{spec.conventions}\n\nSource: {spec.source}\n\nHyperparameters:\n"
        + "\n".join(f"    {h.name} (default {h.default!r}): {h.doc}" for h in spec.hyperparams)
        + "\n\nSee :class:`xpoptim.adapters.array.Optimizer` for the keyword options."
    )

    def __init__(self, params: Any, **kwargs: Any) -> None:
        Optimizer.__init__(self, params, spec.name, **kwargs)

    return type(spec.title, (Optimizer,), {"__init__": __init__, "__doc__": doc, "optimizer_name": spec.name, "backend": backend, "__module__": module})


for _spec in SPECS.values():
    globals()[_spec.title] = _make_class(_spec)
del _spec
