"""The stateful array optimizer: :class:`Optimizer` (construction, hyperparameters, input checks, the step)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import array_api_compat
import numpy as np

from xpoptim.core import ElementwiseSpec, MatrixSpec, get_spec
from xpoptim.core import functional as core_functional
from xpoptim.core._backend import real_scalar

from .buckets import BucketStepMixin
from .checkpoint import CheckpointMixin
from .layout import _Bucket, _Entry, _MatrixStack, _Segment
from .namespace import _backend_name, _default_state_dtype, _device_context, _is_array, _is_real_floating, _matrix_shape, _no_grad, _numpy_dtype, _reshape
from .params import _matrix_rules, _GROUP_EXTRA_KEYS, _LAYOUTS, _parse_groups, _spec_hp
from .threads import DEFAULT_CHUNK_SIZE, DEFAULT_THREADED_CHUNK_SIZE, _auto_threads


def _byte_range(a: Any) -> tuple[int, int] | None:
    """``[low, high)``: the bytes an array's elements can touch (its address plus the extreme offsets its strides
    reach), from ``__array_interface__`` or ``__cuda_array_interface__``; ``None`` where neither is given."""
    iface = getattr(a, "__cuda_array_interface__", None) if not hasattr(a, "__array_interface__") else a.__array_interface__
    if not isinstance(iface, dict) or "data" not in iface:
        return None
    shape = tuple(iface["shape"])
    itemsize = int(np.dtype(iface["typestr"]).itemsize)
    if any(n == 0 for n in shape):
        return (0, 0)
    strides = iface.get("strides") or tuple(int(np.prod(shape[i + 1 :], dtype=np.int64)) * itemsize for i in range(len(shape)))
    low = high = int(iface["data"][0])
    for n, st in zip(shape, strides):
        reach = (n - 1) * st
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    return (low, high + itemsize)


class Optimizer(BucketStepMixin, CheckpointMixin):
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
            raise TypeError(f"{self.spec.title} is elementwise: fallback/fallback_hyperparams apply to the matrix rules only ({_matrix_rules()})")
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
                raise TypeError(f"{self.spec.title} is elementwise: fallback_hyperparams apply to the matrix rules only ({_matrix_rules()})")
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
        devices: list[Any] = []
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
        self._check_disjoint()

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
            if not isinstance(spec, ElementwiseSpec):  # a bucket holds the parameters of an elementwise rule
                raise TypeError(f"{role} rule {getattr(spec, 'name', spec)!r} of a bucket is not elementwise")
            b = _Bucket(spec, g, role, dtype, sd, entries)
            with _device_context(self.device):
                b.state = {n: xp.zeros((b.size,), dtype=sd, device=self.device) for n in spec.state}
            b.segments = self._segments(b)
            self._buckets.append(b)
        self._stacks: list[_MatrixStack] = []
        for (g, mshape, _), (dtype, sd, entries) in stacks.items():
            if not isinstance(self.spec, MatrixSpec):  # a stack holds the matrices of a matrix rule
                raise TypeError(f"rule {self.spec.name!r} of a matrix stack is not a matrix rule")
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
        """The group's hyperparameters, validated, numbers as Python floats (a 1-element array ``lr`` is its value)."""
        g = self.param_groups[gi]
        hp = _host_numbers(self.spec, self.spec.validate(**{k: v for k, v in g.items() if k not in _GROUP_EXTRA_KEYS}))
        fb = None
        if self.fallback_spec is not None:
            fb = _host_numbers(self.fallback_spec, self.fallback_spec.validate(**{"lr": hp["lr"], **dict(g.get("fallback_hyperparams", {}))}))  # lr follows the group's
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
            raise TypeError(f"{self.spec.title} is elementwise: fallback_hyperparams apply to the matrix rules only ({_matrix_rules()})")
        staged = []
        for i in idx:
            g = self.param_groups[i]
            hp = {k: v for k, v in g.items() if k not in _GROUP_EXTRA_KEYS}
            hp.update(hyperparams)
            self.spec.validate(**hp)
            new_fb = None
            if fbh is not None and self.fallback_spec is not None:  # (fbh without a fallback rule raised above)
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

    def _check_disjoint(self) -> None:
        """Parameters must not share memory: a bucket's arrays are updated in place, some through views and some
        through gathered copies written back, and split over threads, so parameters viewing common elements would
        get updates that depend on the path and the thread count. The arrays' byte ranges come from NumPy's
        ``__array_interface__`` or CuPy's ``__cuda_array_interface__``; where two ranges overlap, NumPy arrays are
        asked exactly (``numpy.shares_memory``: interleaved views such as ``x[::2]`` and ``x[1::2]`` are
        disjoint), other arrays are taken to share memory."""
        spans = sorted(((r[0], r[1], e) for e in self._entries if (r := _byte_range(e.array)) is not None and r[1] > r[0]), key=lambda t: t[0])
        active: list[tuple[int, int, _Entry]] = []
        for lo, hi, e in spans:
            active = [t for t in active if t[1] > lo]
            for _, _, other in active:
                if self._kind != "numpy" or np.shares_memory(other.array, e.array):
                    raise ValueError(
                        f"parameters {other.key!r} and {e.key!r} share memory: each parameter must be an array with "
                        "elements of its own (the step updates arrays in place; pass copies, numpy.array(x))"
                    )
            active.append((lo, hi, e))

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
            self._check_variance(x_lists[name], name)
        self._check_writable()
        hps = [self._group_hp(i) for i in range(len(self.param_groups))]
        t = self._step + 1
        pos = self._pos
        xp = self.xp
        with _device_context(self.device), _no_grad(self._kind), _quiet_floats(self._kind):
            # Matrix rules first: pure, so a failure there leaves everything untouched.
            pending = []
            for st in self._stacks:
                if 0 in st.mshape:
                    continue  # zero-size matrices: nothing to update, no state to change
                hp = _spec_hp(self.spec, hps[st.group][0])
                ps = xp.stack([_reshape(xp, e.array, st.mshape) for e in st.entries])
                gs = xp.stack([_reshape(xp, g_list[pos[id(e)]], st.mshape) for e in st.entries])
                if st.state_dtype != st.dtype:  # float16 parameters: the matrix rule runs in the state dtype
                    ps, gs = xp.astype(ps, st.state_dtype), xp.astype(gs, st.state_dtype)
                try:
                    new_p, new_state = core_functional.step(
                        self.spec, ps, gs, st.state, hp, t, maximize=self.maximize, layout=self.layout
                    )
                except np.linalg.LinAlgError as exc:
                    keys = [e.key for e in st.entries]
                    raise FloatingPointError(
                        f"{self.spec.title}: the matrix step of parameter(s) {keys} failed ({exc}): the gradients or "
                        "the state hold a NaN or an infinity, or values beyond the range of the state dtype; nothing "
                        "was changed"
                    ) from exc
                pending.append((st, new_p, new_state))
            for b in self._buckets:
                bucket_hp = hps[b.group][0] if b.role == "main" else hps[b.group][1]
                if bucket_hp is None:  # a fallback bucket exists only with a fallback rule
                    raise TypeError(f"bucket of group {b.group} has role {b.role!r} without a fallback rule")
                self._run_bucket(b, g_list, x_lists, pos, bucket_hp, t)
            for st, new_p, new_state in pending:
                for i, e in enumerate(st.entries):
                    v = _reshape(xp, new_p[i, ...], e.shape)
                    e.array[...] = v if v.dtype == e.array.dtype else xp.astype(v, e.array.dtype)
                st.state = new_state
        self._step = t

    def _check_variance(self, arrays: list, what: str) -> None:
        """A per-element variance must be >= 0 and not NaN (one reduction per array; refused before any write)."""
        xp = self.xp
        for e, v in zip(self._entries, arrays):
            if e.size and not bool(xp.all(v >= 0)):
                raise ValueError(
                    f"{what}[{e.key!r}] holds a negative or NaN value: expected a per-element variance >= 0 "
                    "(e.g. core.moments.minibatch_variance of the per-example gradients)"
                )

    # -- copies -------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Pickle / deepcopy: arrays, hyperparameters and state. Specs travel by registry name; the namespace
        module, compiled kernels, buffers and views are rebuilt on load."""
        d = dict(self.__dict__)
        d.pop("xp", None)
        d.pop("_pos", None)
        d["spec"] = self.spec.name
        d["fallback_spec"] = None if self.fallback_spec is None else self.fallback_spec.name
        d["_buckets"] = [_portable(b) for b in self._buckets]
        d["_stacks"] = [_portable(st) for st in self._stacks]
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self.spec = get_spec(d["spec"])
        fallback = None if d["fallback_spec"] is None else get_spec(d["fallback_spec"])
        self.fallback_spec = fallback if isinstance(fallback, ElementwiseSpec) else None
        part: Any  # pickled with the spec's name in place of the spec (see _portable)
        for part in (*self._buckets, *self._stacks):
            part.spec = get_spec(part.spec)
        self.xp = array_api_compat.array_namespace(*[e.array for e in self._entries])
        self._pos = {id(e): i for i, e in enumerate(self._entries)}
        for b in self._buckets:
            b.segments = self._segments(b)

    def _needed_extras(self) -> tuple:
        specs = [b.spec for b in self._buckets]
        names: list = []
        for s in specs:
            for n in s.extras:
                if n not in names:
                    names.append(n)
        return tuple(names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self._entries)} arrays, {len(self.param_groups)} group(s), step {self._step})"


def _host_numbers(spec: Any, hp: dict) -> dict:
    """Numeric hyperparameters as Python floats (validated 0-D / 1-element arrays and NumPy scalars included), so
    every value enters the step exactly as a float would."""
    out = dict(hp)
    for h in spec.hyperparams:
        if not h.static and h.name in out:
            value = real_scalar(out[h.name])
            if value is not None:
                out[h.name] = value
    return out


def _portable(part: Any) -> Any:
    """A shallow copy of a bucket or matrix stack for pickling: the spec by name; for buckets no compiled kernels
    and no segments (their views and buffers belong to the original arrays)."""
    c = object.__new__(type(part))
    c.__dict__.update(part.__dict__)
    c.spec = part.spec.name
    if isinstance(part, _Bucket):
        c.kernels = {}
        c.segments = []
        c.fused = None
        c.fuse_note = ""
    return c


class _quiet_floats:
    """NumPy floating-point warnings off during a step: the rules handle overflow and 0/0 on purpose (the plain
    forms are computed and replaced where they overflow), and a warning turned into an error (``-W error``) in the
    middle of a step would leave it half done. Non-finite results are documented (``docs/reliability.md``)."""

    def __init__(self, kind: str) -> None:
        self._ctx = np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore") if kind == "numpy" else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
