"""optax adapter: every xpoptim optimizer as an optax ``GradientTransformation``.

Two layers, as in optax itself:

* ``scale_by_<name>(...)``: the rule's *direction* (no learning rate, no weight decay), built from
  the core's fusable direction kernel (:func:`xpoptim.core.make_direction_kernel`) with the
  step-derived scalars (bias corrections, kappa, rho) computed *in the graph* from the int32 step
  counter (:func:`xpoptim.core.step_scalars` / ``spec.scalars(hp, t, ops=jnp)``). Its state is a
  ``NamedTuple`` of arrays (``ScaleBy<Title>State``): ``count`` (int32, saturating increment) and one
  pytree per state buffer, named as in the core spec (``exp_avg``, ``exp_avg_sq``, ...).
* ``<name>(learning_rate, ..., weight_decay=..., *, mask=None, state_dtype=None)``: the alias, a
  ``GradientTransformationExtraArgs`` chaining the decay (before the rule for coupled L2 decay,
  after it for decoupled decay, exactly as ``optax.adamw`` does), the rule and
  ``optax.scale_by_learning_rate`` (a float or a schedule). Updates follow optax's sign: they are
  *added* by ``optax.apply_updates``.

``create(name, **hp)`` builds an alias by registry name and accepts ``lr`` or ``learning_rate``.

Hyperparameter names are the core spec's names (``beta1``, ``beta2``, ``eps``, ``mu``, ...), the
same as in the torch adapter. They are validated when the transformation is built (``spec.validate``:
a ``ValueError`` naming the argument, the value and what is allowed). Numeric hyperparameters may be
traced 0-D arrays (``optax.inject_hyperparams``). Switches stay Python values: bools and strings are
static for ``inject_hyperparams`` anyway, and the integer switches (``ns_steps``,
``precondition_frequency``, ``max_precond_dim``) default to ``None`` (= the spec's default) so that
they are not injected; pass them in ``static_args`` when you set them.

Numerics policy: gradients are cast to the state dtype and the rule runs there. The default state
dtype is the leaf's own dtype, except float32 for bfloat16/float16 leaves (``state_dtype=`` overrides
it for every leaf). Step scalars are computed in float32 (float64 with x64 enabled) and cast to the
state dtype, never formed in bf16/fp16. ``scale_by_*`` return updates in the leaf dtype; the aliases
keep the whole chain (rule, decay, learning rate) in the state dtype and cast the update to the leaf
dtype once, at the end. ``optax.inject_hyperparams`` casts injected hyperparameters to the *params'*
highest dtype; for pure-bf16 models pass ``hyperparam_dtype=jnp.float32`` (bf16(0.999) == 1).

Matrix rules (Muon, DeVA_Sinf): ``scale_by_muon`` / ``scale_by_deva_sinf`` act on matrix leaves;
the aliases route every leaf with dimension numbers to the matrix rule and the rest to the spec's
elementwise ``fallback`` (AdamW for Muon with KellerJordan/Muon's auxiliary settings, DeVA_linf with
its own defaults for DeVA_Sinf), via ``optax.partition``. :class:`DimensionNumbers` says which axes
are the reduction (fan-in) and output (fan-out) axes; all other axes are batch axes. The default for a
2-D leaf is flax's ``(in, out)`` kernel layout (reduction axis 0, output axis 1), so the shape scale
equals the torch adapter's on the transposed ``Linear.weight``.

Speed (shared 2-core CPU, jit with donated buffers, ratios from interleaved runs, noisy): per leaf,
the rule compiles to the same loops as ``optax.adamw`` (adamw 0.85-1.05x of ``optax.adamw`` on one
16M leaf, 1.01-1.07x on 200 x 80k; MVN-Grad 1.14-1.5x on 16M: XLA's CPU backend emits one loop per
state output, and MVN-Grad has three state buffers). With thousands of small leaves a jitted step is
bound by the per-leaf overhead, and :func:`ravel_by_dtype` (parameters kept flat, one 1-D array per
dtype) is the fast path: 2000 x 1k leaves, 2.3-6.6 ms per step against 30-67 ms for ``optax.adamw``
(9.7-12.9x), compiled in 0.2-0.6 s against 13-28 s. :func:`flatten_by_dtype` (state flat per dtype,
parameters still a pytree: gradients are concatenated and updates split inside the jit) gained only
1.1x there and took 116 s to compile on CPU; use it for a few hundred leaves on GPU, not for
thousands on CPU.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Protocol, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xpoptim.core import BUILTIN, DEVA_SINF, MUON, SPECS, default_state_dtype, get_spec, make_direction_kernel
from xpoptim.core import moments as _moments
from xpoptim.core.functional import matrix_scale
from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

from ._optax_docs import _alias_doc, _doc_args, _scale_by_doc, _sig_default

if TYPE_CHECKING:
    from xpoptim.portable import PortableState

__all__ = [
    "create",
    "DimensionNumbers",
    "grad_variance",
    "per_example_grad_variance",
    "ravel_by_dtype",
    "flatten_by_dtype",
    "FlattenByDtypeState",
    "ScaleByMuonState",
    "ScaleByDeVASinfState",
    "DecayAfterState",
    "export_state",
    "import_state",
]

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


class _TreeDef(Protocol):
    """What this module calls on a ``jax.tree_util.PyTreeDef``. jaxlib ships that class without type stubs, so jax's
    own annotations leave it unresolved for type checkers; the tree definitions here are typed with this."""

    def flatten_up_to(self, tree: Any, /) -> list[Any]: ...

    def unflatten(self, leaves: Iterable[Any], /) -> Any: ...


def _structure(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> _TreeDef:
    """``jax.tree.structure``, typed as :class:`_TreeDef` (compared with ``==``)."""
    return jax.tree.structure(tree, is_leaf=is_leaf)


def _default_state_dtype(leaf_dtype: Any, state_dtype: Any) -> Any:
    """The core's state dtype policy (:func:`xpoptim.core.default_state_dtype`) as a JAX dtype: ``state_dtype`` if
    given, else the leaf's, float32 for bf16/fp16."""
    return jnp.dtype(default_state_dtype(jnp.dtype(leaf_dtype), state_dtype, jnp.float32))


