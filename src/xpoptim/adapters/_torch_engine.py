"""Engine of the torch adapter: flat buckets, the (optionally compiled) elementwise step, matrix stacks.

Private module: ``xpoptim.adapters.torch`` is the public face. Nothing here does math of its own: the
elementwise kernel comes from ``core.make_step_kernel``, the step scalars from ``core.step_scalars`` (float64 on
the host), and the matrix rules from ``core.muon`` / ``core.deva``. This module only decides where the arrays
live (one flat buffer per parameter group, dtype, device, state dtype and step count), how gradients reach the
buffer (views, or one gather pass), and whether the kernel runs eagerly (in cache-sized chunks) or under
``torch.compile`` (one fused kernel that writes parameters and state in place).
"""

from __future__ import annotations

import operator
import sys
import threading
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from typing import Any

import array_api_compat.torch as txp
import torch

from xpoptim.core import HOST, STATE_VERSION, functional, make_step_kernel, step_scalars
from xpoptim.core.deva import deva_sinf_apply, deva_sinf_host_step
from xpoptim.core.directions import newton_schulz
from xpoptim.core.muon import muon_apply, muon_momentum, muon_ns_options
from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

__all__ = [
    "Bucket",
    "run_bucket",
    "build_bucket",
    "bucket_is_valid",
    "matrix_step",
    "state_dtype_for",
    "run_sharded",
    "muon_step_sharded",
    "deva_step_sharded",
    "is_sharded",
    "EAGER_CHUNK",
]

#: Eager path: elements per chunk on CPU (temporaries stay in cache; each fresh 64 MB temporary costs a page-fault
#: pass on this class of machine, performance.md). CUDA tensors are not chunked.
EAGER_CHUNK = 1 << 18

#: ``compile="auto"`` compiles a bucket's kernel when the bucket holds at least this many elements.
AUTO_COMPILE_MIN_NUMEL = 1 << 20

_is = operator.is_
_data_ptr = torch.Tensor.data_ptr
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_uses(t: torch.Tensor | None) -> int:
    """How many tensors hold ``t``'s storage (-1 when torch does not expose the count: every check then runs).

    Every parameter (and gradient) view of a bucket holds one reference to the bucket's flat storage. Re-pointing
    one of them elsewhere (``p.data = x``, ``p.grad.data = x``: what ``Module._apply`` does in ``model.half()``)
    drops a reference, so an unchanged count lets a step skip the per-tensor pointer checks (one C call instead
    of two Python passes over thousands of tensors, the dominant cost of a layout-C step). A change in the count
    (a re-pointed view, or a new alias such as a live autograd graph) runs the full check, which is exact.
    """
    if t is None or _STORAGE_USE_COUNT is None:
        return -1
    return _STORAGE_USE_COUNT(t.untyped_storage()._cdata)


def state_dtype_for(param: torch.Tensor, option: Any) -> torch.dtype:
    """The dtype of a parameter's floating state: ``option`` if given, float32 for 16-bit floats, else the param's."""
    if option is not None:
        return option
    if param.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return param.dtype


# ------------------------------------------------------------------------------------------------------------------
# The in-place step function around the core kernel (eager and compiled share it)
# ------------------------------------------------------------------------------------------------------------------


def _make_inplace_step(kernel: Callable, compute_dtype: torch.dtype, name: str) -> Callable:
    """``fn(p, g, extras, states, scalars)``: run ``kernel`` and write ``p`` and the states in place.

    ``p``/``g``/extras are cast to ``compute_dtype`` (the state dtype) first and the new parameter is cast back to
    the parameter dtype by ``copy_``. Under ``torch.compile`` the casts, the rule and the write-back fuse into one
    kernel.
    """

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


_FN_CACHE: dict[tuple, Callable] = {}
_COMPILED_CACHE: dict[tuple, Callable] = {}
_COMPILE_FAILED: dict[tuple, str] = {}
_LOCK = threading.Lock()


def _static_key(static: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in static.items()))


