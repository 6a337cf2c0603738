"""Portable state of the NumPy/CuPy adapter (``Optimizer.export_state`` / ``import_state`` delegate here).

Read and written through the optimizer's own ``state_dict()`` / ``load_state_dict()`` (NumPy arrays; one step
count for the whole optimizer). Orientation: with ``layout="out_in"`` (the default, torch's) arrays are already
portable; with ``layout="in_out"`` (flax kernels) every array of two or more axes has its last axis (the output
axis) moved to the front, and matrix-rule state, kept as ``(prod(shape[:-1]), shape[-1])``, is transposed.

Also here: :func:`flatten_state_dict` / :func:`unflatten_state_dict`, which turn the adapter's nested
``state_dict()`` into flat arrays for ``numpy.savez`` and back, so a checkpoint loads with
``numpy.load(path, allow_pickle=False)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from xpoptim.core import SPECS
from xpoptim.core.spec import MatrixSpec

from .layout import Orientation, swap_sides
from .state import ParamState, PortableState, jsonable, matrix_roles

__all__ = ["export_array", "import_array", "flatten_state_dict", "unflatten_state_dict"]


def _orientation(opt: Any, ndim: int) -> Orientation:
    if opt.layout == "in_out" and ndim >= 2:
        return Orientation((ndim - 1, *range(ndim - 1)))
    return Orientation(tuple(range(ndim)))


def _entries(opt: Any, sd: Mapping[str, Any]) -> list[tuple[Any, Any, int]]:
    """``(key, array, group index)`` for every parameter, in the optimizer's order."""
    out: list[tuple[Any, Any, int]] = []
    for gi, (g, sg) in enumerate(zip(opt.param_groups, sd["param_groups"])):
        out.extend((k, a, gi) for k, a in zip(sg["keys"], g["params"]))
    return out


def _rule(opt: Any, entry_state: Mapping[str, Any]) -> str:
    spec = opt.spec
    if not isinstance(spec, MatrixSpec):
        return spec.name
    return spec.name if set(entry_state) == set(matrix_roles(spec.name)) else opt.fallback_spec.name


def export_array(opt: Any) -> PortableState:
    """The portable state of an ``xpoptim.adapters.array`` (NumPy/CuPy) optimizer, keyed by ``str(key)``."""
    sd = opt.state_dict()
    step = int(sd["step"])
    params = {}
    for key, arr, _gi in _entries(opt, sd):
        st = sd["state"][key]
        rule = _rule(opt, st)
        orient = _orientation(opt, len(arr.shape))
        if isinstance(SPECS[rule], MatrixSpec):
            arrays = dict(st) if opt.layout == "out_in" else swap_sides(rule, dict(st))
        else:
            arrays = {k: orient.to_portable(np.asarray(v)) for k, v in st.items()}
        params[str(key)] = ParamState(rule, step, orient.portable_shape(tuple(arr.shape)), arrays)
    g0 = sd["param_groups"][0]
    hp = {k: v for k, v in g0.items() if k not in ("keys", "fallback_hyperparams")}
    fb = opt.fallback_spec.name if opt.fallback_spec is not None else None
    return PortableState(opt.spec.name, hp, params, fallback=fb, fallback_hyperparams=dict(g0.get("fallback_hyperparams", {})))


