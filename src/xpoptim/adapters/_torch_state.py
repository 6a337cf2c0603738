"""``load_state_dict`` of the torch adapter: check everything, build the new groups and state aside.

Private module of the torch adapter. :func:`build_loaded` returns complete new param groups and state for an
optimizer, or raises a ``ValueError`` naming what does not fit; the optimizer swaps them in only on success, so a
refused state dict changes nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from xpoptim.core import SPECS, STATE_VERSION
from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

from . import _torch_engine as _eng
from ._torch_hparams import OPTION_DEFAULTS, check_options, hp_from_group

__all__ = ["build_loaded", "expected_state"]


def expected_state(gspec: ElementwiseSpec | MatrixSpec, p: torch.Tensor, hp: dict) -> dict[str, tuple | None]:
    """Names and shapes of the floating state a parameter holds under ``gspec`` (``None``: the entry is ``None``).

    Matrix rules: the names and shapes ``core.functional.init`` gives for the parameter's matrix (built on the
    ``meta`` device: no memory); a DTensor parameter keeps state of its matrix shape in its own shape, sharded."""
    if isinstance(gspec, ElementwiseSpec):
        return {n: tuple(p.shape) for n in gspec.state}
    shape2 = _eng.matrix_shape(p)
    init = _eng.matrix_state_init(gspec, torch.empty(shape2, device="meta"), hp, torch.float32)
    out: dict[str, tuple | None] = {}
    for k, v in init.items():
        if k in ("step", "state_version"):
            continue
        shape = None if v is None else tuple(v.shape)
        out[k] = tuple(p.shape) if _eng.is_sharded(p) and shape == shape2 else shape
    return out


def _step_value(v: Any, where: str) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{where}: saved step={v!r} is invalid: expected a whole number >= 0")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v != int(v):
        raise ValueError(f"{where}: saved step={v!r} is invalid: expected a whole number >= 0")
    return float(v)


def build_loaded(opt: Any, state_dict: Any) -> tuple[list[dict], defaultdict]:
    """New ``(param_groups, state)`` for ``opt`` from ``state_dict``; raises ``ValueError`` when anything does not fit."""
    where = opt.spec.title
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{where}: load_state_dict expects a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise ValueError(f"{where}: the state dict's 'state' is a {type(saved_state).__name__}, expected a dict")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"{where}: the state dict has {len(saved_groups)} parameter group(s), this optimizer has {len(opt.param_groups)}"
        )
    groups: list[dict] = []
    id_map: dict[Any, tuple[torch.Tensor, dict, Any, dict]] = {}
    for sg, g in zip(saved_groups, opt.param_groups):
        if not isinstance(sg, Mapping) or "params" not in sg:
            raise ValueError(f"{where}: a saved parameter group is not a dict with 'params'")
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"{where}: a saved parameter group has {len(sg['params'])} params, the optimizer's has {len(g['params'])}")
        if sg.get("rule") != g["rule"]:
            raise ValueError(
                f"{where}: the state dict was not written by this optimizer: a group has rule={sg.get('rule')!r}, "
                f"expected rule={g['rule']!r} (an xpoptim {where} state dict)"
            )
        if "state_dtype" not in sg:
            raise ValueError(f"{where}: a saved parameter group lacks 'state_dtype' (not an xpoptim {where} state dict)")
        new = {k: v for k, v in sg.items() if k != "params"}
        for k, v in OPTION_DEFAULTS.items():  # an older release wrote no maximize/compile: torch fills defaults too
            new.setdefault(k, v)
        if new["compile"] == "auto":  # older releases' default; torch.compile is opt-in now
            new["compile"] = False
        if "param_names" in g and "param_names" not in new:  # as torch.optim: names given to either are kept
            new["param_names"] = g["param_names"]
        new["params"] = g["params"]
        gspec = SPECS[g["rule"]]
        hp = hp_from_group(gspec, new, where)
        check_options(new, where)
        groups.append(new)
        for pid, p in zip(sg["params"], g["params"]):
            id_map[pid] = (p, new, gspec, hp)
    state: defaultdict = defaultdict(dict)
    for pid, st in saved_state.items():
        if pid not in id_map:
            continue
        p, group, gspec, hp = id_map[pid]
        if not isinstance(st, Mapping):
            raise ValueError(f"{where}: saved state of parameter {pid!r} is a {type(st).__name__}, expected a dict")
        if not st:
            continue
        version = st.get("state_version")
        if version != STATE_VERSION:
            raise ValueError(f"{where}: state version {version!r} is not supported: expected state_version={STATE_VERSION}")
        expected = expected_state(gspec, p, hp)
        got = set(st) - {"step", "state_version"}
        if got != set(expected):
            raise ValueError(f"{where}: saved state names {sorted(got)} do not match the rule's {sorted(expected)}")
        if "step" not in st:
            raise ValueError(f"{where}: saved state lacks 'step'")
        step = _step_value(st["step"], where)
        sdt = _eng.state_dtype_for(p, group["state_dtype"])
        out: dict[str, Any] = {}
        for name, shape in expected.items():
            v = st[name]
            if shape is None:
                if v is not None:
                    raise ValueError(f"{where}: saved state {name!r} should be None for a parameter of shape {tuple(p.shape)}")
                out[name] = None
                continue
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got_shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"{where}: saved state {name!r} has shape {got_shape}, expected {shape} for a parameter of shape {tuple(p.shape)}"
                )
            if not v.is_floating_point():
                raise ValueError(
                    f"{where}: saved state {name!r} has dtype {v.dtype}: expected a floating dtype (it is cast to {sdt})"
                )
            if _eng.is_sharded(v) or _eng.is_sharded(p):
                out[name] = v.detach().to(dtype=sdt, copy=True) if _eng.is_sharded(v) else v
            else:
                out[name] = v.detach().to(device=p.device, dtype=sdt, copy=True, memory_format=torch.preserve_format)
        step_t = _eng.new_step()
        step_t.fill_(step)
        out["step"] = step_t
        out["state_version"] = STATE_VERSION
        state[p] = out
    return groups, state
