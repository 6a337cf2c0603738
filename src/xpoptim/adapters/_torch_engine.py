"""Engine of the torch adapter: runs the core rules on the parameters' own tensors, where they live.

Private module: ``xpoptim.adapters.torch`` is the public face. Nothing here does math of its own: the elementwise
kernel comes from ``core.make_step_kernel``, the step scalars from ``core.step_scalars`` (float64 on the host), and
the matrix rules run through ``core.functional.init`` / ``core.functional.step``, which dispatch on the spec.

Elementwise rules, per group of parameters that share a step count (usually the whole group):

* **CPU, float32/float64, contiguous**: one compiled C loop over every parameter, gradient, extra input and state
  tensor, given by ``data_ptr()`` (:mod:`._torch_ckernel`): nothing gathered or re-pointed.
* **otherwise** (CUDA, bf16/fp16 parameters with float32 state, permuted layouts, no C compiler, rules with ``erf``):
  the multi-tensor path, the core kernel on lists of tensors through ``torch._foreach_*`` (:mod:`._torch_foreach`),
  falling back to one tensor at a time with the array-API torch namespace when a rule needs an operation that has
  no list form.
* ``compile=True``: ``torch.compile`` of the in-place step, per tensor (opt-in: the first step waits for Inductor).

Every path computes each element with the same IEEE operations in the same order, so they give the same bits
(checked by the adapter's tests); only ``compile=True`` may differ in the last bits (Inductor may contract into FMAs).
"""

from __future__ import annotations

import math
import operator
import sys
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeGuard

import array_api_compat.torch as txp
import numpy as np
import torch

from xpoptim.core import HOST, STATE_VERSION, functional, make_step_kernel, step_scalars
from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

from . import _torch_ckernel as _ck
from . import _torch_foreach as _fe
from . import _torch_guard as _gd
from . import _torch_omp as _omp
from ._traceable import TraceableNamespace

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "state_dtype_for",
    "new_elementwise_state",
    "elementwise_step",
    "matrix_shape",
    "matrix_state_init",
    "matrix_plan",
    "is_sharded",
    "sharded_state_init",
]

_is = operator.is_
_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_contig = torch.Tensor.is_contiguous
_numel = torch.Tensor.numel


def state_dtype_for(param: torch.Tensor, option: Any) -> torch.dtype:
    """The dtype of a parameter's floating state: ``option`` if given, float32 for 16-bit floats, else the param's."""
    if option is not None:
        return option
    if param.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return param.dtype


def new_step() -> torch.Tensor:
    """A parameter's step counter: a float32 scalar tensor on the CPU, as torch.optim keeps it."""
    return torch.tensor(0.0, dtype=torch.float32)


def new_elementwise_state(spec: ElementwiseSpec, p: torch.Tensor, state_dtype: torch.dtype) -> dict:
    """Zero state of an elementwise rule for a plain tensor: the parameter's shape and memory format (as
    ``torch.zeros_like(p, memory_format=torch.preserve_format)`` in torch.optim), one step counter of its own."""
    st: dict[str, Any] = {
        name: torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format) for name in spec.state
    }
    st["step"] = new_step()
    st["state_version"] = STATE_VERSION
    return st


# ------------------------------------------------------------------------------------------------------------------
# Kernels (per rule, static switches, maximize, compute dtype)
# ------------------------------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_FN_CACHE: dict[tuple, Callable] = {}
_LIST_CACHE: dict[tuple, Any] = {}
_COMPILED_CACHE: dict[tuple, Callable] = {}
_TRACED_FN_CACHE: dict[tuple, Callable] = {}


def _key(spec: ElementwiseSpec, static: dict, maximize: bool, dtype: torch.dtype) -> tuple:
    return (spec.name, _ck._static_key(static), bool(maximize), dtype)