def import_array(opt: Any, portable: PortableState) -> None:
    """Load a portable state into an ``xpoptim.adapters.array`` optimizer (its hyperparameters are kept).

    Every parameter must be in ``portable`` under ``str(key)`` with the same rule and shape, and all at one step
    (this adapter keeps one step count). On any error nothing changes.

    Raises:
        ValueError: another optimizer or rule, names, shapes or steps that do not match.
    """
    where = opt.spec.title
    if not isinstance(portable, PortableState):
        raise TypeError(f"{where}: import_state expects a PortableState (xpoptim.portable.load(path)), got {type(portable).__name__}")
    if portable.optimizer != opt.spec.name:
        raise ValueError(f"{where}: the portable state is a {portable.optimizer!r} state: expected {opt.spec.name!r}")
    sd = opt.state_dict()
    entries = _entries(opt, sd)
    names = [str(k) for k, _, _ in entries]
    missing = [n for n in names if n not in portable.params]
    extra = [n for n in portable.params if n not in set(names)]
    if missing or extra:
        raise ValueError(
            f"{where}: parameter names do not match the portable state (missing {missing}, unexpected {extra}); "
            "rename the state (portable.rename({...}))"
        )
    steps = {portable.params[n].step for n in names}
    if len(steps) != 1:
        raise ValueError(f"{where}: the portable state's parameters are at different steps {sorted(steps)}: this optimizer keeps one step count")
    state = {}
    for (key, arr, _gi), name in zip(entries, names):
        ps = portable.params[name]
        rule = _rule(opt, sd["state"][key])
        if ps.rule != rule:
            raise ValueError(f"{where}: parameter {name!r} is served by rule {rule!r} here, by {ps.rule!r} in the portable state")
        orient = _orientation(opt, len(arr.shape))
        if ps.shape != orient.portable_shape(tuple(arr.shape)):
            raise ValueError(f"{where}: parameter {name!r} has shape {orient.portable_shape(tuple(arr.shape))} (portable orientation) here, {ps.shape} in the portable state")
        if isinstance(SPECS[rule], MatrixSpec):
            state[key] = dict(ps.state) if opt.layout == "out_in" else swap_sides(rule, dict(ps.state))
        else:
            state[key] = {k: orient.from_portable(np.asarray(v)) for k, v in ps.state.items()}
    opt.load_state_dict({**sd, "step": steps.pop(), "state": state})


# ----------------------------------------------------------------------------------------------------------------------
# The adapter's own state_dict() as flat arrays (numpy.savez without pickle)
# ----------------------------------------------------------------------------------------------------------------------

_META = "xpoptim.state_dict"


def flatten_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """An array adapter's ``state_dict()`` as ``{name: ndarray}`` for ``numpy.savez(path, **flat)``.

    The state arrays are stored as ``state.<i>.<name>`` (``i`` the parameter's position); everything else
    (version, optimizer, step, groups, keys) as one JSON document in a 0-D unicode array.
    """
    keys = list(state_dict["state"])
    flat: dict[str, np.ndarray] = {}
    nones: dict[str, list[str]] = {}
    for i, k in enumerate(keys):
        for n, v in state_dict["state"][k].items():
            if v is None:
                nones.setdefault(str(i), []).append(n)
            else:
                flat[f"state.{i}.{n}"] = np.asarray(v)
    meta = {
        "version": state_dict["version"],
        "optimizer": state_dict["optimizer"],
        "step": int(state_dict["step"]),
        "param_groups": jsonable(list(state_dict["param_groups"])),
        "keys": keys,
        "names": {str(i): sorted(state_dict["state"][k]) for i, k in enumerate(keys)},
        "none": nones,
    }
    flat[_META] = np.array(json.dumps(meta))
    return flat


def unflatten_state_dict(flat: Mapping[str, Any]) -> dict:
    """The inverse of :func:`flatten_state_dict` (``flat``: a dict or the ``numpy.load`` result)."""
    if _META not in flat:
        raise ValueError(f"not a flattened xpoptim state dict: no {_META!r} entry")
    meta = json.loads(str(np.asarray(flat[_META])[()]))
    state = {}
    for i, k in enumerate(meta["keys"]):
        nones = set(meta["none"].get(str(i), []))
        state[k] = {n: (None if n in nones else np.asarray(flat[f"state.{i}.{n}"])) for n in meta["names"][str(i)]}
    return {
        "version": meta["version"],
        "optimizer": meta["optimizer"],
        "step": meta["step"],
        "param_groups": meta["param_groups"],
        "state": state,
    }
