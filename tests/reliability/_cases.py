"""Shared case tables and snapshot helpers of the bad-input suite (every adapter uses them).

Case tables (plain data, no framework imports):

* :data:`OPTIMIZERS`, :data:`ELEMENTWISE`, :data:`MATRIX`, :data:`MINIBATCH`: registry names.
* :func:`bad_hyper_values`: for one hyperparameter of a spec, the values that must be refused, each with a label
  (complex numbers, arrays of several elements, objects, ``None``, strings, NaN, infinities, and values outside the
  kind's range: ``lr=-1``, ``beta1=1.5`` ...). ``one_element`` wraps a value as a 1-element array of any framework.
* :data:`GRADIENT_FILLS`: gradients every optimizer must survive without raising (zero, tiny, subnormal, huge),
  and :data:`NONFINITE_FILLS` (NaN, +-inf), which must either raise with nothing changed or give the documented
  non-finite result (see ``docs/reliability.md``).
* :data:`ODD_SHAPES`: zero-size and 0-d parameter shapes.
* :func:`state_garbles`: corrupted versions of a checkpoint (missing keys, wrong step, wrong dtype/shape, future
  version, foreign optimizer), as ``(label, mutated_copy)``; the input is never modified.

Snapshot helpers (framework-agnostic; torch, JAX, NumPy and CuPy arrays are read through DLPack/NumPy):

* :func:`snapshot` turns any nested structure (dicts, lists, tuples, arrays, numbers, strings, optimizer objects
  through their ``state_dict``) into a canonical tree of ``(kind, dtype, shape, bytes)`` records;
* :func:`assert_unchanged` compares two snapshots byte for byte and names the first difference.

Typical use::

    before = snapshot((params, opt.state_dict()))
    with pytest.raises(ValueError, match="lr"):
        opt.step(bad_grads)
    assert_unchanged(before, snapshot((params, opt.state_dict())))
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from xpoptim.core import ELEMENTWISE as _ELEMENTWISE
from xpoptim.core import MATRIX as _MATRIX
from xpoptim.core import SPECS

__all__ = [
    "OPTIMIZERS",
    "ELEMENTWISE",
    "MATRIX",
    "MINIBATCH",
    "GRADIENT_FILLS",
    "NONFINITE_FILLS",
    "ODD_SHAPES",
    "BAD_ANY_NUMBER",
    "bad_hyper_values",
    "numeric_hypers",
    "state_garbles",
    "snapshot",
    "assert_unchanged",
    "array_bytes",
]

# ------------------------------------------------------------------------------------------------------------------
# Which optimizers
# ------------------------------------------------------------------------------------------------------------------

OPTIMIZERS: tuple[str, ...] = tuple(SPECS)
ELEMENTWISE: tuple[str, ...] = tuple(_ELEMENTWISE)
MATRIX: tuple[str, ...] = tuple(_MATRIX)
#: Rules that take the per-example gradient variance as an extra input.
MINIBATCH: tuple[str, ...] = tuple(n for n in ELEMENTWISE if SPECS[n].extras)

# ------------------------------------------------------------------------------------------------------------------
# Gradients and shapes
# ------------------------------------------------------------------------------------------------------------------

#: Finite gradient values (label -> value) that every optimizer must take in float32 and float64 without raising
#: and without a NaN or an infinity in the parameters or the state.
GRADIENT_FILLS: dict[str, float] = {
    "zero": 0.0,
    "tiny": 1e-30,
    "subnormal_f32": 1e-42,
    "huge": 1e20,
    "near_max_f32": 3e38,
}

#: Non-finite gradient values: the step either raises (nothing changed) or the documented result follows.
NONFINITE_FILLS: dict[str, float] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

#: Parameter shapes with no elements or no axes. Matrix rules route 0-d and 1-d shapes to the fallback rule.
ODD_SHAPES: dict[str, tuple[int, ...]] = {
    "0-d": (),
    "empty_vector": (0,),
    "empty_rows": (0, 3),
    "empty_cols": (3, 0),
    "empty_stack": (2, 0, 3),
}

# ------------------------------------------------------------------------------------------------------------------
# Hyperparameter values that must be refused
# ------------------------------------------------------------------------------------------------------------------


class _Opaque:
    """An object that is not a number (``float()`` fails on it)."""

    def __repr__(self) -> str:
        return "<opaque object>"


#: Values refused for every numeric hyperparameter, whatever its range.
BAD_ANY_NUMBER: tuple[tuple[str, Any], ...] = (
    ("complex", 1e-3 + 0j),
    ("complex_imag", 1e-3 + 1e-3j),
    ("np_complex", np.complex128(1e-3)),
    ("array_2", np.array([1e-3, 2e-3])),
    ("array_2x1", np.array([[1e-3], [1e-3]])),
    ("object", _Opaque()),
    ("None", None),
    ("string", "0.001"),
    ("bool", True),
    ("list", [1e-3]),
    ("nan", math.nan),
    ("np_nan_0d", np.array(math.nan)),
    ("np_nan_1el", np.array([math.nan])),
    ("complex_1el", np.array([1e-3 + 0j])),
    ("inf", math.inf),
)


def numeric_hypers(name: str) -> tuple[Any, ...]:
    """The numeric (non-static) hyperparameters of optimizer ``name`` (``Hyper`` objects)."""
    return tuple(h for h in SPECS[name].hyperparams if not h.static)


def _out_of_range(h: Any) -> tuple[tuple[str, Any], ...]:
    kind = str(getattr(h.kind, "value", h.kind))
    if kind in ("lr", "nonneg"):
        return (("negative", -1.0), ("np_negative_1el", np.array([-1.0])))
    if kind == "positive":
        return (("zero", 0.0), ("negative", -1.0))
    if kind == "beta":
        return (("above_one", 1.5), ("one", 1.0), ("negative", -0.1), ("np_above_one_0d", np.array(1.5)))
    if kind == "beta_open":
        return (("above_one", 1.5), ("zero", 0.0), ("one", 1.0))
    return ()


def bad_hyper_values(h: Any) -> tuple[tuple[str, Any], ...]:
    """Every value that must be refused for the numeric hyperparameter ``h`` (a ``Hyper``), with labels.

    Args:
        h: a numeric hyperparameter of a spec (see :func:`numeric_hypers`).

    Returns:
        ``((label, value), ...)``: :data:`BAD_ANY_NUMBER` plus the kind's out-of-range values.
    """
    return BAD_ANY_NUMBER + _out_of_range(h)


# ------------------------------------------------------------------------------------------------------------------
# Garbled checkpoints
# ------------------------------------------------------------------------------------------------------------------


def _leaf_paths(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*path, k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaf_paths(v, (*path, i))
    else:
        yield path, tree


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float, complex))


def _set(tree: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _delete(tree: Any, path: tuple) -> None:
    for k in path[:-1]:
        tree = tree[k]
    del tree[path[-1]]


def _first(tree: Any, pred: Callable[[tuple, Any], bool]) -> tuple | None:
    for path, leaf in _leaf_paths(tree):
        if pred(path, leaf):
            return path
    return None


def state_garbles(
    state_dict: Mapping[str, Any],
    *,
    to_int: Callable[[Any], Any] | None = None,
    grow: Callable[[Any], Any] | None = None,
) -> list[tuple[str, Any]]:
    """Corrupted copies of a checkpoint, each of which a ``load_state_dict`` must refuse with nothing changed.

    Works on any nested dict of arrays (the torch adapter's ``{"state", "param_groups"}`` and the NumPy adapter's
    ``{"version", "optimizer", "step", "param_groups", "state"}``). Array leaves are found by duck typing; the
    framework-specific edits come from the callbacks.

    Args:
        state_dict: a valid checkpoint (not modified).
        to_int: ``to_int(array) -> array`` of an integer dtype (default: NumPy ``astype(int64)``).
        grow: ``grow(array) -> array`` with one more element along a new leading axis (default: NumPy).

    Returns:
        ``[(label, garbled_copy), ...]``; cases whose target is absent from this format are left out.
    """
    to_int = to_int or (lambda a: np.asarray(a).astype(np.int64))
    grow = grow or (lambda a: np.stack([np.asarray(a)] * 2))
    out: list[tuple[str, Any]] = []

    def add(label: str, edit: Callable[[Any], None]) -> None:
        sd = copy.deepcopy(dict(state_dict))
        edit(sd)
        out.append((label, sd))

    out.append(("not_a_dict", [("state", {})]))
    for key in list(state_dict):
        add(f"missing_{key}", lambda sd, key=key: sd.pop(key))
    add("unknown_top_key", lambda sd: sd.__setitem__("surprise", 1))
    if "version" in state_dict:
        add("future_version", lambda sd: sd.__setitem__("version", sd["version"] + 1))
        add("version_string", lambda sd: sd.__setitem__("version", "1"))
    if "optimizer" in state_dict:
        add("foreign_optimizer", lambda sd: sd.__setitem__("optimizer", "not_an_optimizer"))
    step_paths = [p for p, _ in _leaf_paths(state_dict) if p and p[-1] == "step"]
    for label, value in (("step_none", None), ("step_negative", -5), ("step_fraction", 2.5), ("step_string", "3")):
        if step_paths:
            add(label, lambda sd, v=value: [_set(sd, p, v) for p in step_paths[:1]])
    arr = _first(state_dict, lambda p, leaf: _is_array(leaf) and getattr(leaf, "ndim", 0) > 0 and p[-1] != "step")
    if arr is not None:
        add("state_int64", lambda sd: _set(sd, arr, to_int(_get(sd, arr))))
        add("state_wrong_shape", lambda sd: _set(sd, arr, grow(_get(sd, arr))))
        add("state_missing_buffer", lambda sd: _delete(sd, arr))
        add("state_buffer_none", lambda sd: _set(sd, arr, None))
        add("state_buffer_list", lambda sd: _set(sd, arr, [1.0, 2.0]))
    groups = state_dict.get("param_groups")
    if isinstance(groups, Sequence) and groups:
        add("no_param_groups", lambda sd: sd.__setitem__("param_groups", []))
        add("extra_param_group", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])))
        lr_key = "lr" if "lr" in groups[0] else None
        if lr_key is not None:
            add("group_lr_negative", lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0))
            add("group_lr_complex", lambda sd: sd["param_groups"][0].__setitem__("lr", 1e-3 + 0j))
            add("group_lr_none", lambda sd: sd["param_groups"][0].__setitem__("lr", None))
    return out


def _get(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


# ------------------------------------------------------------------------------------------------------------------
# Snapshots
# ------------------------------------------------------------------------------------------------------------------


def array_bytes(x: Any) -> tuple[str, str, tuple[int, ...], bytes]:
    """``(framework, dtype, shape, raw bytes)`` of an array of any framework (a copy on the host).

    torch tensors are read through ``reshape(-1).view(uint8)`` so bfloat16 and 0-d tensors keep their exact bits;
    JAX and CuPy arrays through NumPy; NumPy arrays directly. Non-contiguous arrays are made contiguous first.
    """
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        t = x.detach()
        if hasattr(t, "full_tensor") and type(t).__name__ == "DTensor":
            t = t.to_local()
        t = t.cpu().contiguous()
        raw = t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
        return ("torch", str(t.dtype), tuple(t.shape), raw)
    if mod == "cupy":
        a = x.get()
    else:
        a = np.asarray(x)
    a = np.ascontiguousarray(a)
    return (mod, str(a.dtype), tuple(a.shape), a.tobytes())


def snapshot(obj: Any) -> Any:
    """A canonical, comparable copy of ``obj``: every array as its exact bytes, every container recursed.

    Optimizer objects (anything with ``state_dict()``) are snapshotted through their ``state_dict`` plus their
    parameters when they expose ``param_groups`` with arrays. Mapping keys that are arrays (torch's
    ``optimizer.state`` is keyed by parameters) are replaced by their position.
    """
    if _is_array(obj):
        return ("array",) + array_bytes(obj)
    if isinstance(obj, Mapping):
        items = list(obj.items())
        if any(_is_array(k) for k, _ in items):
            return ("map_by_position", tuple(snapshot(v) for _, v in items))
        return ("map", tuple((repr(k), snapshot(v)) for k, v in sorted(items, key=lambda kv: repr(kv[0]))))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(snapshot(v) for v in obj))
    if isinstance(obj, float) and math.isnan(obj):
        return ("float", "nan")
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return (type(obj).__name__, obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        parts = [snapshot(obj.state_dict())]
        groups = getattr(obj, "param_groups", None)
        if isinstance(groups, Sequence):
            parts.append(snapshot([{k: v for k, v in g.items()} for g in groups]))
        return ("optimizer", tuple(parts))
    if hasattr(obj, "_fields"):  # NamedTuple (optax states)
        return (type(obj).__name__, tuple(snapshot(v) for v in obj))
    return ("object", repr(obj))


def _diff(a: Any, b: Any, path: str) -> str | None:
    if type(a) is not type(b):
        return f"{path}: {a!r:.200} != {b!r:.200}"
    if isinstance(a, tuple):
        if len(a) != len(b):
            return f"{path}: {len(a)} entries != {len(b)}"
        if a and a[0] == "array" and len(a) == 5:
            if a[1:4] != b[1:4]:
                return f"{path}: array {a[1:4]} != {b[1:4]}"
            if a[4] != b[4]:
                return f"{path}: array bytes differ ({a[2]}, shape {a[3]})"
            return None
        for i, (x, y) in enumerate(zip(a, b)):
            d = _diff(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    if a != b and not (a != a and b != b):
        return f"{path}: {a!r:.200} != {b!r:.200}"
    return None


def assert_unchanged(before: Any, after: Any) -> None:
    """Assert two :func:`snapshot` results are identical, naming the first difference (byte for byte)."""
    d = _diff(before, after, "snapshot")
    assert d is None, f"a call that raised changed something: {d}"
