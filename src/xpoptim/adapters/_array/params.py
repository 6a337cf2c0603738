"""Parameter structure of the array adapter: ``params`` (lists, dicts, parameter groups) normalised to groups."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xpoptim.core import SPECS, MatrixSpec

from .namespace import _is_array

_LAYOUTS = ("out_in", "in_out")
_GROUP_EXTRA_KEYS = ("params", "fallback_hyperparams")


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
        raw: list[dict[str, Any]] = [{"params": params}]
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



def _spec_hp(spec: Any, hp: Mapping[str, Any]) -> dict:
    return {k: v for k, v in hp.items() if k not in _GROUP_EXTRA_KEYS}



def _matrix_rules() -> str:
    """The registered matrix rules' titles, for messages."""
    return ", ".join(s.title for s in SPECS.values() if isinstance(s, MatrixSpec))