def _make_inplace_step(kernel: Callable, compute_dtype: torch.dtype, name: str) -> Callable:
    """``fn(p, g, extras, states, scalars)``: run ``kernel`` on one tensor and write ``p`` and the states in place
    (``p``/``g``/extras cast to ``compute_dtype`` first, the new parameter cast back by ``copy_``)."""

    def inplace_step(p, g, extras, states, scalars):
        pc = p if p.dtype == compute_dtype else p.to(compute_dtype)
        gc = g if g.dtype == compute_dtype else g.to(compute_dtype)
        ex = [x if x.dtype == compute_dtype else x.to(compute_dtype) for x in extras]
        out = kernel(pc, gc, *ex, *states, *scalars)
        p.copy_(out[0])
        for s, o in zip(states, out[1:]):
            s.copy_(o)

    # A distinct code object per rule, so that torch.compile's per-code cache (and its recompile limit) is per rule.
    code = inplace_step.__code__.replace(co_name=f"xpoptim_{name}")
    return types.FunctionType(code, inplace_step.__globals__, code.co_name, None, inplace_step.__closure__)


_EXACT = _fe.ExactTorchNamespace(txp)


#: The namespace ``torch.compile(fullgraph=True)`` traces (``compile=True``): a NaN-propagating ``sign`` it can hold.
_TRACED = TraceableNamespace(txp, torch)


def _tensor_fn(spec: ElementwiseSpec, static: dict, maximize: bool, compute_dtype: torch.dtype, traced: bool = False) -> tuple[tuple, Callable]:
    """The in-place step on one tensor: op by op with IEEE ``sqrt`` (``traced=False``), or on the traceable torch
    namespace for ``torch.compile`` to trace (``traced=True``)."""
    key = _key(spec, static, maximize, compute_dtype)
    with _LOCK:
        cache = _TRACED_FN_CACHE if traced else _FN_CACHE
        fn = cache.get(key)
        if fn is None:
            kernel = make_step_kernel(spec, _TRACED if traced else _EXACT, static, maximize)
            fn = cache[key] = _make_inplace_step(kernel, compute_dtype, f"{spec.name}_{len(cache)}")
    return key, fn


def _list_kernel(spec: ElementwiseSpec, static: dict, maximize: bool) -> Any:
    """The core kernel on :class:`._torch_foreach.TensorList` arrays, or ``None`` when the rule calls something with
    no list form (``erf``): such rules run one tensor at a time."""
    key = (spec.name, _ck._static_key(static), bool(maximize))
    k = _LIST_CACHE.get(key)
    if k is None:
        k = _LIST_CACHE[key] = make_step_kernel(spec, _fe.NAMESPACE, static, maximize)
    return k or None


def _compiled(key: tuple, fn: Callable) -> Callable:
    with _LOCK:
        cfn = _COMPILED_CACHE.get(key)
        if cfn is None:  # torch.compile (and with it dynamo and inductor) is loaded here, on the first opt-in use
            cfn = _COMPILED_CACHE[key] = torch.compile(fn, dynamic=True, fullgraph=True)
    return cfn


# ------------------------------------------------------------------------------------------------------------------
# Step counters
# ------------------------------------------------------------------------------------------------------------------


def read_steps(steps: Sequence[torch.Tensor], kernel: Any = None) -> list[int]:
    """The step count of each parameter (its ``step`` tensor); through the compiled helper when there is one."""
    if kernel is not None and _plain_f32_cpu(steps):
        vals = kernel.read_steps(_ck.pointers([steps])[:, 0].copy())
        return [int(v) for v in vals.tolist()]
    if len(steps) > 1 and _plain_f32_cpu(steps) and all(s.ndim == 0 for s in steps):
        return [int(v) for v in torch.stack(list(steps)).tolist()]  # one copy instead of one .item() per parameter
    return [int(s.item()) for s in steps]


def write_steps(steps: Sequence[torch.Tensor], t: int, kernel: Any = None) -> None:
    if kernel is not None and _plain_f32_cpu(steps):
        kernel.write_steps(_ck.pointers([steps])[:, 0].copy(), float(t))
        return
    if len(steps) > 1 and _plain_f32_cpu(steps):
        torch._foreach_copy_(list(steps), [torch.tensor(float(t))] * len(steps))  # one call for every counter
        return
    for s in steps:
        s.fill_(float(t))


def _plain_f32_cpu(steps: Sequence[torch.Tensor]) -> bool:
    return all(map(_is, map(_DTYPE, steps), repeat(torch.float32))) and all(map(_IS_CPU, steps))