def _get_fn(spec: ElementwiseSpec, static: dict, maximize: bool, compute_dtype: torch.dtype) -> tuple[tuple, Callable]:
    key = (spec.name, _static_key(static), bool(maximize), compute_dtype)
    with _LOCK:
        fn = _FN_CACHE.get(key)
        if fn is None:
            kernel = make_step_kernel(spec, txp, static, maximize)
            fn = _make_inplace_step(kernel, compute_dtype, f"{spec.name}_{len(_FN_CACHE)}")
            _FN_CACHE[key] = fn
    return key, fn


def _get_compiled(key: tuple, fn: Callable) -> Callable | None:
    if key in _COMPILE_FAILED:
        return None
    with _LOCK:
        cfn = _COMPILED_CACHE.get(key)
        if cfn is None:
            cfn = torch.compile(fn, dynamic=True, fullgraph=True)
            _COMPILED_CACHE[key] = cfn
    return cfn


# ------------------------------------------------------------------------------------------------------------------
# Flat buckets
# ------------------------------------------------------------------------------------------------------------------


class Bucket:
    """Parameters of one group sharing (device, dtype, state dtype, step count), laid out in flat buffers.

    Each parameter's ``.data`` and each state tensor are views into the bucket's flat buffers, so one kernel call
    updates them all in place. Gradients are gathered into ``flat_g`` (and ``p.grad`` is re-pointed to the view,
    so that later backward passes accumulate straight into the buffer while the grads are not set to ``None``);
    a bucket of one parameter uses the parameter's own gradient and needs no gradient buffer.
    """

    __slots__ = (
        "params",
        "shapes",
        "strides",
        "offsets",
        "numel",
        "flat_p",
        "flat_g",
        "flat_state",
        "flat_extras",
        "grad_views",
        "grad_ptrs",
        "grad_uses",
        "param_ptrs",
        "param_uses",
        "fresh_steps",
        "state_refs",
        "step_tensor",
        "t",
        "dtype",
        "state_dtype",
        "device",
    )


def _view(flat: torch.Tensor, off: int, n: int, shape: torch.Size, stride: tuple[int, ...] | None = None) -> torch.Tensor:
    """The ``shape`` tensor on ``flat[off:off+n]``: row-major, or with ``stride`` (a dense permuted layout)."""
    if stride is None:
        return flat[off : off + n].view(shape)
    return flat[off : off + n].as_strided(shape, stride)


def dense_stride(p: torch.Tensor) -> tuple[int, ...] | None:
    """``p.stride()`` when ``p`` is dense but not row-major (``channels_last``, a transposed weight), else ``None``.

    A dense layout is a permutation of the row-major one: its ``numel`` elements fill one contiguous span, so the
    bucket keeps the parameter (and its gradient and state views) in exactly that layout, as ``torch.optim`` keeps
    a parameter's ``memory_format`` (``zeros_like(p, memory_format=torch.preserve_format)``). Row-major and
    non-dense parameters (slices with gaps, overlapping strides) give ``None``: they are laid out row-major.
    """
    stride = tuple(p.stride())
    row_major, acc = [], 1
    for size in reversed(p.shape):
        row_major.append(acc)
        acc *= size
    if acc == 0 or stride == tuple(reversed(row_major)):
        return None
    expected = 1
    for st, size in sorted((st, size) for st, size in zip(stride, p.shape) if size != 1):
        if st != expected:
            return None
        expected *= size
    return stride


