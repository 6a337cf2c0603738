"""Portable state of the optax adapter (``xpoptim.adapters.optax.export_state`` / ``import_state``).

The optax state is a tree of NamedTuples; the rule states in it are the adapter's public classes
``ScaleBy<Title>State`` (one per spec: ``count`` and the spec's buffers, each a pytree like the parameters, with
``optax.MaskedNode`` where ``optax.partition``/``masked`` routes a leaf elsewhere). They are found wherever they
sit (``chain``, ``partition``, ``masked``, ``inject_hyperparams``, ...). On import the tree from ``tx.init(params)``
is rebuilt with the portable arrays and every ``count`` beside a rule state (learning-rate schedules, DeVA_Sinf's
decay stage) set to the rule's step.

Orientation: a leaf with dimension numbers is permuted to ``(batch, out, in)``; by default every 2-D leaf is a
flax ``(in, out)`` kernel (the optax adapter's own default) and other leaves are kept as they are. Pass the
optimizer's ``dimension_numbers`` (the value given to ``xo.muon``; its None entries keep the default); a 2-D leaf
that is not an ``(in, out)`` kernel (an embedding table ``(vocab, features)``, already torch's layout) takes
``DimensionNumbers(reduction_axis=1, output_axis=0)``, which keeps it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, TypeGuard, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xpoptim.adapters import optax as xo
from xpoptim.core import SPECS, get_spec
from xpoptim.core.spec import MatrixSpec

from .layout import Orientation, leaf_from_matrix, matrix_from_leaf, swap_sides
from .state import ParamState, PortableState, matrix_roles

__all__ = ["export_optax", "import_optax", "leaf_names", "leaf_orientations"]


def _path_part(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_names(params: Any) -> list[str]:
    """Dotted leaf paths (``{"0": {"kernel": w}}`` -> ``"0.kernel"``), in ``jax.tree`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [".".join(_path_part(k) for k in path) for path, _ in flat]


def leaf_orientations(params: Any, dimension_numbers: Any = None) -> list[Orientation]:
    """The portable orientation of every leaf (see the module docstring).

    A leaf's layout is its entry in ``dimension_numbers`` when that is not None, else the default: a 2-D leaf is a
    flax ``(in, out)`` kernel, other leaves are kept as they are. So the optimizer's own ``dimension_numbers``
    (None for leaves it routes to the fallback, such as an output head) give the right layout; a 2-D leaf that is
    not an ``(in, out)`` kernel (an embedding table) takes ``DimensionNumbers(reduction_axis=1, output_axis=0)``.
    """
    leaves, _treedef, defaults = xo._resolve_dims(None, params)
    given = xo._resolve_dims(dimension_numbers, params)[2] if dimension_numbers is not None else defaults
    out = []
    for x, g, dflt in zip(leaves, given, defaults):
        d = g if g is not None else dflt
        nd = len(x.shape)
        if d is None:
            out.append(Orientation(tuple(range(nd))))
            continue
        lay = xo._layout(tuple(x.shape), d)
        nb, nr = len(lay.batch_shape), len(lay.red_shape)
        perm = lay.perm[:nb] + lay.perm[nb + nr :] + lay.perm[nb : nb + nr]
        out.append(Orientation(tuple(perm), nb, len(lay.out_shape)))
    return out


def _rule_of(node: Any) -> str | None:
    """The registry name of an adapter rule state (the adapter's ``ScaleBy<Title>State`` classes), else None."""
    cls = type(node)
    if not _is_namedtuple(node) or getattr(xo, cls.__name__, None) is not cls:  # a state class the adapter exports
        return None
    for s in SPECS.values():
        if cls.__name__ == f"ScaleBy{s.title}State":
            return s.name
    return None


class _NamedTupleNode(Protocol):
    """A NamedTuple node of a state pytree (optax's states, ``inject_hyperparams``' state)."""

    _fields: tuple[str, ...]
    count: Any  # the ``count`` field where ``_fields`` has one (else tuple's method)

    def __iter__(self) -> Iterator[Any]: ...

    def _replace(self, **fields: Any) -> Any: ...


def _is_namedtuple(x: object) -> TypeGuard[_NamedTupleNode]:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _mapping_like(node: Mapping, items: dict) -> Any:
    """A mapping of ``node``'s own class (``dict``, ``FrozenDict``, ...) holding ``items`` (the pytree mapping
    classes are built from a dict; ``Mapping`` itself promises no constructor)."""
    return cast("Callable[[dict], Any]", type(node))(items)


def _rule_states(node: Any, found: list) -> None:
    rule = _rule_of(node)
    if rule is not None:
        found.append((rule, node))
        return
    if isinstance(node, (tuple, list)):
        for x in node:
            _rule_states(x, found)
    elif isinstance(node, Mapping):
        for x in node.values():
            _rule_states(x, found)


def _per_leaf(node: Any, treedef: Any) -> list[dict | None]:
    """``[{state name: array}]`` per parameter leaf of one rule state (None where masked)."""
    per: list[dict | None] = [None] * treedef.num_leaves
    for field in node._fields:
        if field == "count":
            continue
        for i, v in enumerate(treedef.flatten_up_to(getattr(node, field))):
            if isinstance(v, optax.MaskedNode):
                continue
            entry = per[i] or {}
            if isinstance(v, Mapping):
                entry.update(v)
            else:
                entry[field] = v
            per[i] = entry
    return per


def _np(x: Any) -> np.ndarray | None:
    return None if x is None else np.array(x)


def export_optax(
    state: Any,
    params: Any,
    optimizer: str,
    *,
    hyperparams: Mapping[str, Any] | None = None,
    fallback_hyperparams: Mapping[str, Any] | None = None,
    dimension_numbers: Any = None,
) -> PortableState:
    """The portable state of an optax-adapter state.

    Args:
        state: the optimizer state (from ``tx.init`` / ``tx.update``).
        params: the parameters (structure, shapes and names of the leaves).
        optimizer: registry name or title of the optimizer that built ``state``.
        hyperparams: its hyperparameters, recorded in the portable state (optax transformations do not carry them).
        fallback_hyperparams: the same for the fallback rule of Muon / DeVA_Sinf.
        dimension_numbers: the leaves' layout (see the module docstring).

    Returns:
        The :class:`PortableState`, keyed by :func:`leaf_names`.

    Raises:
        ValueError: no xpoptim rule state in ``state``, or a leaf served by two rules.
    """
    spec = get_spec(optimizer)
    leaves, treedef = jax.tree.flatten(params)
    names = leaf_names(params)
    orients = leaf_orientations(params, dimension_numbers)
    found: list = []
    _rule_states(state, found)
    if not found:
        raise ValueError(f"export_state: state holds no xpoptim rule state (ScaleBy<Title>State): is it an xpoptim.adapters.optax {spec.title} state?")
    out: dict[str, ParamState | None] = {n: None for n in names}
    fb_rule = None
    for rule, node in found:
        if isinstance(spec, MatrixSpec) and rule != spec.name:
            fb_rule = rule
        step = int(np.asarray(node.count))
        for i, entry in enumerate(_per_leaf(node, treedef)):
            if entry is None:
                continue
            prev = out[names[i]]
            if prev is not None:
                raise ValueError(f"export_state: leaf {names[i]!r} is served by two rule states ({prev.rule!r}, {rule!r})")
            out[names[i]] = ParamState(rule, step, orients[i].portable_shape(leaves[i].shape), _to_portable(rule, entry, leaves[i], orients[i]))
    params_out = {n: ps for n, ps in out.items() if ps is not None}
    return PortableState(
        spec.name,
        dict(hyperparams or {}),
        params_out,
        fallback=(fb_rule or spec.fallback) if isinstance(spec, MatrixSpec) else None,
        fallback_hyperparams=dict(fallback_hyperparams or {}),
    )


def _to_portable(rule: str, entry: dict, leaf: Any, orient: Orientation) -> dict:
    if not isinstance(SPECS[rule], MatrixSpec):
        return {k: orient.to_portable(np.array(v)) for k, v in entry.items()}
    roles = matrix_roles(rule)
    leaf_shaped = {k: v for k, v in entry.items() if roles[k] == "matrix" and v is not None and tuple(v.shape) == tuple(leaf.shape)}
    rest = {k: _np(v) for k, v in entry.items() if k not in leaf_shaped}
    out = {k: matrix_from_leaf(np.array(v), orient) for k, v in leaf_shaped.items()}
    # The rest is the adapter's (fan_in, fan_out) matrix form: transpose it, swap the factor sides.
    out.update(swap_sides(rule, {k: rest.get(k) for k in roles if k not in leaf_shaped}) if rest else {})
    return out


def _from_portable(rule: str, arrays: dict, like: dict, leaf: Any, orient: Orientation) -> dict:
    if not isinstance(SPECS[rule], MatrixSpec):
        return {k: orient.from_portable(arrays[k]) for k in like}
    roles = matrix_roles(rule)
    leaf_shaped = [k for k, v in like.items() if roles[k] == "matrix" and v is not None and tuple(v.shape) == tuple(leaf.shape)]
    out = {k: leaf_from_matrix(arrays[k], orient, tuple(leaf.shape)) for k in leaf_shaped}
    rest = [k for k in roles if k not in leaf_shaped]
    if rest:
        out.update(swap_sides(rule, {k: arrays[k] for k in roles if k in rest or k not in leaf_shaped}))
    return out


def import_optax(portable: PortableState, params: Any, tx: Any, *, dimension_numbers: Any = None) -> Any:
    """An optax-adapter state for ``tx`` and ``params`` holding the portable state.

    Every leaf that ``tx``'s xpoptim rules serve must be in ``portable`` under its :func:`leaf_names` name (rename
    the portable state to match), served by the same rule, with the same shape (after orientation). The arrays
    are cast to the dtypes of ``tx.init(params)`` (the state-dtype policy).

    Args:
        portable: the portable state.
        params: the parameters.
        tx: the optax-adapter transformation (built with the same optimizer).
        dimension_numbers: the leaves' layout, as for :func:`export_optax`.

    Returns:
        The state, to pass to ``tx.update``.

    Raises:
        ValueError: another optimizer, missing or unexpected names, another rule, shapes that do not match, or
            leaves of one rule state at different steps.
    """
    if not isinstance(portable, PortableState):
        raise TypeError(f"import_state expects a PortableState (xpoptim.portable.load(path)), got {type(portable).__name__}")
    leaves, treedef = jax.tree.flatten(params)
    names = leaf_names(params)
    orients = leaf_orientations(params, dimension_numbers)
    fresh = tx.init(params)
    found: list = []
    _rule_states(fresh, found)
    if not found:
        raise ValueError("import_state: tx.init(params) holds no xpoptim rule state: expected an xpoptim.adapters.optax transformation")
    spec = get_spec(portable.optimizer)
    for rule, _ in found:
        if rule != spec.name and not (isinstance(spec, MatrixSpec) and rule == (portable.fallback or spec.fallback)):
            raise ValueError(f"import_state: the portable state is a {portable.optimizer!r} state; tx runs rule {rule!r}")
    served = set()
    new_nodes = {}
    for rule, node in found:
        per = _per_leaf(node, treedef)
        steps = set()
        repl: list[dict[str, Any] | None] = [None] * len(leaves)
        for i, like in enumerate(per):
            if like is None:
                continue
            name = names[i]
            served.add(name)
            ps = portable.params.get(name)
            if ps is None:
                raise ValueError(
                    f"import_state: leaf {name!r} is not in the portable state (it has {portable.names}); rename it "
                    "to the leaf paths (portable.rename({...}))"
                )
            if ps.rule != rule:
                raise ValueError(f"import_state: leaf {name!r} is served by rule {rule!r} here, by {ps.rule!r} in the portable state")
            want = orients[i].portable_shape(leaves[i].shape)
            if ps.shape != want:
                raise ValueError(f"import_state: leaf {name!r} has shape {want} in the portable orientation, {ps.shape} in the portable state")
            arrays = _from_portable(rule, ps.state, like, leaves[i], orients[i])
            for k, ref in like.items():
                got = arrays.get(k)
                if (ref is None) != (got is None) or (ref is not None and got is not None and tuple(got.shape) != tuple(ref.shape)):
                    raise ValueError(
                        f"import_state: leaf {name!r} state {k!r} has shape {None if got is None else tuple(got.shape)}: "
                        f"expected {None if ref is None else tuple(ref.shape)}"
                    )
            repl[i] = {k: (None if ref is None else jnp.asarray(arrays[k], dtype=ref.dtype)) for k, ref in like.items()}
            steps.add(ps.step)
        if len(steps) > 1:
            raise ValueError(f"import_state: the leaves of one {SPECS[rule].title} state have different steps {sorted(steps)}: optax keeps one count per transformation")
        new_nodes[id(node)] = _replace_rule_state(node, treedef, repl, steps.pop() if steps else 0)
    unexpected = [n for n in portable.params if n not in served]
    if unexpected:
        raise ValueError(f"import_state: the portable state has parameter(s) {unexpected} that this transformation does not serve")
    return _rebuild(fresh, new_nodes)[0]


def _replace_rule_state(node: Any, treedef: Any, repl: list, step: int) -> Any:
    fields = {}
    for field in node._fields:
        if field == "count":
            fields[field] = jnp.asarray(step, dtype=node.count.dtype)
            continue
        cur = treedef.flatten_up_to(getattr(node, field))
        new = []
        for v, r in zip(cur, repl):
            if r is None or isinstance(v, optax.MaskedNode):
                new.append(v)
            elif isinstance(v, Mapping):
                new.append({k: r[k] for k in v})
            else:
                new.append(r[field])
        fields[field] = treedef.unflatten(new)
    return node._replace(**fields)


def _set_count(node: Any, step: int) -> Any:
    """Every ``count`` in a subtree without rule states (schedules, ``inject_hyperparams``' schedule states)."""
    if isinstance(node, Mapping):
        return _mapping_like(node, {k: _set_count(v, step) for k, v in node.items()})
    if _is_namedtuple(node):
        new = type(node)(*[_set_count(v, step) for v in node])
        if "count" in node._fields and _rule_of(node) is None:
            new = new._replace(count=jnp.asarray(step, dtype=getattr(node.count, "dtype", jnp.int32)))
        return new
    if isinstance(node, (tuple, list)):
        return type(node)(_set_count(v, step) for v in node)
    return node


def _rebuild(node: Any, new_nodes: dict) -> tuple[Any, int | None]:
    """Replace the rule states; set the ``count`` of their neighbours in a chain. Returns ``(node, step)``."""
    if id(node) in new_nodes:
        new = new_nodes[id(node)]
        return new, int(new.count)
    if isinstance(node, Mapping):
        items = {k: _rebuild(v, new_nodes) for k, v in node.items()}
        steps = {s for _, s in items.values() if s is not None}
        return _mapping_like(node, {k: v for k, (v, _) in items.items()}), (steps.pop() if len(steps) == 1 else None)
    if isinstance(node, (tuple, list)):
        kids = [_rebuild(x, new_nodes) for x in node]
        steps = {s for _, s in kids if s is not None}
        step = steps.pop() if len(steps) == 1 else None
        vals = [v for v, _ in kids]
        if step is not None:
            vals = [_set_count(v, step) if s is None else v for v, s in kids]
        if _is_namedtuple(node):
            out = type(node)(*vals)
            if step is not None and "count" in node._fields:  # e.g. inject_hyperparams' own count
                out = out._replace(count=jnp.asarray(step, dtype=getattr(node.count, "dtype", jnp.int32)))
            return out, step
        return type(node)(vals), step
    return node, None