# ------------------------------------------------------------------------------------------------------------------
# Elementwise rules
# ------------------------------------------------------------------------------------------------------------------


def elementwise_step(
    spec: ElementwiseSpec,
    hp: dict,
    maximize: bool,
    compile_opt: bool,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    extras: Sequence[Sequence[torch.Tensor]],
    states: Sequence[Sequence[torch.Tensor]],
    steps: Sequence[torch.Tensor],
) -> None:
    """One step of an elementwise rule on plain tensors (a DTensor's local shards included), in place.

    Args:
        spec: the rule.
        hp: validated hyperparameters (Python numbers).
        maximize: ascend.
        compile_opt: run under ``torch.compile`` (opt-in).
        params: the parameters (detached views of their memory).
        grads: their gradients, where backward left them.
        extras: per extra input of the rule, one tensor per parameter.
        states: per state name of the rule, one tensor per parameter (checked by the caller: shape, device).
        steps: the parameters' step counters (each advances by one).
    """
    static = spec.static(hp)
    n = len(params)
    if n == 0:
        return
    p0 = params[0]
    ck = None
    dtypes = set(map(_DTYPE, params))
    uniform = len(dtypes) == 1 and all(all(map(_is, map(_DTYPE, s), repeat(p0.dtype))) for s in states)
    if not compile_opt and uniform and all(map(_IS_CPU, params)):
        ck = _ck.c_kernel(spec, hp, static, maximize, p0.dtype)
    ts = read_steps(steps, ck)
    t0 = ts[0]
    by_t: Mapping[int, range | list[int]]
    if ts.count(t0) == n:
        by_t = {t0: range(n)}
    else:
        by_step: dict[int, list[int]] = {}
        for i, t in enumerate(ts):
            by_step.setdefault(t, []).append(i)
        by_t = by_step
    for t_prev, idx in by_t.items():
        t = t_prev + 1
        if isinstance(idx, range):
            sub = (params, grads, extras, states, steps)
        else:
            sub = (
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [[x[i] for i in idx] for x in extras],
                [[s[i] for i in idx] for s in states],
                [steps[i] for i in idx],
            )
        _step_at(spec, hp, static, maximize, compile_opt, ck, t, *sub[:4])
        write_steps(sub[4], t, ck)


def _step_at(spec, hp, static, maximize, compile_opt, ck, t, params, grads, extras, states) -> None:
    scalars = step_scalars(spec, hp, t, HOST)
    if ck is not None:
        host = ck.host_scalars(tuple(scalars))
        arrays = [params, grads, *extras, *states]
        written = [0, *range(2 + len(extras), len(arrays))]  # the parameters and the state
        if host is not None and all(all(map(_contig, a)) for a in arrays) and all(map(_IS_CPU, grads)):
            sizes = np.fromiter(map(_numel, params), dtype=np.int64, count=len(params))
            _ck.run_spans(ck, host, sizes, _ck.pointers(arrays), params[0].element_size(), written=written)
            torch.autograd.graph.increment_version(list(params))
            return
        if host is not None:  # some tensors are permuted or strided: the compiled loop takes the contiguous ones
            ok = [i for i in range(len(params)) if all(a[i].is_contiguous() and a[i].is_cpu for a in arrays)]
            if ok:
                rest = [i for i in range(len(params)) if i not in set(ok)]
                pick = [[a[i] for i in ok] for a in arrays]
                sizes = np.fromiter((params[i].numel() for i in ok), dtype=np.int64, count=len(ok))
                _ck.run_spans(ck, host, sizes, _ck.pointers(pick), params[0].element_size(), written=written)
                torch.autograd.graph.increment_version(pick[0])
                if not rest:
                    return
                params, grads = [params[i] for i in rest], [grads[i] for i in rest]
                extras = [[x[i] for i in rest] for x in extras]
                states = [[s[i] for i in rest] for s in states]
    fscalars = [float(s) for s in scalars]
    keyed: dict[tuple, list[int]] = {}
    for i, (p, s0) in enumerate(zip(params, states[0] if states else params)):
        keyed.setdefault((p.device, p.dtype, s0.dtype), []).append(i)
    for (_dev, _dt, cdt), idx in keyed.items():
        sub_p = [params[i] for i in idx]
        sub_g = [grads[i] for i in idx]
        sub_x = [[x[i] for i in idx] for x in extras]
        sub_s = [[s[i] for i in idx] for s in states]
        key, fn = _tensor_fn(spec, static, maximize, cdt)
        if compile_opt:
            cfn = _compiled(key, _tensor_fn(spec, static, maximize, cdt, traced=True)[1])
            sc = list(torch.tensor(fscalars, dtype=torch.float64).to(sub_p[0].device).unbind(0))
            for i in range(len(sub_p)):
                args = (sub_p[i], sub_g[i], *(x[i] for x in sub_x), *(s[i] for s in sub_s))
                if all(map(_contig, args)):
                    # The rule is elementwise: a 1-D view of each tensor (written through, in place) gives the compiled
                    # step one shape family, so tensors of any rank and size reuse it instead of recompiling per shape
                    # (torch.compile's recompile limit would stop a process that steps many differently shaped models).
                    args = tuple(a.view(-1) for a in args)
                cfn(args[0], args[1], list(args[2 : 2 + len(sub_x)]), list(args[2 + len(sub_x) :]), sc)
            continue
        lk = _list_kernel(spec, static, maximize) if spec.is_fusable(hp) else None
        if lk is not None:
            _fe.run_lists(lk, cdt, sub_p, sub_g, sub_x, sub_s, fscalars)
            continue
        for i in range(len(sub_p)):
            fn(sub_p[i], sub_g[i], [x[i] for x in sub_x], [s[i] for s in sub_s], fscalars)