def build_bucket(
    params: Sequence[torch.Tensor], state: dict, spec: ElementwiseSpec, state_dtype: torch.dtype, t: int
) -> Bucket:
    """Lay ``params`` (all with gradients, same dtype/device/state dtype/step) out in flat buffers.

    Existing state is copied into the flat state buffers (then replaced by views); missing state starts at zero.
    """
    b = Bucket()
    b.params = list(params)
    b.shapes = [p.shape for p in params]
    b.strides = [dense_stride(p) for p in params]
    sizes = [p.numel() for p in params]
    offs, acc = [], 0
    for n in sizes:
        offs.append(acc)
        acc += n
    b.offsets, b.numel = offs, acc
    p0 = params[0]
    b.dtype, b.state_dtype, b.device = p0.dtype, state_dtype, p0.device
    layouts = list(zip(offs, sizes, b.shapes, b.strides))
    if len(params) == 1 and p0.is_contiguous():
        b.flat_p = p0.detach().view(-1)
    else:
        b.flat_p = torch.empty(acc, dtype=p0.dtype, device=p0.device)
        views = [_view(b.flat_p, *lay) for lay in layouts]
        for p, view in zip(params, views):
            view.copy_(p.detach())
        for p, view in zip(params, views):
            p.data = view
    if len(params) == 1 and p0.is_contiguous():
        # One row-major parameter: its own gradient is the flat gradient (no gather, no extra buffer).
        b.flat_g, b.grad_views, b.grad_ptrs = None, [], []
    else:
        b.flat_g = torch.empty(acc, dtype=p0.dtype, device=p0.device)
        b.grad_views = [_view(b.flat_g, *lay) for lay in layouts]
        b.grad_ptrs = [v.data_ptr() for v in b.grad_views]
    b.flat_extras = [torch.empty(acc, dtype=p0.dtype, device=p0.device) for _ in spec.extras]
    b.flat_state = {}
    for name in spec.state:
        flat = torch.zeros(acc, dtype=state_dtype, device=p0.device)
        for p, lay in zip(params, layouts):
            old = state.get(p, {}).get(name) if p in state else None
            if old is not None:
                _view(flat, *lay).copy_(old.reshape(lay[2]))
        b.flat_state[name] = flat
    b.t = t
    b.step_tensor = torch.tensor(float(t), dtype=torch.float32)
    b.state_refs = []
    for p, lay in zip(params, layouts):
        st = state[p]
        for name in spec.state:
            st[name] = _view(b.flat_state[name], *lay)
        st["step"] = b.step_tensor
        st["state_version"] = STATE_VERSION
        b.state_refs.append(st)
    b.param_ptrs = [p.data_ptr() for p in params]
    b.param_uses = b.grad_uses = -2  # no count seen yet: the first checks are the full ones
    b.fresh_steps = 0
    return b


def bucket_is_valid(b: Bucket) -> bool:
    """True when the bucket's parameters still live in its flat buffer (``.data`` not re-pointed by the user).

    The caller also checks that the set of parameters with gradients and the optimizer's state container are
    unchanged (state replaced by ``load_state_dict`` or ``__setstate__`` invalidates every bucket).

    The per-parameter pointer check runs only when the number of tensors holding the flat storage changed since
    the last check that passed (see ``_storage_uses``).
    """
    uses = _storage_uses(b.flat_p)
    if uses >= 0 and uses == b.param_uses:
        return True
    ok = list(map(_data_ptr, b.params)) == b.param_ptrs
    b.param_uses = uses if ok else -2
    return ok


def grads_in_place(b: Bucket, grads: Sequence[torch.Tensor]) -> list[bool]:
    """Per parameter: is its grad still the bucket's own view (same object, same memory)?

    A one-parameter bucket has no views (it reads the parameter's gradient directly): all False, so the caller
    validates that gradient every step.
    """
    if b.flat_g is None:
        return [False] * len(grads)
    same = list(map(_is, grads, b.grad_views))
    if all(same):  # the common case: every grad is still our view object; is each still on our memory?
        uses = _storage_uses(b.flat_g)
        if uses >= 0 and uses == b.grad_uses:
            return same
        if list(map(_data_ptr, grads)) == b.grad_ptrs:
            b.grad_uses = uses
            return same
        b.grad_uses = -2
    return [s and g.data_ptr() == ptr for s, g, ptr in zip(same, grads, b.grad_ptrs)]


