"""Portable state of the torch adapter (``XPOptimizer.export_state`` / ``import_state`` delegate here).

The torch adapter is already in the portable orientation (``Linear.weight`` is ``(out, in)``; matrix-rule state
is ``(out, in*kh*kw)``), so this is a renaming: the optimizer's own ``state_dict()`` is read, and a state dict is
built for its own ``load_state_dict()`` (which checks names, shapes and the state version, casts to the state
dtype and device, and changes nothing when it refuses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from xpoptim.core import SPECS, STATE_VERSION
from xpoptim.core.spec import MatrixSpec

from .state import ParamState, PortableState

__all__ = ["export_torch", "import_torch", "spec_hyperparams", "tensor_to_numpy", "param_names"]


def tensor_to_numpy(x: torch.Tensor) -> np.ndarray:
    """A detached host copy; 16-bit floats are widened to float32 (NumPy has no bfloat16)."""
    x = x.detach()
    if hasattr(x, "full_tensor"):  # DTensor: the whole array
        x = x.full_tensor()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return x.cpu().numpy().copy()


def spec_hyperparams(spec: Any, group: Mapping[str, Any]) -> dict:
    """A param group's hyperparameters by spec name (torch's ``betas`` unfolded into ``beta1``/``beta2``)."""
    out = {}
    for h in spec.hyperparams:
        if h.name in group:
            out[h.name] = group[h.name]
        elif h.name in ("beta1", "beta2") and "betas" in group:
            out[h.name] = group["betas"][0 if h.name == "beta1" else 1]
    return out


def param_names(groups: Sequence[Mapping[str, Any]], names: Any, where: str) -> list[str]:
    """One name per parameter, in param-group order.

    ``names``: None (the groups' ``param_names`` when every group has them, else the positions ``"0"``, ``"1"``,
    ...), a list of names in that order, or ``(name, param)`` pairs (``model.named_parameters()``), matched by
    identity.
    """
    params = [p for g in groups for p in g["params"]]
    if names is None:
        if all("param_names" in g for g in groups):
            return [str(n) for g in groups for n in g["param_names"]]
        return [str(i) for i in range(len(params))]
    items = list(names) if isinstance(names, Iterable) and not isinstance(names, (str, bytes)) else None
    if items is None:
        raise TypeError(f"{where}: names={names!r} is invalid: expected a list of names or model.named_parameters()")
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor) for x in items):
        by_id = {id(p): str(n) for n, p in items}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"{where}: names has no entry for the optimizer's parameter(s) at position(s) {missing}")
        return [by_id[id(p)] for p in params]
    if len(items) != len(params) or not all(isinstance(n, str) for n in items):
        raise ValueError(f"{where}: names has {len(items)} entries: expected {len(params)} names (str), one per parameter in param-group order")
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: names has duplicates")
    return list(items)


def _hyperparams(opt: Any) -> tuple[dict, str | None, dict]:
    spec = opt.spec
    main = next((g for g in opt.param_groups if g.get("rule", spec.name) == spec.name), opt.defaults)
    hp = spec_hyperparams(spec, main)
    fb_name, fb_hp = None, {}
    if isinstance(spec, MatrixSpec):
        fb_group = next((g for g in opt.param_groups if g.get("rule", spec.name) != spec.name), None)
        fb_name = fb_group["rule"] if fb_group is not None else opt.defaults.get("fallback", (spec.fallback, {}))[0]
        fb_hp = spec_hyperparams(SPECS[fb_name], fb_group if fb_group is not None else {**opt.defaults, **opt.defaults.get("fallback", (None, {}))[1]})
    return hp, fb_name, fb_hp


def export_torch(opt: Any, names: Any = None) -> PortableState:
    """The portable state of an xpoptim torch optimizer (parameters that have state).

    Args:
        opt: an ``xpoptim.adapters.torch`` optimizer.
        names: see :func:`param_names`.

    Returns:
        The :class:`PortableState`.
    """
    sd = opt.state_dict()
    pnames = param_names(opt.param_groups, names, opt.spec.title)
    out: dict[str, ParamState] = {}
    k = 0
    for g, sg in zip(opt.param_groups, sd["param_groups"]):
        rule = g.get("rule", opt.spec.name)
        for p, pid in zip(g["params"], sg["params"]):
            name = pnames[k]
            k += 1
            st = sd["state"].get(pid)
            if not st:
                continue
            arrays = {n: (None if v is None else tensor_to_numpy(v)) for n, v in st.items() if n not in ("step", "state_version")}
            out[name] = ParamState(rule, int(float(st["step"])), tuple(p.shape), arrays)
    hp, fb, fb_hp = _hyperparams(opt)
    return PortableState(opt.spec.name, hp, out, fallback=fb, fallback_hyperparams=fb_hp)


def import_torch(opt: Any, portable: PortableState, names: Any = None) -> None:
    """Load a portable state into an xpoptim torch optimizer (its hyperparameters are kept).

    Every parameter of the optimizer must be in ``portable`` under its name (see :func:`param_names`), with the
    same rule and shape; on any error nothing changes.

    Raises:
        ValueError: another optimizer or rule, names that do not match, wrong shapes.
    """
    where = opt.spec.title
    if not isinstance(portable, PortableState):
        raise TypeError(f"{where}: import_state expects a PortableState (xpoptim.portable.load(path)), got {type(portable).__name__}")
    if portable.optimizer != opt.spec.name:
        raise ValueError(f"{where}: the portable state is a {portable.optimizer!r} state: expected {opt.spec.name!r}")
    sd = opt.state_dict()
    pnames = param_names(opt.param_groups, names, where)
    missing = [n for n in pnames if n not in portable.params]
    extra = [n for n in portable.params if n not in set(pnames)]
    if missing or extra:
        raise ValueError(
            f"{where}: parameter names do not match the portable state (missing {missing}, unexpected {extra}); "
            "pass names= or rename the state (portable.rename({...}))"
        )
    new_state: dict = {}
    k = 0
    for g, sg in zip(opt.param_groups, sd["param_groups"]):
        rule = g.get("rule", opt.spec.name)
        for p, pid in zip(g["params"], sg["params"]):
            name = pnames[k]
            k += 1
            ps = portable.params[name]
            if ps.rule != rule:
                raise ValueError(f"{where}: parameter {name!r} is served by rule {rule!r} here, by {ps.rule!r} in the portable state")
            if ps.shape != tuple(p.shape):
                raise ValueError(f"{where}: parameter {name!r} has shape {tuple(p.shape)} here, {ps.shape} in the portable state")
            st: dict = {"step": torch.tensor(float(ps.step), dtype=torch.float32), "state_version": STATE_VERSION}
            for n, v in ps.state.items():
                st[n] = None if v is None else torch.from_numpy(np.ascontiguousarray(v))
            new_state[pid] = st
    opt.load_state_dict({"state": new_state, "param_groups": sd["param_groups"]})