def _zero_count(params: Any) -> jax.Array:
    """The int32 step counter, placed like the parameters.

    For parameters sharded with a ``NamedSharding`` the counter is replicated over the same mesh, which is
    where a jitted update returns it; an uncommitted single-device counter would make the second jitted
    call compile again (``optax.adamw``'s eager ``init`` has that extra compile).
    """
    count = jnp.zeros([], jnp.int32)
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
        if isinstance(sharding, jax.sharding.NamedSharding) and not isinstance(leaf, jax.core.Tracer):
            return jax.device_put(count, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return count


def _float_dtype() -> Any:
    """float64 when x64 is enabled (at trace time), else float32."""
    return jnp.dtype(jnp.result_type(float))


def _hp_for_scalars(hp: Mapping[str, Any]) -> dict:
    """Hyperparameters as the scalar code sees them: arrays upcast to >= float32 (never bf16 math)."""
    out = {}
    for k, v in hp.items():
        if isinstance(v, (jax.Array, np.ndarray)) and jnp.issubdtype(v.dtype, jnp.floating):
            v = jnp.asarray(v)
            if v.dtype in _LOW_PRECISION:
                v = v.astype(jnp.float32)
        out[k] = v
    return out


def _cast_scalar(s: Any, dtype: Any) -> Any:
    if isinstance(s, (jax.Array, np.ndarray)):
        return jnp.asarray(s).astype(dtype)
    return s


def _check_static(spec: Any, hp: Mapping[str, Any]) -> dict:
    """Validate hyperparameters at construction; turn concrete 0-D arrays for switches into Python values."""
    hp = dict(hp)
    for h in spec.hyperparams:
        if h.name not in hp:
            continue
        v = hp[h.name]
        if v is None and h.kind == "int_pos":
            # Integer switches default to None in our signatures so that optax.inject_hyperparams (which
            # injects every int/float argument, defaults included) leaves them static.
            hp[h.name] = h.default
            continue
        if h.kind in ("bool", "choice", "int_pos") and isinstance(v, (jax.Array, np.ndarray)):
            try:
                py = v.item()
            except Exception:
                raise ValueError(
                    f"{spec.title}: {h.name} is a traced array, but it is a static switch ({h.kind}); "
                    f"with optax.inject_hyperparams pass static_args=({h.name!r},)"
                ) from None
            hp[h.name] = bool(py) if h.kind == "bool" else int(py) if h.kind == "int_pos" else py
    return spec.validate(**hp)


def _split_hp(spec: Any, hp: Mapping[str, Any]) -> dict:
    """Drop lr and weight_decay: the direction layer does not use them."""
    return {k: v for k, v in hp.items() if k not in ("lr", "weight_decay")}


# ----------------------------------------------------------------------------------------------
# Input checks (clear errors instead of JAX internals)
# ----------------------------------------------------------------------------------------------


def _leaves_with_paths(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)[0]


def _check_real_leaves(title: str, tree: Any, what: str) -> None:
    """Refuse complex and integer (and boolean) leaves, naming the leaf: the rules are defined for real floats.

    A complex leaf would get ``g * g`` where ``|g|^2`` is meant; an integer leaf would be moved by whole numbers
    or not at all. Split complex parameters into real and imaginary parts (two real leaves) and keep integer
    arrays out of the optimized tree (``optax.masked`` / ``optax.set_to_zero`` for them).
    """
    for path, leaf in _leaves_with_paths(tree):
        if _is_masked(leaf) or leaf is None:
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(f"{title}: {what} leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}: expected an array")
        if not jnp.issubdtype(dtype, jnp.floating):
            hint = (
                "split it into real and imaginary parts (two real leaves)"
                if jnp.issubdtype(dtype, jnp.complexfloating)
                else "keep it out of the optimized tree (optax.masked / optax.set_to_zero)"
            )
            raise TypeError(
                f"{title}: {what} leaf {jax.tree_util.keystr(path)} has dtype {jnp.dtype(dtype)}: expected a real "
                f"floating dtype (float16, bfloat16, float32, float64); {hint}"
            )


def _check_same_tree(title: str, tree: Any, like: Any, what: str, like_what: str) -> None:
    """Refuse a ``tree`` whose structure or leaf shapes differ from ``like``, naming the first difference."""
    got, want = _leaves_with_paths(tree), _leaves_with_paths(like)
    got_paths = [jax.tree_util.keystr(p) for p, _ in got]
    want_paths = [jax.tree_util.keystr(p) for p, _ in want]
    if got_paths != want_paths or _structure(tree, _is_masked) != _structure(like, _is_masked):
        missing = [p for p in want_paths if p not in set(got_paths)]
        extra = [p for p in got_paths if p not in set(want_paths)]
        raise ValueError(
            f"{title}: the {what} do not have the structure of the {like_what} (missing leaves {missing}, "
            f"unexpected leaves {extra}; {what}: {jax.tree.structure(tree, is_leaf=_is_masked)}, "
            f"{like_what}: {jax.tree.structure(like, is_leaf=_is_masked)})"
        )
    for (path, a), (_, b) in zip(got, want):
        if _is_masked(a) != _is_masked(b):
            raise ValueError(
                f"{title}: {what} leaf {jax.tree_util.keystr(path)} is {'masked' if _is_masked(a) else 'an array'} but "
                f"in the {like_what} it is {'masked' if _is_masked(b) else 'an array'} (was the state built from other params?)"
            )
        if _is_masked(a) or a is None or b is None:
            continue
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"{title}: {what} leaf {jax.tree_util.keystr(path)} has shape {tuple(a.shape)}: expected {tuple(b.shape)} "
                f"as in the {like_what}"
            )


def _check_grad_variance(title: str, tree: Any) -> None:
    """A concrete ``grad_variance`` must be >= 0 and not NaN (refused here); a traced one cannot be inspected,
    and the rule turns its negative or NaN elements into NaN updates (``optax.apply_if_finite`` skips them)."""
    for path, leaf in _leaves_with_paths(tree):
        if _is_masked(leaf) or isinstance(leaf, jax.core.Tracer):
            continue
        arr = np.asarray(leaf)
        if arr.size and not bool(np.all(arr >= 0)):
            bad = arr[~(arr >= 0)].reshape(-1)[0]
            raise ValueError(
                f"{title}: grad_variance leaf {jax.tree_util.keystr(path)} holds {bad!r}: expected a per-element variance "
                ">= 0 (not NaN), e.g. from xpoptim.adapters.optax.grad_variance"
            )


def _traced_guard(spec: Any, hp: Mapping[str, Any]) -> Any:
    """1, or NaN when a traced hyperparameter is invalid (the update becomes NaN); under
    ``jax.experimental.checkify.checkify`` the same condition is a check with a message naming the values."""
    ok, names = spec.traced_validity(hp)
    if ok is None:
        return None
    from jax.experimental import checkify  # noqa: PLC0415

    values = {n: hp[n] for n in names}
    checkify.debug_check(
        jnp.all(ok),
        f"{spec.title}: an injected hyperparameter is invalid: " + ", ".join(f"{n}={{{n}}}" for n in names),
        **values,
    )
    return jnp.where(jnp.all(ok), 1.0, jnp.nan)


def _checked(title: str, tx: Any) -> optax.GradientTransformationExtraArgs:
    """``tx`` with the input checks: real floating leaves (params at ``init``, updates at ``update``) and, when
    ``params`` are given to ``update``, updates of the params' structure and shapes. The state is ``tx``'s own."""
    tx = optax.with_extra_args_support(tx)

    def init_fn(params: Any) -> Any:
        _check_real_leaves(title, params, "params")
        return tx.init(params)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple:
        _check_real_leaves(title, updates, "updates")
        if params is not None:
            _check_same_tree(title, updates, params, "updates", "params")
        try:
            return tx.update(updates, state, params, **extra_args)
        except (ValueError, TypeError) as exc:
            text = str(exc)
            ours = text.startswith(f"{title}:")
            if not ours and ("key mismatch" in text or "pytree" in text.lower() or "tree structure" in text):
                raise ValueError(
                    f"{title}: the updates do not have the structure of the state built by init "
                    f"(updates: {jax.tree.structure(updates, is_leaf=_is_masked)}); was init called with other params? "
                    f"({text.splitlines()[0]})"
                ) from exc
            raise

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Elementwise rules
# ----------------------------------------------------------------------------------------------


def _make_state_class(title: str, fields: tuple[str, ...], doc: str) -> type[Any]:
    """A ``ScaleBy<title>State`` NamedTuple class made at run time (a rule added with ``xpoptim.core.register``):
    ``count`` then ``fields``; its instances are typed ``Any`` (their fields are known only at run time)."""
    # a class name known only at run time (type checkers want a literal): the class is typed type[Any]
    cls = NamedTuple(f"ScaleBy{title}State", [("count", jax.Array)] + [(n, Any) for n in fields])  # type: ignore[misc]
    cls.__module__ = __name__
    cls.__doc__ = doc
    return cls