def not_in_place(in_place: Sequence[bool]) -> list[int]:
    """Indices of the gradients that are not the bucket's own views (``grads_in_place`` False)."""
    return [i for i, fine in enumerate(in_place) if not fine]


def grads_match(b: Bucket, grads: Sequence[torch.Tensor], in_place: Sequence[bool]) -> bool:
    """Are the gradients that are not the bucket's own views (``in_place`` False) dense tensors of their
    parameters' shape, dtype and device? Checked in bulk (a few C-level passes instead of a Python loop over
    thousands of gradients); the caller runs its per-gradient loop only to name the culprit when this is False."""
    if any(in_place):
        bad = not_in_place(in_place)
        grads, shapes = [grads[i] for i in bad], [b.shapes[i] for i in bad]
    else:
        shapes = b.shapes
    return (
        all(map(_is, map(_LAYOUT, grads), repeat(torch.strided)))
        and list(map(_SHAPE, grads)) == shapes
        and all(map(_is, map(_DTYPE, grads), repeat(b.dtype)))
        and all(map(operator.eq, map(_DEVICE, grads), repeat(b.device)))
    )


#: After this many consecutive steps in which every gradient was a fresh tensor (``zero_grad(set_to_none=True)``,
#: torch's default), a bucket stops re-pointing ``p.grad`` to its views (the next ``zero_grad`` would drop them):
#: one Python assignment per parameter saved. It re-points again every ``REPOINT_EVERY`` steps, so a loop that
#: switches to ``set_to_none=False`` returns to the no-gather path.
FRESH_STEPS_BEFORE_NO_REPOINT = 2
REPOINT_EVERY = 64


def _gather_grads(b: Bucket, grads: Sequence[torch.Tensor], ok: Sequence[bool]) -> None:
    """Copy gradients that are not the bucket's views into the flat buffer (one foreach copy) and re-point
    ``p.grad`` to the views, so that backward passes accumulate in place while the grads are kept."""
    if all(ok):
        b.fresh_steps = 0
        return
    if not any(ok):
        bad = range(len(ok))
        views, new = b.grad_views, list(grads)
        b.fresh_steps += 1
    else:
        bad = not_in_place(ok)
        views, new = None, [grads[i] for i in bad]
        b.fresh_steps = 0
    if any(map(_is, grads, b.grad_views)):
        for i in bad:
            if b.grad_views[i] is grads[i]:  # the view's .data was swapped: make a fresh view of the buffer
                b.grad_views[i] = _view(b.flat_g, b.offsets[i], b.shapes[i].numel(), b.shapes[i], b.strides[i])
                b.grad_ptrs[i] = b.grad_views[i].data_ptr()
    if views is None:
        views = [b.grad_views[i] for i in bad]
    torch._foreach_copy_(views, new)
    if b.fresh_steps <= FRESH_STEPS_BEFORE_NO_REPOINT or (b.t + 1) % REPOINT_EVERY == 0:
        for i, view in zip(bad, views):
            b.params[i].grad = view


def run_bucket(
    b: Bucket,
    spec: ElementwiseSpec,
    hp: dict,
    static: dict,
    maximize: bool,
    compile_opt: Any,
    extras: Sequence[Sequence[torch.Tensor]] = (),
    grads: Sequence[torch.Tensor] | None = None,
    in_place: Sequence[bool] | None = None,
) -> None:
    """Take one step of ``spec`` on bucket ``b`` (the bucket's step count advances by one).

    Args:
        b: the bucket.
        spec: the elementwise rule.
        hp: validated hyperparameters with Python-number values.
        static: ``spec.static(hp)``.
        maximize: ascend.
        compile_opt: ``True``, ``False`` or ``"auto"``.
        extras: per extra input (``grad_variance``), one tensor per parameter of the bucket.
        grads: the parameters' gradients (read from ``p.grad`` when omitted).
        in_place: ``grads_in_place(b, grads)`` when the caller already has it.
    """
    if grads is None:
        grads = [p.grad for p in b.params]
    if b.flat_g is None:
        flat_g = grads[0].reshape(-1)  # a view when the gradient is contiguous
    else:
        _gather_grads(b, grads, grads_in_place(b, grads) if in_place is None else in_place)
        flat_g = b.flat_g
    for flat, per_param in zip(b.flat_extras, extras):
        for x, off, shape, stride in zip(per_param, b.offsets, b.shapes, b.strides):
            _view(flat, off, shape.numel(), shape, stride).copy_(x)
    t = b.t + 1
    states = [b.flat_state[n] for n in spec.state]
    _run_kernel(spec, hp, static, maximize, b.state_dtype, compile_opt, t, b.flat_p, flat_g, b.flat_extras, states)
    b.t = t
    b.step_tensor.fill_(float(t))