def eager_step(spec: ElementwiseSpec, hp: dict, maximize: bool, t: int, p, g, extras, states) -> None:
    """Step ``t`` of the rule on one tensor, op by op with the array-API torch namespace: the reference path the
    compiled loop and the multi-tensor path are compared with."""
    static = spec.static(hp)
    _, fn = _tensor_fn(spec, static, maximize, states[0].dtype if states else p.dtype)
    fn(p, g, list(extras), list(states), [float(s) for s in step_scalars(spec, hp, t, HOST)])


# ------------------------------------------------------------------------------------------------------------------
# DTensor parameters (FSDP2 fully_shard, tensor parallelism)
# ------------------------------------------------------------------------------------------------------------------


def dtensor_loaded() -> bool:
    """Whether any DTensor can exist (``torch.distributed.tensor`` imported)."""
    return "torch.distributed.tensor" in sys.modules


def is_sharded(t: object) -> TypeGuard[DTensor]:
    """Is ``t`` a DTensor? (``torch.distributed.tensor`` not imported yet means no DTensor exists.)"""
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def sharded_state_init(names: Sequence[str], p: Any, state_dtype: torch.dtype) -> dict:
    """Zero state for a DTensor parameter: DTensors with the parameter's mesh, placements, shape and stride (what
    ``torch.zeros_like(p)`` gives torch.optim)."""
    from torch.distributed.tensor import DTensor

    local = p.to_local()
    out: dict[str, Any] = {}
    for name in names:
        zeros = torch.zeros(local.shape, dtype=state_dtype, device=local.device)
        out[name] = DTensor.from_local(zeros, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    out["step"] = new_step()
    out["state_version"] = STATE_VERSION
    return out


def local(t: Any) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if is_sharded(t) else t


# ------------------------------------------------------------------------------------------------------------------
# Matrix rules: computed in full before anything is written
# ------------------------------------------------------------------------------------------------------------------


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The matrix a parameter is treated as: 2-D as is, conv weights ``(out, in*kh*kw)``."""
    return (p.shape[0], math.prod(p.shape[1:]))


def matrix_state_init(spec: MatrixSpec, p: torch.Tensor, hp: dict, state_dtype: torch.dtype) -> dict:
    """Zero state of a matrix rule (``core.functional.init`` on the parameter's matrix shape) and a step counter."""
    like = torch.zeros(matrix_shape(p), dtype=state_dtype, device=p.device)
    out = dict(functional.init(spec, like, hp))
    out["step"] = new_step()
    out["state_version"] = STATE_VERSION
    return out


def _stack(tensors: Sequence[torch.Tensor], shape2: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([x.reshape(shape2).to(dtype) for x in tensors])


def matrix_plan(
    spec: MatrixSpec,
    hp: dict,
    maximize: bool,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
) -> list[Callable[[], None]]:
    """Compute one step of a matrix rule for ``params`` (plain tensors) and return the writes, not yet done.

    Same-shape matrices of one dtype, state dtype, device and step count are stacked through one
    ``core.functional.step`` call. Nothing is written here: the returned callables copy the new parameters and state
    in place and advance the step counters; the caller runs them only after every group's step was computed, so a
    failure (an ``eigh`` that does not converge on a NaN or huge gradient) leaves everything unchanged.
    """
    buckets: dict[tuple, list[int]] = {}
    for i, (p, st) in enumerate(zip(params, states)):
        sdt = next(v.dtype for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point())
        key = (matrix_shape(p), p.dtype, sdt, p.device, int(st["step"].item()))
        buckets.setdefault(key, []).append(i)
    writes: list[Callable[[], None]] = []
    for (shape2, _dt, sdt, _dev, t0), idx in buckets.items():
        t = t0 + 1
        ps = [params[i] for i in idx]
        sts = [states[i] for i in idx]
        g = _stack([grads[i] for i in idx], shape2, sdt)
        pw = _stack(ps, shape2, sdt)
        names = [k for k in sts[0] if k not in ("step", "state_version")]
        stacked = {k: (None if sts[0][k] is None else torch.stack([st[k] for st in sts])) for k in names}
        new_p, new_state = functional.step(spec, pw, g, stacked, hp, t, maximize=maximize, layout="out_in")
        writes.append(_writer(ps, sts, None if new_p is pw else new_p, new_state, t))
    return writes


def _writer(ps: list, sts: list, new_p: Any, new_state: Mapping[str, Any], t: int) -> Callable[[], None]:
    def write() -> None:
        for i, (p, st) in enumerate(zip(ps, sts)):
            if new_p is not None:
                p.copy_(new_p[i].reshape(p.shape))
            for name, val in new_state.items():
                if val is None:
                    st[name] = None
                    continue
                cur = st.get(name)
                v = val[i]
                if isinstance(cur, torch.Tensor) and cur.shape == v.shape and cur.dtype == v.dtype:
                    cur.copy_(v)
                else:
                    st[name] = v.clone()
            st["step"].fill_(float(t))

    return write


def sharded_matrix_plan(spec: MatrixSpec, hp: dict, maximize: bool, p: Any, g: Any, st: dict) -> Callable[[], None]:
    """One matrix-rule step on a DTensor parameter (FSDP2), computed in full, written by the returned callable.

    A matrix rule needs the whole matrix: the parameter, its gradient and every state tensor sharded like the
    parameter are all-gathered (``full_tensor``), every rank computes the same :func:`matrix_plan` step on the full
    matrix, and each keeps its own shard of the result. State of the parameter's own shape (Muon's momentum) stays
    sharded like the parameter; other state (DeVASinf's Kronecker factors and eigenbases) is replicated
    (``Replicate`` DTensors), so ``state_dict`` and ``torch.distributed.checkpoint`` see DTensors either way.
    """
    from torch.distributed.tensor import DTensor, Replicate

    mesh, placements = p.device_mesh, p.placements
    replicate = [Replicate()] * mesh.ndim
    full_p = p.full_tensor().detach()
    full_g = g.full_tensor().detach()
    full_state: dict[str, Any] = {}
    sharded_names = []
    for k, v in st.items():
        if is_sharded(v):
            if all(pl.is_replicate() for pl in v.placements):
                full_state[k] = v.to_local()
            else:
                full_state[k] = v.full_tensor().reshape(matrix_shape(p))
                sharded_names.append(k)
        else:
            full_state[k] = v
    writes = matrix_plan(spec, hp, maximize, [full_p], [full_g], [full_state])

    def write() -> None:
        for w in writes:
            w()
        mine = DTensor.from_local(full_p, mesh, replicate, run_check=False).redistribute(mesh, placements).to_local()
        p.to_local().copy_(mine)
        for k, v in full_state.items():
            if k in ("step", "state_version"):
                continue
            if k in sharded_names:
                whole = DTensor.from_local(v.reshape(p.shape), mesh, replicate, run_check=False)
                st[k].to_local().copy_(whole.redistribute(mesh, placements).to_local())
            elif isinstance(v, torch.Tensor):
                cur = st.get(k)
                if is_sharded(cur) and cur.to_local().data_ptr() == v.data_ptr():
                    continue  # written in place through its local tensor
                st[k] = DTensor.from_local(v, mesh, replicate, run_check=False)
            else:
                st[k] = v
        st["step"] = full_state["step"]

    return write


def sharded_matrix_state_init(spec: MatrixSpec, p: Any, hp: dict, state_dtype: torch.dtype) -> dict:
    """Zero state of a matrix rule for a DTensor parameter: state of the parameter's matrix shape as DTensors
    sharded like the parameter (in the parameter's own shape), the rest replicated."""
    from torch.distributed.tensor import DTensor, Replicate

    full = matrix_state_init(spec, torch.empty(p.shape, dtype=state_dtype, device=p.to_local().device), hp, state_dtype)
    mesh, placements = p.device_mesh, p.placements
    shape2 = matrix_shape(p)
    out: dict[str, Any] = {}
    for k, v in full.items():
        if k in ("step", "state_version") or v is None:
            out[k] = v
        elif tuple(v.shape) == shape2:
            whole = DTensor.from_local(v.reshape(p.shape), mesh, [Replicate()] * mesh.ndim, run_check=False)
            out[k] = whole.redistribute(mesh, placements)
        else:
            out[k] = DTensor.from_local(v, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return out


# ------------------------------------------------------------------------------------------------------------------
# The steady-state fast path: one group's tensors checked in bulk, every address read at every step
# ------------------------------------------------------------------------------------------------------------------

_GETSTEP = operator.itemgetter("step")

#: The steady-state checks are split over torch's threads from this many tensors on.
CHECK_ROWS_PER_THREAD = 256


class FastGroup:
    """What a group's last step established about its plain CPU parameters and their state: the tensor objects,
    their addresses and sizes, and the compiled loop. A step reuses it only after checking that every parameter,
    state dict, state tensor and step counter is the same object at the same address as then (so a parameter moved
    by ``p.data = x``, state replaced by ``load_state_dict`` or by hand, or a new parameter in the group, all fall
    back to the full checks); the fresh gradients are checked at every step (element count, dtype, device,
    contiguity: what the compiled loop needs to read them safely). The per-tensor questions are asked in one C call
    per list where :mod:`._torch_guard` builds (:class:`CheckedInC`), else tensor by tensor in Python. A gradient
    swapped through ``p.grad.data = x`` for a tensor with as many elements in another shape is read in memory order
    (torch itself refuses ``p.grad = x`` of another shape; only ``.data`` gets past that check).
    """

    __slots__ = ("spec_key", "params", "state", "state_changes", "sts", "cols", "steps", "getters", "p_ptrs", "col_ptrs", "step_ptrs", "step_ptrs_at", "numel", "ends", "serial", "dtype", "kernel", "checked")
    spec_key: tuple[str, tuple, bool]
    params: list[torch.Tensor]
    state: Mapping
    state_changes: int | None
    sts: list[dict]
    cols: list[list[torch.Tensor]]
    steps: list[torch.Tensor]
    getters: list[operator.itemgetter]
    p_ptrs: np.ndarray
    col_ptrs: list[np.ndarray]
    step_ptrs: np.ndarray
    step_ptrs_at: int
    numel: np.ndarray
    ends: np.ndarray
    serial: bool
    dtype: torch.dtype
    kernel: _ck._cfuse.CKernel
    checked: CheckedInC | None


class CheckedInC:
    """What :func:`fast_plan` needs to check a :class:`FastGroup` in C (:mod:`._torch_guard`): handles to the
    parameters, state tensors and step counters with their element counts, dtypes and addresses, the ids of the
    state dicts' values, and the table of addresses the compiled loop reads (row ``i``: parameter ``i``, its
    gradient (written at each step), its state tensors), with the addresses of the arrays passed to C at every step
    read once."""

    __slots__ = ("guard", "held", "keys", "value_ids", "value_ids_at", "ptrs", "at")

    def __init__(self, g: _gd.Guard, fg: FastGroup, names: Sequence[str]) -> None:
        self.guard = g
        self.ptrs = np.ascontiguousarray(np.column_stack([fg.p_ptrs, fg.p_ptrs, *fg.col_ptrs]))
        self.at = _ck.span_addresses(fg.numel, self.ptrs)
        self.held = _gd.Held(
            g,
            [fg.params, *fg.cols, fg.steps],
            [fg.numel] * (1 + len(fg.cols)) + [None],
            [fg.dtype] * (1 + len(fg.cols)) + [torch.float32],
            [fg.p_ptrs, *fg.col_ptrs, fg.step_ptrs],
            fg.numel,
            fg.dtype,
            self.ptrs,
            1,
            step_col=1 + len(fg.cols),
        )
        self.keys = (*names, "step")
        self.value_ids = np.array([[id(t) for t in col] for col in (*fg.cols, fg.steps)], dtype=np.uintp).reshape(len(self.keys), len(fg.params))
        self.value_ids_at = self.value_ids.ctypes.data


def fast_group(spec: ElementwiseSpec, hp: dict, maximize: bool, params: Sequence[torch.Tensor], state: Mapping) -> FastGroup | None:
    """A :class:`FastGroup` for a group whose every parameter and state tensor is a contiguous CPU tensor of one
    dtype with a compiled loop, else ``None``. Called after a step that passed the full checks; ``state`` is the
    optimizer's ``state``."""
    if spec.extras or not params:
        return None
    dtype = params[0].dtype
    ck = _ck.c_kernel(spec, hp, spec.static(hp), maximize, dtype)
    if ck is None:
        return None
    sts = [state[p] for p in params]
    names = spec.state
    cols = [[st[n] for st in sts] for n in names]
    steps = [st["step"] for st in sts]
    for col in (params, *cols):
        if not type_set(col) <= {torch.Tensor, torch.nn.Parameter}:  # DTensor, other subclasses: the general path
            return None
        if not (all(map(_IS_CPU, col)) and all(map(_contig, col)) and set(map(_DTYPE, col)) == {dtype}):
            return None
    if not _plain_f32_cpu(steps) or not all(s.numel() == 1 for s in steps):
        return None
    fg = FastGroup()
    fg.spec_key = (spec.name, _ck._static_key(spec.static(hp)), bool(maximize))
    fg.params, fg.sts, fg.cols, fg.steps = list(params), sts, cols, steps
    fg.state, fg.state_changes = state, getattr(state, "changes", None)
    fg.getters = [operator.itemgetter(n) for n in names]
    fg.p_ptrs = _ptrs(params)
    fg.col_ptrs = [_ptrs(c) for c in cols]
    fg.step_ptrs = _ptrs(steps)
    fg.step_ptrs_at = fg.step_ptrs.ctypes.data
    fg.numel = np.fromiter(map(_numel, params), dtype=np.int64, count=len(params))
    fg.ends = np.cumsum(fg.numel)
    # Parameters or state that share memory are stepped on one thread, in order (see _torch_ckernel.written_overlap).
    written = np.column_stack([fg.p_ptrs, *fg.col_ptrs])
    fg.serial = _ck.written_overlap(written, range(written.shape[1]), fg.numel, params[0].element_size())
    fg.dtype, fg.kernel = dtype, ck
    g = _gd.guard()
    fg.checked = CheckedInC(g, fg, names) if g is not None else None
    return fg


def type_set(ts: Sequence[Any]) -> set:
    return set(map(type, ts))


def _ptrs(ts: Sequence[torch.Tensor]) -> np.ndarray:
    return np.fromiter(map(torch.Tensor.data_ptr, ts), dtype=np.uintp, count=len(ts))


def fast_plan(
    fg: FastGroup, spec: ElementwiseSpec, hp: dict, maximize: bool, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: Mapping
) -> Callable[[], None] | None:
    """The step of a group through its :class:`FastGroup`, not yet run; ``None`` when anything differs from what
    the group established (the caller then runs the full checks, which name what is wrong).

    ``state`` is the optimizer's ``state``: when it is the same :class:`._torch_state.ParamStates` with no entry
    changed since the group was recorded, every parameter still has the state dict it had (no lookups); otherwise
    each parameter's entry is looked up and compared."""
    if (spec.name, _ck._static_key(spec.static(hp)), bool(maximize)) != fg.spec_key:
        return None
    n = len(params)
    if n != len(fg.params) or not all(map(_is, params, fg.params)):
        return None
    sts: list = fg.sts
    if state is not fg.state or fg.state_changes is None or getattr(state, "changes", None) != fg.state_changes:
        if not all(map(_is, map(state.get, params), sts)):
            return None
    c = fg.checked
    checked = _checked_in_c(c, fg, sts, grads) if c is not None else _checked_in_python(fg, sts, params, grads)
    if checked is None:
        return None
    ptrs, t_prev = checked
    ck = fg.kernel
    t = int(t_prev) + 1
    host = ck.host_scalars(tuple(step_scalars(spec, hp, t, HOST)))
    if host is None:
        return None
    sizes, ends = fg.numel, fg.ends
    at = c.at if c is not None else None  # the C checks write the gradients' addresses into the table they keep

    def run() -> None:
        # The counters first, while the checks have just read their metadata (the loop then moves every state
        # tensor through the caches); after the version bump nothing here can fail.
        torch.autograd.graph.increment_version(fg.params)
        ck.write_steps_at(n, fg.step_ptrs_at, float(t))
        _ck.run_spans(ck, host, sizes, ptrs, params[0].element_size(), ends, at, fg.serial)

    return run


def _threads(n: int) -> int:
    """Threads for checking ``n`` tensors: torch's OpenMP threads when there are enough tensors to pay for the
    hand-off and the split loop may use them too (:func:`._torch_omp.runner`), else one."""
    return torch.get_num_threads() if n >= CHECK_ROWS_PER_THREAD and _omp.runner() is not None else 1


def _checked_in_c(c: CheckedInC, fg: FastGroup, sts: list[dict], grads: Sequence[torch.Tensor]) -> tuple[np.ndarray, float] | None:
    """:func:`fast_plan`'s checks through :mod:`._torch_guard`: the address table the compiled loop reads (the
    gradients' addresses written into its column 1) and the step count, or ``None``."""
    g = c.guard
    if not g.values_at(sts, c.keys, c.value_ids_at):  # every state dict still holds the very tensors it held
        return None
    try:
        t = g.rows(c.held, grads if isinstance(grads, list) else list(grads), _threads(len(grads)))
    except (RuntimeError, TypeError):  # a gradient torch cannot hand over: the full checks name it
        return None
    return None if t is None else (c.ptrs, t)


def _checked_in_python(fg: FastGroup, sts: list[dict], params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> tuple[np.ndarray, float] | None:
    """:func:`fast_plan`'s checks tensor by tensor (where :mod:`._torch_guard` cannot be built): the address table
    the compiled loop reads and the step count, or ``None``."""
    n = len(params)
    cols = [list(map(getter, sts)) for getter in fg.getters]
    steps = list(map(_GETSTEP, sts))
    if not all(all(map(_is, col, old)) for col, old in zip(cols, fg.cols)) or not all(map(_is, steps, fg.steps)):
        return None
    if not np.array_equal(_ptrs(params), fg.p_ptrs) or not np.array_equal(_ptrs(steps), fg.step_ptrs):
        return None
    if not all(map(_contig, params)):  # ``p.data = p.data.t()`` keeps the address but not the layout
        return None
    if not all(np.array_equal(_ptrs(col), old) for col, old in zip(cols, fg.col_ptrs)):
        return None
    try:
        if not np.array_equal(np.fromiter(map(_numel, grads), dtype=np.int64, count=n), fg.numel):
            return None
        if set(map(_DTYPE, grads)) != {fg.dtype} or not all(map(_IS_CPU, grads)) or not all(map(_contig, grads)):
            return None
        g_ptrs = _ptrs(grads)
    except RuntimeError:  # a sparse gradient has no strides or address: the full checks refuse it by name
        return None
    ts = fg.kernel.read_steps(fg.step_ptrs)
    if n and not (ts == ts[0]).all():
        return None
    return np.column_stack([fg.p_ptrs, g_ptrs, *fg.col_ptrs]), float(ts[0]) if n else 0.0