def _scale_by_elementwise(
    spec: ElementwiseSpec, hp: Mapping[str, Any], state_dtype: Any = None, leaf_dtype_out: bool = True
) -> optax.GradientTransformationExtraArgs:
    """The direction layer of an elementwise spec (see module docstring).

    ``leaf_dtype_out=False`` leaves the direction in the state dtype (the aliases cast once, at the end of
    their chain, so a bf16 leaf's update is rounded once, not after every stage)."""
    static = spec.static(hp)
    kernel = make_direction_kernel(spec, jnp, static)
    state_cls = _state_class(spec)
    names = spec.state

    def init_fn(params: Any) -> Any:
        _check_real_leaves(spec.title, params, "params")

        def zeros(p: Any) -> Any:
            return jnp.zeros_like(p, dtype=_default_state_dtype(p.dtype, state_dtype))

        buffers = {name: jax.tree.map(zeros, params) for name in names}
        return state_cls(count=_zero_count(params), **buffers)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple:
        del params
        if not isinstance(state, state_cls):
            raise TypeError(
                f"{spec.title}: state is a {type(state).__name__}: expected the {state_cls.__name__} built by this "
                "transformation's init (a state of another optimizer or layout?)"
            )
        _check_real_leaves(spec.title, updates, "updates")
        _check_same_tree(spec.title, updates, getattr(state, names[0]), "updates", f"state ({names[0]})")
        extras = []
        for name in spec.extras:
            if name not in extra_args or extra_args[name] is None:
                raise ValueError(
                    f"{spec.title} needs the per-element gradient variance: call update(..., {name}=tree) with a "
                    "pytree like the gradients (see xpoptim.adapters.optax.grad_variance)"
                )
            _check_real_leaves(spec.title, extra_args[name], name)
            _check_same_tree(spec.title, extra_args[name], updates, name, "updates")
            _check_grad_variance(spec.title, extra_args[name])
            extras.append(extra_args[name])
        guard = _traced_guard(spec, hp)
        count = optax.safe_increment(state.count)
        t = count.astype(_float_dtype())
        raw = spec.rule_scalars(_hp_for_scalars(hp), t, jnp)
        cache: dict = {}

        def scalars_for(dtype: Any) -> tuple:
            if dtype not in cache:
                cache[dtype] = tuple(_cast_scalar(s, dtype) for s in raw)
            return cache[dtype]

        treedef: _TreeDef
        g_leaves, treedef = jax.tree.flatten(updates)
        extra_leaves = [treedef.flatten_up_to(e) for e in extras]
        state_leaves = [treedef.flatten_up_to(getattr(state, n)) for n in names]
        out_d: list[Any] = []
        out_s: list[list[Any]] = [[] for _ in names]
        for i, g in enumerate(g_leaves):
            st = [s[i] for s in state_leaves]
            sd = st[0].dtype
            gs = g.astype(sd)
            ex = [e[i].astype(sd) for e in extra_leaves]
            res = kernel(gs, *ex, *st, *scalars_for(sd))
            d = res[0] if guard is None else res[0] * guard.astype(sd)
            out_d.append(d.astype(g.dtype) if leaf_dtype_out else d)
            for j, s in enumerate(res[1:]):
                out_s[j].append(s.astype(sd))
        new = {n: treedef.unflatten(out_s[j]) for j, n in enumerate(names)}
        new_state = state_cls(count=count, **new)
        if guard is not None:  # an invalid traced hyperparameter: NaN update, the state stays as it was
            keep = jnp.isnan(guard)
            new_state = jax.tree.map(lambda n, o: jnp.where(keep, o, n), new_state, state)
        return treedef.unflatten(out_d), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _decay(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
    """``add_decayed_weights``, or for a Python zero a no-op with the same state structure (``EmptyState``, masked
    like ``add_decayed_weights`` masks it), so the state of ``alias(weight_decay=0.0)`` and of the same alias
    under ``optax.inject_hyperparams`` (where 0 is a traced array and the decay stage must exist) have one tree
    structure: a checkpoint of one restores into the other."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0 and not isinstance(weight_decay, bool):
        return optax.identity() if mask is None else optax.masked(optax.identity(), mask)
    return optax.add_decayed_weights(weight_decay, mask)


def _elementwise_alias(spec: ElementwiseSpec, learning_rate: Any, hp: dict, mask: Any, state_dtype: Any) -> optax.GradientTransformationExtraArgs:
    full = _check_static(spec, {**hp, "lr": learning_rate if not callable(learning_rate) else spec.defaults["lr"]})
    rule = _scale_by_elementwise(spec, _split_hp(spec, full), state_dtype, leaf_dtype_out=False)
    wd = hp.get("weight_decay", spec.defaults["weight_decay"])
    decay = _decay(wd, mask)
    parts = []
    if spec.weight_decay == "coupled":
        parts.append(decay)
    parts.append(rule)
    if spec.weight_decay == "decoupled":
        parts.append(decay)
    parts.append(optax.scale_by_learning_rate(learning_rate))
    guard = {"lr": learning_rate, "weight_decay": wd}
    return _checked(spec.title, _preserve_dtypes(optax.chain(*parts), lambda: _traced_guard(spec, guard)))


def _preserve_dtypes(inner: optax.GradientTransformation, guard: Callable | None = None) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` (which may compute in the state dtype) and cast its updates to the incoming updates' dtypes;
    ``guard()`` (traced-hyperparameter check, 1 or NaN, or None) multiplies them."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple:
        new, state = inner.update(updates, state, params, **extra_args)
        g = None if guard is None else guard()
        if g is not None:
            new = jax.tree.map(lambda u: u * g.astype(u.dtype), new)
        return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# ----------------------------------------------------------------------------------------------
# Matrix layout: dimension numbers
# ----------------------------------------------------------------------------------------------


class DimensionNumbers(NamedTuple):
    """Which axes of a weight form the matrix a matrix rule acts on.

    The weight acts as ``x @ W = y``: ``reduction_axis`` are the fan-in axes, ``output_axis`` the
    fan-out axes; every other axis is a batch axis (each batch entry is its own matrix). The default,
    ``(0, 1)``, is flax's ``Dense.kernel`` layout ``(in, out)``; a torch ``Linear.weight`` would be
    ``DimensionNumbers(reduction_axis=1, output_axis=0)``; a flax ``Conv`` kernel ``(kh, kw, in, out)``
    flattened as Muon does is ``DimensionNumbers((0, 1, 2), 3)``. Same fields as
    ``optax.contrib.MuonDimensionNumbers`` (which is accepted too).
    """

    reduction_axis: Union[int, tuple] = 0
    output_axis: Union[int, tuple] = 1


def _is_dims(x: Any) -> bool:
    return hasattr(x, "reduction_axis") and hasattr(x, "output_axis")


def _axes(a: Any, ndim: int) -> tuple:
    a = (a,) if isinstance(a, int) else tuple(a)
    return tuple(int(i) % ndim for i in a)


class _Layout(NamedTuple):
    perm: tuple
    inv: tuple
    batch_shape: tuple
    red_shape: tuple
    out_shape: tuple

    @property
    def fans(self) -> tuple:
        return int(math.prod(self.red_shape)), int(math.prod(self.out_shape))


def _layout(shape: tuple, dims: Any) -> _Layout:
    ndim = len(shape)
    red, out = _axes(dims.reduction_axis, ndim), _axes(dims.output_axis, ndim)
    if not red or not out or set(red) & set(out) or len(set(red)) != len(red) or len(set(out)) != len(out):
        raise ValueError(
            f"dimension_numbers={dims!r} is invalid for a leaf of shape {shape}: expected disjoint, non-empty "
            "reduction and output axes"
        )
    batch = tuple(i for i in range(ndim) if i not in red and i not in out)
    perm = batch + red + out
    inv = tuple(int(i) for i in np.argsort(perm))
    return _Layout(perm, inv, tuple(shape[i] for i in batch), tuple(shape[i] for i in red), tuple(shape[i] for i in out))


def _to_matrix(x: Any, lay: _Layout) -> Any:
    """Leaf -> ``(batch, fan_in, fan_out)`` (or ``(fan_in, fan_out)`` without batch axes)."""
    fi, fo = lay.fans
    x = jnp.transpose(x, lay.perm)
    if lay.batch_shape:
        return x.reshape((int(math.prod(lay.batch_shape)), fi, fo))
    return x.reshape((fi, fo))


def _from_matrix(x: Any, lay: _Layout) -> Any:
    x = x.reshape(lay.batch_shape + lay.red_shape + lay.out_shape)
    return jnp.transpose(x, lay.inv)


def _default_dims(leaf: Any) -> Any:
    return DimensionNumbers() if getattr(leaf, "ndim", 0) == 2 else None


def _resolve_dims(dimension_numbers: Any, tree: Any) -> tuple:
    """Per-leaf dims aligned with ``tree`` flattened with MaskedNode as a leaf: ``(leaves, treedef, dims)``."""
    treedef: _TreeDef
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_masked)
    if dimension_numbers is None:
        dims = [None if _is_masked(x) else _default_dims(x) for x in leaves]
    elif _is_dims(dimension_numbers):
        dims = [None if _is_masked(x) else dimension_numbers for x in leaves]
    else:
        # A function is a pytree leaf; a callable pytree (an equinox Module) is a tree of dimension numbers.
        is_fn = callable(dimension_numbers) and jax.tree_util.treedef_is_leaf(jax.tree.structure(dimension_numbers))
        dn = dimension_numbers(tree) if is_fn else dimension_numbers
        is_dim = lambda x: x is None or _is_dims(x) or _is_masked(x)  # noqa: E731
        try:  # dn is a prefix of the parameters: broadcast each entry over its subtree (None subtrees stay empty)
            full = jax.tree.map(lambda d, sub: jax.tree.map(lambda _: d, sub, is_leaf=_is_masked), dn, tree, is_leaf=is_dim)
            dims = treedef.flatten_up_to(full)
        except (ValueError, TypeError):
            n = len(jax.tree.flatten(dn, is_leaf=is_dim)[0])
            raise ValueError(
                f"dimension_numbers has {n} entries but the parameters have {len(leaves)} leaves: give one "
                "DimensionNumbers (or None) per leaf, or per subtree"
            ) from None
        dims = [None if _is_masked(x) or _is_masked(d) else d for x, d in zip(leaves, dims)]
    return leaves, treedef, dims


def _matrix_labels(dimension_numbers: Any) -> Callable:
    def labels(params: Any) -> Any:
        leaves, treedef, dims = _resolve_dims(dimension_numbers, params)
        return treedef.unflatten(["matrix" if d is not None else "fallback" for d in dims])

    return labels


def _require_matrix(title: str, leaf: Any, d: Any) -> Any:
    if d is None:
        raise ValueError(
            f"{title}: a leaf of shape {tuple(leaf.shape)} has no dimension numbers: scale_by_{title.lower()} "
            "acts on matrices only; give dimension_numbers, or use the alias, which routes non-matrix leaves "
            "to the elementwise fallback"
        )
    return _layout(tuple(leaf.shape), d)


def _map_matrix_leaves(title: str, dimension_numbers: Any, tree: Any, fn: Callable, *states: Any) -> tuple:
    """``fn(leaf, layout, *state_leaves) -> tuple`` on every matrix leaf of ``tree``; masked leaves pass through.

    ``states`` are pytrees with the structure of ``tree`` (a transformation's state); a masked leaf keeps
    ``(leaf, *state_leaves)`` as they are. Returns one pytree per entry of ``fn``'s tuple (``1 + len(states)``).
    """
    leaves, treedef, dims = _resolve_dims(dimension_numbers, tree)
    flat = [treedef.flatten_up_to(s) for s in states]
    results = [(x, *sts) if _is_masked(x) else fn(x, _require_matrix(title, x, d), *sts) for x, d, *sts in zip(leaves, dims, *flat)]
    return tuple(treedef.unflatten([r[i] for r in results]) for i in range(1 + len(states)))


# ----------------------------------------------------------------------------------------------
# Matrix rules: one transformation for every MatrixSpec
# ----------------------------------------------------------------------------------------------


class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`: ``count`` (int32) and ``momentum_buffer`` (like the params)."""

    count: jax.Array  # type: ignore[assignment]  # optax state convention: the field shadows tuple.count
    momentum_buffer: Any


class ScaleByDeVASinfState(NamedTuple):
    """State of :func:`scale_by_deva_sinf`.

    ``count``: int32 calls so far (the first call seeds the preconditioner); ``preconditioner``: per
    matrix leaf the core's state dict (``L``, ``R``, ``QL``, ``QR`` (None on a side larger than
    ``max_precond_dim``), ``exp_avg``, ``exp_avg_sq``, ``gamma``) in the ``(batch, fan_in, fan_out)``
    layout.
    """

    count: jax.Array  # type: ignore[assignment]  # optax state convention: the field shadows tuple.count
    preconditioner: Any


def _matrix_state_class(spec: MatrixSpec) -> type[Any]:
    """The state class of ``scale_by_<name>``: ``count`` plus one pytree like the params per state array when the
    state is elementwise (``spec.sharding == "elementwise"``: it shards like the params), else ``count`` and
    ``preconditioner`` (one state dict per matrix leaf, in the ``(batch, fan_in, fan_out)`` layout)."""
    known: dict[str, type[Any]] = {"muon": ScaleByMuonState, "deva_sinf": ScaleByDeVASinfState}
    if spec.name in known and known[spec.name]._fields[1:] == _matrix_state_fields(spec):
        return known[spec.name]
    cls = _STATE_CLASSES.get(spec.name)
    if cls is None or cls._fields[1:] != _matrix_state_fields(spec):
        fields = _matrix_state_fields(spec)
        doc = f"State of :func:`scale_by_{spec.name}`: ``count`` (int32) and {', '.join(fields)}."
        cls = _STATE_CLASSES[spec.name] = _make_state_class(spec.title, fields, doc)
    return cls


def _matrix_state_fields(spec: MatrixSpec) -> tuple[str, ...]:
    return tuple(spec.state) if spec.sharding == "elementwise" else ("preconditioner",)


def _hp_in(hpn: Mapping[str, Any], dtype: Any) -> dict:
    """Array hyperparameters (traced, ``inject_hyperparams``) cast to the state dtype; Python values as they are."""
    return {k: _cast_scalar(v, dtype) for k, v in hpn.items()}


def _scale_by_matrix(
    spec: MatrixSpec, hp: Mapping[str, Any], dimension_numbers: Any, state_dtype: Any, leaf_dtype_out: bool = True
) -> optax.GradientTransformationExtraArgs:
    """The direction layer of a matrix spec on matrix leaves (no learning rate, no decay).

    Each leaf is seen as ``(batch, fan_in, fan_out)`` matrices (:class:`DimensionNumbers`); the spec's
    ``direction`` runs on them in the state dtype, and the update is ``scale * d`` (``d`` when the spec's direction
    includes the shape scale), zero in a still phase. With several phases (DeVA_Sinf's seed / step / refresh) the
    phase is chosen on the traced counter with ``jax.lax.switch`` (control flow only; the math is the core's), so
    the jitted update never recompiles.

    Args:
        spec: the matrix spec.
        hp: its validated hyperparameters (``lr`` and ``weight_decay`` are not used here).
        dimension_numbers: see :func:`scale_by_muon`.
        state_dtype: dtype of the state (default: the leaf's, float32 for bf16/fp16).
        leaf_dtype_out: return updates in the leaf dtype (False: in the state dtype, for the aliases).

    Returns:
        A ``GradientTransformationExtraArgs`` with state :func:`_matrix_state_class` ``(spec)``.
    """
    state_cls = _matrix_state_class(spec)
    elementwise_state = spec.sharding == "elementwise"
    names = tuple(spec.state)
    title = spec.title

    def init_fn(params: Any) -> Any:
        _check_real_leaves(title, params, "params")

        def init_leaf(x: Any, lay: Any) -> tuple:
            sd = _default_state_dtype(x.dtype, state_dtype)
            if elementwise_state:  # elementwise state: built like the leaf, so it is placed (sharded) like it
                st = spec.init(jnp, jnp.zeros_like(x, dtype=sd), hp)
                return tuple(st[n] for n in names)
            like = jnp.zeros(_to_matrix(x, lay).shape, dtype=sd)
            # Built under jit so that every buffer has the same placement (the core passes device= to its creation
            # calls, which would commit some buffers and not others, and a jitted update would then compile twice).
            return (jax.jit(lambda a: spec.init(jnp, a, hp))(like),)

        leaves, treedef, dims = _resolve_dims(dimension_numbers, params)
        k = len(state_cls._fields) - 1
        columns: list[list] = [[] for _ in range(k)]
        for x, d in zip(leaves, dims):
            res = (x,) * k if _is_masked(x) else init_leaf(x, _require_matrix(title, x, d))
            for col, r in zip(columns, res):
                col.append(r)
        return state_cls(_zero_count(params), *(treedef.unflatten(col) for col in columns))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple:
        del params, extra_args
        if not isinstance(state, state_cls):
            raise TypeError(
                f"{title}: state is a {type(state).__name__}: expected the {state_cls.__name__} built by this "
                "transformation's init (a state of another optimizer or layout?)"
            )
        _check_real_leaves(title, updates, "updates")
        guard = _traced_guard(spec, hp)
        hpn = _hp_for_scalars(hp)
        count = optax.safe_increment(state.count)
        t = count.astype(_float_dtype())
        index = spec.phase(hp, count, jnp) if len(spec.phases) > 1 else 0

        def leaf_update(g: Any, lay: Any, *sts: Any) -> tuple:
            st = {n: _to_matrix(s, lay) for n, s in zip(names, sts)} if elementwise_state else sts[0]
            sd = next(v for v in (st[n] for n in names) if v is not None).dtype
            hps = _hp_in(hpn, sd)
            g3 = _to_matrix(g.astype(sd), lay)
            if g3.size == 0:
                # A matrix with a zero-size side has nothing to update: a zero (empty) update and its state as it
                # was, as the torch and NumPy adapters skip it (a phase's reductions have no identity there).
                out = jnp.zeros(g.shape, g.dtype if leaf_dtype_out else sd)
                return (out, *sts) if elementwise_state else (out, sts[0])
            scale = matrix_scale(spec, hp, lay.fans, layout="in_out")

            def run(phase: str) -> Callable:
                def branch(st: dict) -> tuple:
                    d, new = spec.direction(jnp, phase, g3, st, hps, t, scale, jnp)
                    d = jnp.zeros_like(g3) if d is None else d.astype(sd)
                    return d, _same_types(new, st)

                return branch

            if len(spec.phases) == 1:
                d, new = spec.direction(jnp, spec.phases[0], g3, st, hps, t, scale, jnp)
                d = jnp.zeros_like(g3) if d is None else d
            else:
                d, new = jax.lax.switch(index, [run(ph) for ph in spec.phases], st)
            out = _from_matrix(d if spec.direction_includes_scale else scale * d, lay)
            out = out.astype(g.dtype) if leaf_dtype_out else out
            if elementwise_state:
                return (out, *(_from_matrix(new[n], lay).astype(sd) for n in names))
            return out, new

        res = _map_matrix_leaves(title, dimension_numbers, updates, leaf_update, *state[1:])
        new_state = state_cls(count, *res[1:])
        if guard is None:
            return res[0], new_state
        # an invalid traced hyperparameter: NaN update, the state stays as it was
        keep = jnp.isnan(guard)
        out = jax.tree.map(lambda u: u if _is_masked(u) else u * guard.astype(u.dtype), res[0], is_leaf=_is_masked)
        return out, jax.tree.map(lambda n, o: jnp.where(keep, o, n), new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _same_types(new: dict, like: dict) -> dict:
    """Cast every array of ``new`` to the dtype of the matching entry of ``like`` (switch branches must agree)."""
    return {k: (None if v is None else jnp.asarray(v).astype(like[k].dtype)) for k, v in new.items()}


class DecayAfterState(NamedTuple):
    """State of the lr/decay stage of a matrix rule that decays after its step: ``count`` (int32) for schedules."""

    count: jax.Array  # type: ignore[assignment]  # optax state convention: the field shadows tuple.count


def _lr_and_decay_after(spec: MatrixSpec, hp: Mapping[str, Any], learning_rate: ScalarOrSchedule, weight_decay: Any, mask: Any) -> optax.GradientTransformationExtraArgs:
    """``delta -> spec.apply(W, delta, lr, wd) - W`` (for DeVA_Sinf ``(W - lr delta)(1 - lr wd) - W``: the decay
    *after* the step, with the base lr). ``delta`` comes from :func:`_scale_by_matrix` (shape scale included).

    In a still phase of the spec (DeVA_Sinf's seed call) the parameter does not move, so no decay is applied then.
    """
    still = tuple(i for i, ph in enumerate(spec.phases) if ph in spec.still_phases)

    def init_fn(params: Any) -> DecayAfterState:
        return DecayAfterState(count=_zero_count(params))

    def update_fn(updates: Any, state: DecayAfterState, params: Any = None, **extra_args: Any) -> tuple:
        del extra_args
        if params is None:
            raise ValueError(f"{spec.name}: update() needs params (the decay is applied to the updated weights)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        m = mask(params) if callable(mask) else mask
        treedef: _TreeDef
        leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_masked)
        ps = treedef.flatten_up_to(params)
        ms = [True] * len(leaves) if m is None else treedef.flatten_up_to(m)
        out = []
        index = spec.phase(hp, state.count + 1, jnp) if len(spec.phases) > 1 else 0
        resting = jnp.zeros((), bool)  # a still phase does not move the parameter at all (no decay either)
        for i in still:
            resting = resting | (index == i)
        for dlt, p, use in zip(leaves, ps, ms):
            if _is_masked(dlt):
                out.append(dlt)
                continue
            wd = jnp.where(resting, 0.0, weight_decay) if use else 0.0
            p = p.astype(dlt.dtype)  # the state dtype (float32 for bf16 leaves); the alias casts back once
            new_p = spec.apply(jnp, p, dlt, _cast_scalar(lr, p.dtype), _cast_scalar(wd, p.dtype), 1.0)
            out.append(new_p - p)
        return treedef.unflatten(out), DecayAfterState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _fallback_alias(spec: MatrixSpec, fallback: Optional[str], fallback_hyperparams: Optional[Mapping], mask: Any, state_dtype: Any, learning_rate: Any) -> Any:
    """The fallback rule's alias; its learning rate is ``learning_rate`` unless ``fallback_hyperparams`` gives one."""
    user = dict(fallback_hyperparams or {})
    if "learning_rate" in user:
        user["lr"] = user.pop("learning_rate")
    fspec, given = spec.resolve_fallback(fallback or None, user)
    hp = {**fspec.defaults, **given}
    hp.pop("lr")
    lr = given.get("lr", learning_rate)
    return _elementwise_alias(fspec, lr, hp, mask, state_dtype)


def _routed(matrix_tx: Any, fallback_tx: Any, dimension_numbers: Any, title: str = "matrix rule") -> optax.GradientTransformationExtraArgs:
    routed = optax.partition({"matrix": matrix_tx, "fallback": fallback_tx}, _matrix_labels(dimension_numbers))
    return _checked(title, routed)


def _matrix_alias(
    spec: MatrixSpec,
    learning_rate: ScalarOrSchedule,
    weight_decay: Any,
    rule_hp: Mapping[str, Any],
    *,
    dimension_numbers: Any,
    fallback: Optional[str],
    fallback_hyperparams: Optional[Mapping[str, Any]],
    mask: Any,
    state_dtype: Any,
) -> optax.GradientTransformationExtraArgs:
    """A matrix spec as an optax alias: the rule on matrix leaves, its fallback on the others (``optax.partition``).

    Matrix leaves: ``_scale_by_matrix``, then the learning rate and the decay as the spec says (``decay="before"``:
    ``optax.add_decayed_weights`` then ``optax.scale_by_learning_rate``, i.e. ``p (1 - lr wd) - lr d``;
    ``"after"``: the spec's ``apply`` on the stepped parameter). The chain runs in the state dtype and casts the
    update to the leaf dtype once.
    """
    lr_check = learning_rate if not callable(learning_rate) else spec.defaults["lr"]
    full = _check_static(spec, {**rule_hp, "lr": lr_check, "weight_decay": weight_decay})
    rule = _scale_by_matrix(spec, full, dimension_numbers, state_dtype, leaf_dtype_out=False)
    if spec.decay == "before":
        stages = [rule]
        decay = _decay(weight_decay, mask)
        if decay is not None:
            stages.append(decay)
        stages.append(optax.scale_by_learning_rate(learning_rate))
    else:
        stages = [rule, _lr_and_decay_after(spec, full, learning_rate, weight_decay, mask)]
    fb = _fallback_alias(spec, fallback, fallback_hyperparams, mask, state_dtype, learning_rate)
    guard = {"lr": learning_rate, "weight_decay": weight_decay}
    matrix_tx = _preserve_dtypes(optax.chain(*stages), lambda: _traced_guard(spec, guard))
    return _routed(matrix_tx, fb, dimension_numbers, spec.title)


def scale_by_muon(
    momentum: Union[float, jax.Array] = 0.95,
    nesterov: bool = True,
    ns_steps: Optional[int] = None,
    ns_coefficients: Any = "quintic",
    ns_dtype: Any = None,
    ns_prenorm: str = "frobenius",
    ns_eps: Union[float, jax.Array] = 1e-7,
    shape_scale: str = "original",
    *,
    dimension_numbers: Any = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Muon's direction ``scale * NS5(nesterov(EMA momentum))`` for matrix leaves (no lr, no decay).

    Convention (torch.optim.Muon / KellerJordan/Muon, see ``xpoptim.core.muon``): EMA momentum without
    bias correction, Nesterov input, Newton-Schulz in ``ns_dtype`` (the parameter dtype when None),
    shape scale in fan terms from the dimension numbers.

    Args:
        momentum, nesterov, ns_steps, ns_coefficients, ns_dtype, ns_prenorm, ns_eps, shape_scale: the
            spec's hyperparameters (``xpoptim.core.SPECS["muon"]``).
        dimension_numbers: one :class:`DimensionNumbers` for every leaf, a pytree of them (None for
            leaves this transformation never sees), or a callable ``params -> pytree``. None: every
            leaf must be 2-D, in flax's (in, out) layout.
        state_dtype: dtype of the momentum buffer (default: the leaf's, float32 for bf16/fp16).

    Returns:
        A ``GradientTransformationExtraArgs`` with state :class:`ScaleByMuonState`.

    References:
        K. Jordan et al., Muon (2024); torch.optim.Muon; docs/algorithms.md section 5.
    """
    hp = dict(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
              ns_prenorm=ns_prenorm, ns_eps=ns_eps, shape_scale=shape_scale)
    return _scale_by_matrix(MUON, _check_static(MUON, hp), dimension_numbers, state_dtype)


def scale_by_deva_sinf(
    beta1: Union[float, jax.Array] = 0.95,
    beta2: Union[float, jax.Array] = 0.95,
    shampoo_beta: Union[float, jax.Array] = -1.0,
    eps: Union[float, jax.Array] = 1e-8,
    precondition_frequency: Optional[int] = None,
    max_precond_dim: Optional[int] = None,
    correct_bias: bool = True,
    nesterov: bool = True,
    normalize_grads: bool = False,
    shape_scale: str = "match_rms_adamw",
    ns_steps: Optional[int] = None,
    ns_coefficients: Any = "quintic",
    ns_dtype: Any = None,
    *,
    dimension_numbers: Any = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """DeVA_Sinf's step ``delta`` for matrix leaves (no lr, no decay; see ``xpoptim.core.deva``).

    The first call only seeds the Kronecker factors and eigenbases and returns a zero update; later
    calls take step ``k = count - 1`` and refresh the eigenbases when ``k % precondition_frequency
    == 0``. Both decisions are made on the traced counter with ``jax.lax.switch`` (control flow only;
    the math is the core's), so the jitted update never recompiles.

    Args:
        beta1 ... ns_dtype: the spec's hyperparameters (``xpoptim.core.SPECS["deva_sinf"]``).
        dimension_numbers: as for :func:`scale_by_muon`.
        state_dtype: dtype of the preconditioner state (default: the leaf's, float32 for bf16/fp16).

    Returns:
        A ``GradientTransformationExtraArgs`` with state :class:`ScaleByDeVASinfState`; the alias
        :func:`deva_sinf` applies ``W <- (W - lr delta)(1 - lr wd)`` (decay after the step, as released).

    References:
        arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation ``DeVASchattenNorm``; docs/algorithms.md section 4.2.
    """
    hp = dict(beta1=beta1, beta2=beta2, shampoo_beta=shampoo_beta, eps=eps, precondition_frequency=precondition_frequency,
              max_precond_dim=max_precond_dim, correct_bias=correct_bias, nesterov=nesterov, normalize_grads=normalize_grads,
              shape_scale=shape_scale, ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype)
    return _scale_by_matrix(DEVA_SINF, _check_static(DEVA_SINF, hp), dimension_numbers, state_dtype)


def muon(
    learning_rate: ScalarOrSchedule = 1e-3,
    weight_decay: Union[float, jax.Array] = 0.1,
    momentum: Union[float, jax.Array] = 0.95,
    nesterov: bool = True,
    ns_steps: Optional[int] = None,
    ns_coefficients: Any = "quintic",
    ns_dtype: Any = None,
    ns_prenorm: str = "frobenius",
    ns_eps: Union[float, jax.Array] = 1e-7,
    shape_scale: str = "original",
    *,
    dimension_numbers: Any = None,
    fallback: Optional[str] = None,
    fallback_hyperparams: Optional[Mapping[str, Any]] = None,
    mask: Any = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Muon for matrix leaves, an elementwise fallback for the rest (torch.optim.Muon convention).

    Matrix leaves: ``p <- p (1 - lr wd) - lr * scale * NS5(nesterov(B))`` (see :func:`scale_by_muon`).
    Other leaves (default: every leaf that is not 2-D; with ``dimension_numbers`` every leaf mapped to
    None) go to ``fallback`` (default the spec's: AdamW with betas (0.9, 0.95), eps 1e-10, wd 0,
    KellerJordan/Muon's auxiliary Adam), with ``fallback_hyperparams`` overriding those. The fallback's
    learning rate is ``learning_rate`` (a float or the same schedule) unless ``fallback_hyperparams``
    gives one.

    Args:
        learning_rate: float or schedule for the matrix leaves.
        weight_decay: decoupled decay of the matrix leaves (unadjusted lr).
        momentum ... shape_scale: see :func:`scale_by_muon`.
        dimension_numbers: see :func:`scale_by_muon`; leaves mapped to None go to the fallback.
        fallback: registry name of the elementwise rule for non-matrix leaves.
        fallback_hyperparams: its hyperparameters (``lr`` or ``learning_rate`` included).
        mask: weight-decay mask (pytree or callable), applied to both groups.
        state_dtype: state dtype for both groups.

    Returns:
        A ``GradientTransformationExtraArgs`` (an ``optax.partition``).
    """
    hp = dict(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
              ns_prenorm=ns_prenorm, ns_eps=ns_eps, shape_scale=shape_scale)
    return _matrix_alias(MUON, learning_rate, weight_decay, hp, dimension_numbers=dimension_numbers, fallback=fallback,
                         fallback_hyperparams=fallback_hyperparams, mask=mask, state_dtype=state_dtype)


def deva_sinf(
    learning_rate: ScalarOrSchedule = 3e-3,
    beta1: Union[float, jax.Array] = 0.95,
    beta2: Union[float, jax.Array] = 0.95,
    shampoo_beta: Union[float, jax.Array] = -1.0,
    eps: Union[float, jax.Array] = 1e-8,
    weight_decay: Union[float, jax.Array] = 0.01,
    precondition_frequency: Optional[int] = None,
    max_precond_dim: Optional[int] = None,
    correct_bias: bool = True,
    nesterov: bool = True,
    normalize_grads: bool = False,
    shape_scale: str = "match_rms_adamw",
    ns_steps: Optional[int] = None,
    ns_coefficients: Any = "quintic",
    ns_dtype: Any = None,
    *,
    dimension_numbers: Any = None,
    fallback: Optional[str] = None,
    fallback_hyperparams: Optional[Mapping[str, Any]] = None,
    mask: Any = None,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """DeVA_Sinf for matrix leaves, an elementwise fallback (DeVA_linf by default) for the rest.

    Matrix leaves: the first update is zero (it seeds the preconditioner); later ones are
    ``W <- (W - lr delta)(1 - lr wd)`` with ``delta`` from :func:`scale_by_deva_sinf`.

    Args:
        learning_rate: float or schedule.
        beta1 ... ns_dtype: see :func:`scale_by_deva_sinf`; ``weight_decay`` decays after the step.
        dimension_numbers, fallback, fallback_hyperparams, mask, state_dtype: as for :func:`muon`
            (the fallback's hyperparameters default to DeVA_linf's own defaults).

    Returns:
        A ``GradientTransformationExtraArgs``.

    References:
        arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation; docs/algorithms.md section 4.2.
    """
    hp = dict(beta1=beta1, beta2=beta2, shampoo_beta=shampoo_beta, eps=eps, precondition_frequency=precondition_frequency,
              max_precond_dim=max_precond_dim, correct_bias=correct_bias, nesterov=nesterov, normalize_grads=normalize_grads,
              shape_scale=shape_scale, ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype)
    return _matrix_alias(DEVA_SINF, learning_rate, weight_decay, hp, dimension_numbers=dimension_numbers, fallback=fallback,
                         fallback_hyperparams=fallback_hyperparams, mask=mask, state_dtype=state_dtype)


# ----------------------------------------------------------------------------------------------
# Generated public functions for the elementwise specs
# ----------------------------------------------------------------------------------------------

_P = inspect.Parameter


def _elementwise_scale_by(spec: ElementwiseSpec, hp: dict, state_dtype: Any) -> optax.GradientTransformationExtraArgs:
    """``scale_by_<name>`` from its arguments (``hp``: the rule's hyperparameters, ``None`` for a default switch)."""
    return _scale_by_elementwise(spec, _split_hp(spec, _check_static(spec, hp)), state_dtype)


def _make_scale_by(spec: ElementwiseSpec) -> Callable:
    hypers = [h for h in spec.hyperparams if h.name not in ("lr", "weight_decay")]
    params = [_P(h.name, _P.POSITIONAL_OR_KEYWORD, default=_sig_default(h)) for h in hypers]
    params.append(_P("state_dtype", _P.KEYWORD_ONLY, default=None))
    sig = inspect.Signature(params, return_annotation=optax.GradientTransformationExtraArgs)

    def scale_by(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        kw = dict(b.arguments)
        state_dtype = kw.pop("state_dtype")
        return _elementwise_scale_by(spec, kw, state_dtype)

    scale_by.__signature__ = sig  # type: ignore[attr-defined]
    scale_by.__name__ = scale_by.__qualname__ = f"scale_by_{spec.name}"
    scale_by.__module__ = __name__
    scale_by.__doc__ = _scale_by_doc(spec)
    return scale_by


def _make_alias(spec: ElementwiseSpec) -> Callable:
    hypers = [h for h in spec.hyperparams if h.name != "lr"]
    params = [_P("learning_rate", _P.POSITIONAL_OR_KEYWORD, default=spec.defaults["lr"])]
    params += [_P(h.name, _P.POSITIONAL_OR_KEYWORD, default=_sig_default(h)) for h in hypers]
    params += [_P("mask", _P.KEYWORD_ONLY, default=None), _P("state_dtype", _P.KEYWORD_ONLY, default=None)]
    sig = inspect.Signature(params, return_annotation=optax.GradientTransformationExtraArgs)

    def alias(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        kw = dict(b.arguments)
        lr, mask, state_dtype = kw.pop("learning_rate"), kw.pop("mask"), kw.pop("state_dtype")
        return _elementwise_alias(spec, lr, kw, mask, state_dtype)

    alias.__signature__ = sig  # type: ignore[attr-defined]
    alias.__name__ = alias.__qualname__ = spec.name
    alias.__module__ = __name__
    alias.__doc__ = _alias_doc(spec)
    return alias


def _make_matrix_scale_by(spec: MatrixSpec) -> Callable:
    """``scale_by_<name>`` of a matrix rule added with ``xpoptim.core.register`` (see :func:`_scale_by_matrix`)."""
    hypers = [h for h in spec.hyperparams if h.name not in ("lr", "weight_decay")]
    params = [_P(h.name, _P.POSITIONAL_OR_KEYWORD, default=_sig_default(h)) for h in hypers]
    params += [_P("dimension_numbers", _P.KEYWORD_ONLY, default=None), _P("state_dtype", _P.KEYWORD_ONLY, default=None)]
    sig = inspect.Signature(params, return_annotation=optax.GradientTransformationExtraArgs)

    def scale_by(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        kw = dict(b.arguments)
        dims, state_dtype = kw.pop("dimension_numbers"), kw.pop("state_dtype")
        return _scale_by_matrix(spec, _check_static(spec, kw), dims, state_dtype)

    scale_by.__signature__ = sig  # type: ignore[attr-defined]
    scale_by.__name__ = scale_by.__qualname__ = f"scale_by_{spec.name}"
    scale_by.__module__ = __name__
    scale_by.__doc__ = f"The {spec.title} rule's direction on matrix leaves (no learning rate, no decay).\n\n    Args:\n{_doc_args(spec, ('lr', 'weight_decay'))}\n"
    return scale_by


def _make_matrix_alias(spec: MatrixSpec) -> Callable:
    """The alias of a matrix rule added with ``xpoptim.core.register`` (see :func:`_matrix_alias`)."""
    hypers = [h for h in spec.hyperparams if h.name != "lr"]
    params = [_P("learning_rate", _P.POSITIONAL_OR_KEYWORD, default=spec.defaults["lr"])]
    params += [_P(h.name, _P.POSITIONAL_OR_KEYWORD, default=_sig_default(h)) for h in hypers]
    params += [_P(n, _P.KEYWORD_ONLY, default=None) for n in ("dimension_numbers", "fallback", "fallback_hyperparams", "mask", "state_dtype")]
    sig = inspect.Signature(params, return_annotation=optax.GradientTransformationExtraArgs)

    def alias(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        kw = dict(b.arguments)
        lr, wd = kw.pop("learning_rate"), kw.pop("weight_decay")
        opts = {n: kw.pop(n) for n in ("dimension_numbers", "fallback", "fallback_hyperparams", "mask", "state_dtype")}
        return _matrix_alias(spec, lr, wd, kw, **opts)

    alias.__signature__ = sig  # type: ignore[attr-defined]
    alias.__name__ = alias.__qualname__ = spec.name
    alias.__module__ = __name__
    alias.__doc__ = f"The {spec.title} optimizer as an optax alias: the rule on matrix leaves, its fallback on the others.\n\n    Args:\n        learning_rate: a float or an optax schedule.\n{_doc_args(spec, ('lr',))}\n"
    return alias


def _state_class(spec: ElementwiseSpec | MatrixSpec) -> type[Any]:
    """The state class of ``scale_by_<name>`` (made once per rule)."""
    if isinstance(spec, MatrixSpec):
        return _matrix_state_class(spec)
    cls = _STATE_CLASSES.get(spec.name)
    if cls is None or cls._fields[1:] != tuple(spec.state):
        doc = (
            f"State of :func:`scale_by_{spec.name}`: ``count`` (int32 steps taken, saturating) and the "
            f"{spec.title} buffers {', '.join(spec.state)} (pytrees like the params, state dtype)."
        )
        cls = _STATE_CLASSES[spec.name] = _make_state_class(spec.title, tuple(spec.state), doc)
    return cls


# --- generated by `python -m xpoptim._codegen` from xpoptim.core.SPECS: do not edit by hand ---
from ._optax_rules import (  # noqa: E402
    ScaleByAdamState as ScaleByAdamState,
    scale_by_adam as scale_by_adam,
    adam as adam,
    ScaleByAdamWState as ScaleByAdamWState,
    scale_by_adamw as scale_by_adamw,
    adamw as adamw,
    ScaleByAdaBeliefState as ScaleByAdaBeliefState,
    scale_by_adabelief as scale_by_adabelief,
    adabelief as adabelief,
    ScaleByLaPropState as ScaleByLaPropState,
    scale_by_laprop as scale_by_laprop,
    laprop as laprop,
    ScaleByMVNGradState as ScaleByMVNGradState,
    scale_by_mvngrad as scale_by_mvngrad,
    mvngrad as mvngrad,
    ScaleBySGDState as ScaleBySGDState,
    scale_by_sgd as scale_by_sgd,
    sgd as sgd,
    ScaleByMSSDState as ScaleByMSSDState,
    scale_by_mssd as scale_by_mssd,
    mssd as mssd,
    ScaleBySVAGState as ScaleBySVAGState,
    scale_by_svag as scale_by_svag,
    svag as svag,
    ScaleByMSVAGState as ScaleByMSVAGState,
    scale_by_msvag as scale_by_msvag,
    msvag as msvag,
    ScaleByAdamStarState as ScaleByAdamStarState,
    scale_by_adam_star as scale_by_adam_star,
    adam_star as adam_star,
    ScaleByMSVAGMBState as ScaleByMSVAGMBState,
    scale_by_msvag_mb as scale_by_msvag_mb,
    msvag_mb as msvag_mb,
    ScaleByAdamStarMBState as ScaleByAdamStarMBState,
    scale_by_adam_star_mb as scale_by_adam_star_mb,
    adam_star_mb as adam_star_mb,
    ScaleByDeVALinfState as ScaleByDeVALinfState,
    scale_by_deva_linf as scale_by_deva_linf,
    deva_linf as deva_linf,
)

__all__ += ["ScaleByAdamState", "scale_by_adam", "adam", "ScaleByAdamWState", "scale_by_adamw", "adamw", "ScaleByAdaBeliefState", "scale_by_adabelief", "adabelief", "ScaleByLaPropState", "scale_by_laprop", "laprop", "ScaleByMVNGradState", "scale_by_mvngrad", "mvngrad", "ScaleBySGDState", "scale_by_sgd", "sgd", "ScaleByMSSDState", "scale_by_mssd", "mssd", "ScaleBySVAGState", "scale_by_svag", "svag", "ScaleByMSVAGState", "scale_by_msvag", "msvag", "ScaleByAdamStarState", "scale_by_adam_star", "adam_star", "ScaleByMSVAGMBState", "scale_by_msvag_mb", "msvag_mb", "ScaleByAdamStarMBState", "scale_by_adam_star_mb", "adam_star_mb", "ScaleByDeVALinfState", "scale_by_deva_linf", "deva_linf"]
# --- end of generated code ---

_STATE_CLASSES: dict[str, type[Any]] = {}  # name -> ScaleBy<Title>State (built-in rules: the generated classes)
_ALIASES: dict[str, Callable] = {"muon": muon, "deva_sinf": deva_sinf}
_SCALE_BY: dict[str, Callable] = {"muon": scale_by_muon, "deva_sinf": scale_by_deva_sinf}
_MADE: dict[tuple, tuple] = {}  # (kind, name) -> (spec, function), for rules added with xpoptim.core.register
for _spec in (SPECS[n] for n in BUILTIN):
    if isinstance(_spec, ElementwiseSpec):
        _STATE_CLASSES[_spec.name] = globals()[f"ScaleBy{_spec.title}State"]
        # The state classes are this module's (pickled states and tools that recognise the adapter's states by
        # module name see them here, where the runtime-made classes of registered rules live too).
        _STATE_CLASSES[_spec.name].__module__ = __name__
        _ALIASES[_spec.name] = globals()[_spec.name]
        _SCALE_BY[_spec.name] = globals()[f"scale_by_{_spec.name}"]
__all__ += ["muon", "scale_by_muon", "deva_sinf", "scale_by_deva_sinf"]
del _spec


def _function_for(kind: str, spec: ElementwiseSpec | MatrixSpec) -> Callable:
    """The alias (``kind="alias"``) or ``scale_by_<name>`` (``"scale_by"``) of ``spec``: this module's own for the
    built-in rules, else made once for a rule added with ``xpoptim.core.register``."""
    if spec.name in BUILTIN:
        return (_ALIASES if kind == "alias" else _SCALE_BY)[spec.name]
    made = _MADE.get((kind, spec.name))
    if made is None or made[0] is not spec:
        if isinstance(spec, MatrixSpec):
            fn = _make_matrix_alias(spec) if kind == "alias" else _make_matrix_scale_by(spec)
        else:
            fn = _make_alias(spec) if kind == "alias" else _make_scale_by(spec)
        made = _MADE[(kind, spec.name)] = (spec, fn)
    return made[1]


if not TYPE_CHECKING:  # at run time only: type checkers report an unknown name as unknown

    def __getattr__(name: str) -> Any:
        """``<name>``, ``scale_by_<name>`` and ``ScaleBy<Title>State`` of a rule added with ``xpoptim.core.register``."""
        for spec in SPECS.values():
            if name == spec.name:
                return _function_for("alias", spec)
            if name == f"scale_by_{spec.name}":
                return _function_for("scale_by", spec)
            if name == f"ScaleBy{spec.title}State":
                return _state_class(spec)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create(name: str, **hp: Any) -> optax.GradientTransformationExtraArgs:
    """Build an optimizer alias by registry name (``"adamw"``) or title (``"AdamW"``).

    Args:
        name: the optimizer.
        **hp: its hyperparameters by spec name; ``lr`` or ``learning_rate`` (float or schedule), plus
            the alias's keyword options (``mask``, ``state_dtype``, and for matrix rules
            ``dimension_numbers``, ``fallback``, ``fallback_hyperparams``).

    Returns:
        The ``GradientTransformationExtraArgs``.
    """
    spec = get_spec(name)
    if "lr" in hp:
        if "learning_rate" in hp:
            raise TypeError(f"{spec.title}: give lr or learning_rate, not both")
        hp["learning_rate"] = hp.pop("lr")
    if "betas" in hp:
        b1, b2 = hp.pop("betas")
        hp["beta1"], hp["beta2"] = b1, b2
    fn = _function_for("alias", spec)
    sig = inspect.signature(fn)
    unknown = sorted(set(hp) - set(sig.parameters))
    if unknown:
        raise TypeError(f"{spec.title}: unknown hyperparameter(s) {unknown}; expected a subset of {sorted(sig.parameters)}")
    return fn(**hp)


# ----------------------------------------------------------------------------------------------
# Mini-batch gradient variance (M-SVAG-mb, ADAM*-mb)
# ----------------------------------------------------------------------------------------------


def grad_variance(per_example_grads: Any, axis: int = 0) -> Any:
    """Per-element variance of the mini-batch mean gradient from stacked per-example gradients.

    ``s_hat = 1/|B| 1/(|B|-1) sum_k (grad_k - g)^2`` (Balles & Hennig Eq. 44, unbiased form) on every
    leaf, through ``xpoptim.core.moments.minibatch_variance``.

    Args:
        per_example_grads: a pytree whose leaves carry the batch on ``axis`` (e.g. from ``jax.vmap``).
        axis: the batch axis.

    Returns:
        A pytree like one example's gradients: pass it as ``update(..., grad_variance=...)``.
    """
    return jax.tree.map(lambda x: _moments.minibatch_variance(jnp, x, axis=axis), per_example_grads)


def per_example_grad_variance(loss_fn: Callable, params: Any, batch: Any, *args: Any) -> tuple:
    """Mean gradient and its mini-batch variance, by ``jax.vmap`` over per-example gradients.

    ``loss_fn(params, example, *args)`` is the loss of *one* example; ``batch`` is a pytree whose leaves
    have the batch on axis 0 (``|B| >= 2``).

    Returns:
        ``(mean_loss, mean_grad, grad_variance)``: feed ``mean_grad`` as the updates and
        ``grad_variance=`` as the extra argument of the M-SVAG-mb / ADAM*-mb ``update``.
    """
    per_loss, per_grad = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0) + (None,) * len(args))(params, batch, *args)
    mean_grad = jax.tree.map(lambda x: jnp.mean(x, axis=0), per_grad)
    return jnp.mean(per_loss), mean_grad, grad_variance(per_grad)


# ----------------------------------------------------------------------------------------------
# Flat paths
# ----------------------------------------------------------------------------------------------


def _dtype_key(dtype: Any) -> str:
    return jnp.dtype(dtype).name


def ravel_by_dtype(params: Any) -> tuple:
    """Keep parameters flat: one 1-D array per dtype, plus the function that rebuilds the pytree.

    Use it when a model has thousands of small leaves: differentiate the loss with respect to the flat
    dict (``loss(unravel(flat))``), so gradients come out flat and the optimizer (any alias of this
    module, or any optax elementwise transformation) runs one fused kernel per dtype instead of one per
    leaf, and the jitted step has a handful of inputs and outputs instead of thousands. Slicing inside
    ``unravel`` is fused by XLA into the loss's consumers.

    Costs: one copy of the parameters at ravel time; the loss graph contains one slice + reshape per
    leaf (compile time grows with the leaf count, as for the unflattened model); sharding of individual
    leaves is lost (the flat array has its own sharding); matrix rules (Muon, DeVA_Sinf) cannot run on
    flat buffers, so keep matrices out of the flat dict.

    Example::

        flat, unravel = ravel_by_dtype(params)
        tx = adamw(1e-3)
        state = tx.init(flat)

        @jax.jit
        def train_step(flat, state, batch):
            grads = jax.grad(lambda f: loss_fn(unravel(f), batch))(flat)
            updates, state = tx.update(grads, state, flat)
            return optax.apply_updates(flat, updates), state

    Args:
        params: a pytree of arrays.

    Returns:
        ``(flat, unravel)``: ``flat`` maps a dtype name (``"float32"``) to a 1-D array; ``unravel(flat)``
        returns the pytree.
    """
    treedef: _TreeDef
    leaves, treedef = jax.tree.flatten(params)
    groups: dict[str, list] = {}
    for i, x in enumerate(leaves):
        key = _dtype_key(x.dtype)
        groups.setdefault(key, []).append(i)
    offsets: dict[str, int] = {k: 0 for k in groups}
    at: dict[int, tuple[str, int, int, tuple[int, ...]]] = {}  # leaf -> (dtype key, offset, size, shape)
    for key, idx in groups.items():
        for i in idx:
            n = int(np.prod(leaves[i].shape))
            at[i] = (key, offsets[key], n, tuple(leaves[i].shape))
            offsets[key] += n
    where = [at[i] for i in range(len(leaves))]
    flat = {key: jnp.concatenate([jnp.ravel(leaves[i]) for i in idx]) for key, idx in groups.items()}

    def unravel(flat: Mapping[str, Any]) -> Any:
        out = [flat[key][off : off + n].reshape(shape) for key, off, n, shape in where]
        return treedef.unflatten(out)

    return flat, unravel


class FlattenByDtypeState(NamedTuple):
    """State of :func:`flatten_by_dtype`: the inner state over ``{dtype name: 1-D array}``."""

    inner_state: Any


def flatten_by_dtype(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Run an elementwise transformation on one flat buffer per dtype while params stay a pytree.

    Unlike ``optax.flatten`` (one buffer, dtypes promoted together), leaves are grouped by dtype, so
    bf16/float32/float64 leaves keep their dtypes and state dtype policy. Every update concatenates
    the gradients (and params, and pytree extra args such as ``grad_variance``) per dtype and splits
    the result: one extra read and write of the gradients, in exchange for one fused kernel per dtype.
    The state is flat (its memory equals the unflattened state's). Only valid for elementwise rules.

    Args:
        inner: the transformation to wrap.

    Returns:
        A ``GradientTransformationExtraArgs``.
    """
    inner = optax.with_extra_args_support(inner)

    def flat_of(tree: Any) -> Any:
        return ravel_by_dtype(tree)[0]

    def init_fn(params: Any) -> FlattenByDtypeState:
        return FlattenByDtypeState(inner.init(flat_of(params)))

    def update_fn(updates: Any, state: FlattenByDtypeState, params: Any = None, **extra_args: Any) -> tuple:
        fu, unravel = ravel_by_dtype(updates)
        fp = None if params is None else flat_of(params)
        ex = {}
        for k, v in extra_args.items():
            try:
                same = _structure(v) == _structure(updates)
            except Exception:
                same = False
            if same:  # a per-leaf extra (grad_variance): flattened like the gradients, so dtypes must match
                v = jax.tree.map(lambda x, g: jnp.asarray(x).astype(g.dtype), v, updates)
            ex[k] = flat_of(v) if same else v
        new_u, new_s = inner.update(fu, state.inner_state, fp, **ex)
        return unravel(new_u), FlattenByDtypeState(new_s)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Portable state (xpoptim.portable)
# ----------------------------------------------------------------------------------------------


def export_state(state: Any, params: Any, optimizer: str, **kwargs: Any) -> PortableState:
    """The framework-neutral state of ``state``: :func:`xpoptim.portable.optax_state.export_optax`."""
    from xpoptim.portable.optax_state import export_optax  # noqa: PLC0415

    return export_optax(state, params, optimizer, **kwargs)


def import_state(portable: PortableState, params: Any, tx: Any, **kwargs: Any) -> Any:
    """A state for ``tx`` holding ``portable``: :func:`xpoptim.portable.optax_state.import_optax`."""
    from xpoptim.portable.optax_state import import_optax  # noqa: PLC0415

    return import_optax(portable, params, tx, **kwargs)