def _run_kernel(
    spec: ElementwiseSpec,
    hp: dict,
    static: dict,
    maximize: bool,
    state_dtype: torch.dtype,
    compile_opt: Any,
    t: int,
    p: torch.Tensor,
    g: torch.Tensor,
    extras: list,
    states: list,
    scalar_cache: dict | None = None,
) -> None:
    """Step ``t`` of the rule on same-shape tensors, in place: compiled (``compile_opt`` True, or ``"auto"`` at
    ``AUTO_COMPILE_MIN_NUMEL`` elements and more) or eager; a compiler failure under ``"auto"`` falls back to eager
    with a warning. ``scalar_cache`` (one dict per group and step) shares the compiled kernel's 0-D scalar tensors
    between calls of the same step count and device, so many shards pay one host-to-device copy, not one each."""
    scalars = step_scalars(spec, hp, t, HOST)
    key, fn = _get_fn(spec, static, maximize, state_dtype)
    use_compile = compile_opt is True or (
        compile_opt == "auto" and p.numel() >= AUTO_COMPILE_MIN_NUMEL and spec.is_fusable(hp)
    )
    if use_compile:
        cfn = _get_compiled(key, fn)
        if cfn is not None:
            sc = None if scalar_cache is None else scalar_cache.get((t, p.device))
            if sc is None:
                sc = torch.tensor([float(s) for s in scalars], dtype=torch.float64).to(p.device, non_blocking=True)
                sc = list(sc.unbind(0))
                if scalar_cache is not None:
                    scalar_cache[(t, p.device)] = sc
            try:
                cfn(p, g, list(extras), states, sc)
                return
            except Exception as exc:  # a compiler failure must not lose the step: fall back to eager, loudly
                if compile_opt is True:
                    raise
                _COMPILE_FAILED[key] = repr(exc)
                warnings.warn(
                    f"xpoptim: torch.compile of the {spec.title} step failed ({exc!r}); using the eager path",
                    UserWarning,
                    stacklevel=4,
                )
    _run_eager(fn, p, g, extras, states, [float(s) for s in scalars])


def _run_eager(fn: Callable, p: torch.Tensor, g: torch.Tensor, extras: list, states: list, scalars: list) -> None:
    """``fn`` over same-shape tensors; 1-D CPU tensors in cache-sized chunks (``EAGER_CHUNK``)."""
    n = p.numel()
    chunk = EAGER_CHUNK if p.device.type == "cpu" and p.ndim == 1 else n
    if n <= chunk:
        fn(p, g, extras, states, scalars)
        return
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        fn(p[s:e], g[s:e], [x[s:e] for x in extras], [x[s:e] for x in states], scalars)


# ------------------------------------------------------------------------------------------------------------------
# DTensor parameters (FSDP2 fully_shard, tensor parallelism): elementwise rules on the local shards
# ------------------------------------------------------------------------------------------------------------------


def is_sharded(t: Any) -> bool:
    """Is ``t`` a DTensor? (``torch.distributed.tensor`` not imported yet means no DTensor exists.)"""
    mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(mod, "DTensor", None) if mod is not None else None
    return cls is not None and isinstance(t, cls)


def sharded_state_init(names: Sequence[str], p: Any, state_dtype: torch.dtype) -> dict:
    """Zero state for a DTensor parameter: DTensors with the parameter's mesh, placements, shape and stride (what
    ``torch.zeros_like(p)`` gives torch.optim), so ``state_dict`` and ``torch.distributed.checkpoint`` see sharded
    state like torch.optim's."""
    from torch.distributed.tensor import DTensor

    local = p.to_local()
    out: dict[str, Any] = {}
    for name in names:
        zeros = torch.zeros(local.shape, dtype=state_dtype, device=local.device)
        out[name] = DTensor.from_local(zeros, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    out["step"] = torch.tensor(0.0, dtype=torch.float32)
    out["state_version"] = STATE_VERSION
    return out


def run_sharded(
    spec: ElementwiseSpec,
    hp: dict,
    static: dict,
    maximize: bool,
    state_dtype_opt: Any,
    compile_opt: Any,
    p: Any,
    g: Any,
    extras: Sequence[Any],
    state: dict,
    scalar_cache: dict | None = None,
) -> None:
    """One step of an elementwise rule on a DTensor parameter, on its local shard.

    An elementwise rule updates each element from that element alone, so stepping every rank's local shard is the
    step of the whole tensor, with no communication. The shard is written where it lives: FSDP2 all-gathers the
    next forward's weights from that memory, so the parameter is never moved into a flat buffer. ``compile_opt``
    applies per shard (``"auto"`` compiles shards of at least ``AUTO_COMPILE_MIN_NUMEL`` elements). The caller
    checked that ``g`` (and each extra) is a DTensor with the parameter's placements and local shape.
    """
    st = state[p]
    sdt = state_dtype_for(p, state_dtype_opt)
    if "step" not in st:
        st.update(sharded_state_init(spec.state, p, sdt))
    t = int(st["step"].item()) + 1
    local = [p.to_local(), g.to_local(), *(x.to_local() for x in extras), *(st[n].to_local() for n in spec.state)]
    if all(x.is_contiguous() for x in local):
        local = [x.view(-1) for x in local]
    k = 2 + len(extras)
    _run_kernel(spec, hp, static, maximize, sdt, compile_opt, t, local[0], local[1], local[2:k], local[k:], scalar_cache)
    st["step"].fill_(float(t))


# ------------------------------------------------------------------------------------------------------------------
# Matrix rules: same-shape matrices stacked through one Newton-Schulz call
# ------------------------------------------------------------------------------------------------------------------


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The matrix a parameter is treated as: 2-D as is, conv weights ``(out, in*kh*kw)``.

    Matrix-rule state (momentum, DeVA's rotated moments) is kept in this 2-D shape."""
    return (p.shape[0], int(p[0].numel())) if p.ndim > 2 else (p.shape[0], p.shape[1])


DEVA_KEYS = ("L", "R", "QL", "QR", "exp_avg", "exp_avg_sq", "gamma")


def matrix_state_init(spec: MatrixSpec, p: torch.Tensor, hp: dict, state_dtype: torch.dtype) -> dict:
    shape2 = matrix_shape(p)
    like = torch.zeros(shape2, dtype=state_dtype, device=p.device)
    out = dict(functional.init(spec, like, hp))
    out["step"] = torch.tensor(0.0, dtype=torch.float32)
    out["state_version"] = STATE_VERSION
    return out


def _chunked(fn: Callable, inputs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
    """``outs[k][...] = fn(*inputs)[k]`` for an elementwise ``fn``, over cache-sized flat chunks on CPU.

    Same-shape tensors, chunked by blocks of rows of their last axis; each chunk's temporaries stay in cache
    instead of one fresh full-size array per operation (on 4096x1024 float32, Muon's momentum and update took
    2-3 ms per operation out of cache). Inputs may be strided (a block of rows of a transposed view reads whole
    cache lines). Writing a chunk of an input that is also an output is safe: a chunk is read before it is written,
    and chunks are disjoint.
    """
    cols = outs[0].shape[-1]
    rows_in = [x.reshape(-1, cols) for x in inputs]  # a view also for a transposed Newton-Schulz result
    rows_out = [o.view(-1, cols) for o in outs]
    n = rows_out[0].shape[0]
    chunk = n if outs[0].device.type != "cpu" else max(1, EAGER_CHUNK // cols)
    for s in range(0, n, chunk):
        res = fn(*[x[s : s + chunk] for x in rows_in])
        for o, r in zip(rows_out, res):
            o[s : s + chunk].copy_(r)


def _stack(tensors: Sequence[torch.Tensor], shape2: tuple[int, int]) -> torch.Tensor:
    """``(k, n, m)`` stack of ``tensors`` as matrices; a view (no copy) when there is one contiguous tensor.

    Callers only read the stack: new values are computed out of place and written back after every check."""
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return tensors[0].view(shape2)[None]
    return torch.stack([x.reshape(shape2) for x in tensors])


def matrix_step(
    spec: MatrixSpec,
    params: Sequence[torch.Tensor],
    state: dict,
    hp: dict,
    maximize: bool,
    state_dtype_opt: Any,
    grads: Mapping[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """One step of a matrix rule for ``params`` (all with gradients): stacks of same-shape matrices.

    ``grads`` maps a parameter to its gradient when it is not ``p.grad``."""
    grad_of = (lambda p: p.grad) if grads is None else grads.__getitem__
    groups: dict[tuple, list] = {}
    for p in params:
        sdt = state_dtype_for(p, state_dtype_opt)
        if len(state[p]) == 0:
            state[p].update(matrix_state_init(spec, p, hp, sdt))
        key = (matrix_shape(p), p.dtype, sdt, p.device, int(state[p]["step"].item()))
        groups.setdefault(key, []).append(p)
    for (shape2, _dt, sdt, _dev, t0), ps in groups.items():
        t = t0 + 1
        g = _stack([grad_of(p) for p in ps], shape2).to(sdt)
        if maximize:
            g = -g
        scale = functional.matrix_scale(spec, hp, shape2, "out_in")
        sts = [state[p] for p in ps]
        if spec.name == "muon":
            mu, lr, wd = hp["momentum"], hp["lr"], hp["weight_decay"]
            buf = _stack([st["momentum_buffer"] for st in sts], shape2)
            n_in, new_buf = torch.empty_like(g), torch.empty_like(buf)
            _chunked(lambda gc, bc: muon_momentum(txp, gc, bc, mu, nesterov=hp["nesterov"]), (g, buf), (n_in, new_buf))
            o = newton_schulz(txp, n_in, **muon_ns_options(hp))  # a transposed view for a tall matrix
            pw = _stack([p.detach() for p in ps], shape2)
            direct = len(ps) == 1 and pw.dtype == sdt and pw.data_ptr() == ps[0].data_ptr()
            new_p = pw if direct else torch.empty(pw.shape, dtype=sdt, device=pw.device)
            # Nothing can fail from here on: the parameter may be written in place (a view of it when direct).
            _chunked(lambda pc, oc: (muon_apply(txp, pc.to(sdt), oc, lr, wd, scale),), (pw, o), (new_p,))
            if direct:
                new_p = None
            new_state = {"momentum_buffer": new_buf}
        else:
            stacked = {
                k: (None if sts[0][k] is None else torch.stack([st[k] for st in sts]))
                for k in DEVA_KEYS
            }
            delta, new_state = deva_sinf_host_step(txp, stacked, g, hp, t, scale)
            new_p = None
            if delta is not None:
                pw = _stack([p.detach() for p in ps], shape2).to(sdt)
                new_p = deva_sinf_apply(txp, pw, delta, hp["lr"], hp["weight_decay"])
        # Write back only after everything was computed.
        for i, (p, st) in enumerate(zip(ps, sts)):
            if new_p is not None:
                p.detach().copy_(new_p[i].reshape(p.shape))
            for name, val in new_state.items():
                if val is None:
                    continue
                cur = st[name]
                cur.copy_(val[i].reshape(cur.shape))
            st["step"].fill_(float(t))


def muon_step_sharded(spec: MatrixSpec, hp: dict, maximize: bool, state_dtype_opt: Any, p: Any, g: Any, state: dict) -> None:
    """One Muon step on a DTensor parameter (FSDP2): momentum and update on the local shard, Newton-Schulz on the
    whole matrix.

    Muon's momentum and its final update are elementwise, so they stay on each rank's shard (the momentum buffer is
    a DTensor with the parameter's placements, in the parameter's shape). Newton-Schulz orthogonalizes the whole
    matrix: its input is all-gathered (``full_tensor``), every rank runs the same Newton-Schulz on it, and each
    keeps its own shard of the result (``Replicate`` -> the parameter's placements, a local slice). Costs one
    all-gather of the matrix per step and the whole Newton-Schulz on every rank (as in distributed Muon
    implementations that do not split the matrices across ranks).
    """
    from torch.distributed.tensor import DTensor, Replicate

    st = state[p]
    sdt = state_dtype_for(p, state_dtype_opt)
    if "step" not in st:
        st.update(sharded_state_init(("momentum_buffer",), p, sdt))
    t = int(st["step"].item()) + 1
    mesh, placements = p.device_mesh, p.placements
    gl = g.to_local().to(sdt)
    if maximize:
        gl = -gl
    buf = st["momentum_buffer"].to_local()
    n_in, new_buf = muon_momentum(txp, gl, buf, hp["momentum"], nesterov=hp["nesterov"])
    full = DTensor.from_local(n_in, mesh, placements, run_check=False, shape=p.shape, stride=p.stride()).full_tensor()
    shape2 = matrix_shape(p)
    o = newton_schulz(txp, full.reshape(shape2), **muon_ns_options(hp)).reshape(p.shape).contiguous()
    o_local = DTensor.from_local(o, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, placements).to_local()
    pl = p.to_local()
    new_p = muon_apply(txp, pl.to(sdt), o_local, hp["lr"], hp["weight_decay"], functional.matrix_scale(spec, hp, shape2, "out_in"))
    pl.copy_(new_p)
    buf.copy_(new_buf)
    st["step"].fill_(float(t))


def deva_step_sharded(spec: MatrixSpec, hp: dict, maximize: bool, state_dtype_opt: Any, p: Any, g: Any, state: dict) -> None:
    """One DeVASinf step on a DTensor parameter (FSDP2): the whole matrix step on every rank, then each rank keeps
    its shard.

    DeVASinf's Kronecker factors and eigenbases need the whole gradient, so the parameter and its gradient are
    all-gathered (``full_tensor``), every rank runs the same :func:`matrix_step` on the full matrix, and each writes
    its own slice of the result back into its shard. The state (factors, bases, rotated moments) is replicated:
    DTensors with ``Replicate`` placements, so ``state_dict`` and ``torch.distributed.checkpoint`` handle it.
    Costs two all-gathers per step and the full step (eigendecompositions included) on every rank.
    """
    from torch.distributed.tensor import DTensor, Replicate

    mesh, placements = p.device_mesh, p.placements
    replicate = [Replicate()] * mesh.ndim
    full_p, full_g = p.full_tensor().detach(), g.full_tensor().detach()
    st = state[p]
    local_state = {k: (v.to_local() if is_sharded(v) else v) for k, v in st.items()}
    work = {full_p: local_state}
    matrix_step(spec, [full_p], work, hp, maximize, state_dtype_opt, grads={full_p: full_g})
    for k, v in local_state.items():
        if is_sharded(st.get(k)):
            continue  # updated in place through its local tensor
        st[k] = DTensor.from_local(v, mesh, replicate, run_check=False) if isinstance(v, torch.Tensor) and k != "step" else v
    mine = DTensor.from_local(full_p, mesh, replicate, run_check=False).redistribute(mesh, placements).to_local()
    p.to_local().copy_(mine)
