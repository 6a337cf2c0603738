"""Migration between ``torch.optim`` (Adam, AdamW, SGD, Muon) and the portable state.

:func:`from_torch_optim` reads a running ``torch.optim`` optimizer, so that a job can switch to xpoptim (in torch,
JAX or NumPy) and continue the same trajectory; :func:`to_torch_optim` loads a portable state back into one.
Conventions are checked per parameter group; where torch.optim's rule is not the xpoptim rule of that name the
move is refused with the reason:

* ``Adam`` / ``AdamW``: the same state (``exp_avg``, ``exp_avg_sq``, ``step``) and the same rule (eps outside
  ``sqrt(v_hat)``, both moments bias-corrected; Adam's decay coupled, AdamW's decoupled before the step;
  ``Adam(decoupled_weight_decay=True)`` is AdamW). Refused: ``amsgrad=True`` (xpoptim keeps no running maximum of
  the second moment).
* ``SGD``: ``momentum_buffer`` (torch keeps none without momentum: zeros then). torch.optim.SGD counts no steps;
  xpoptim's SGD only distinguishes the first step (the buffer is seeded with the gradient), so a parameter with a
  buffer is at step 1, which continues identically.
* ``Muon``: ``momentum_buffer`` (EMA momentum, Nesterov, Newton-Schulz with torch's coefficients, shape scale
  ``adjust_lr_fn`` -> ``shape_scale``; torch.optim.Muon always runs Newton-Schulz in bfloat16, recorded as
  ``ns_dtype="bfloat16"``: build the xpoptim Muon with ``ns_dtype=torch.bfloat16`` to keep that, as the two then
  agree to bf16 rounding, not bit for bit); torch.optim.Muon takes 2-D parameters only, so there is no fallback
  rule.
  It counts no steps either (Muon does not use the count): step 1 once a buffer exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from xpoptim.core import SPECS, get_spec

from .state import ParamState, PortableState
from .torch_state import param_names, tensor_to_numpy

__all__ = ["from_torch_optim", "to_torch_optim", "TORCH_OPTIM"]

#: The torch.optim classes with an xpoptim rule of the same conventions (checked per group).
TORCH_OPTIM: dict[type[torch.optim.Optimizer], str] = {torch.optim.Adam: "adam", torch.optim.AdamW: "adamw", torch.optim.SGD: "sgd"}
if hasattr(torch.optim, "Muon"):  # torch >= 2.9
    TORCH_OPTIM[torch.optim.Muon] = "muon"


def _rule(opt: Any) -> str:
    for cls, name in TORCH_OPTIM.items():
        if type(opt) is cls:
            if name == "adam" and any(g.get("decoupled_weight_decay", False) for g in opt.param_groups):
                if not all(g.get("decoupled_weight_decay", False) for g in opt.param_groups):
                    raise ValueError("torch.optim.Adam: groups mix decoupled_weight_decay=True and False: one xpoptim optimizer runs one rule")
                return "adamw"
            return name
    raise TypeError(
        f"{type(opt).__module__}.{type(opt).__qualname__} is not supported: expected one of "
        f"{[f'torch.optim.{c.__name__}' for c in TORCH_OPTIM]} (xpoptim has no rule with its conventions)"
    )


def _check_group(rule: str, g: dict, where: str) -> None:
    if g.get("amsgrad", False):
        raise ValueError(f"{where}: amsgrad=True is not supported: xpoptim's Adam/AdamW keep no running maximum of the second moment")
    if rule == "muon" and g.get("adjust_lr_fn") not in (None, "original", "match_rms_adamw"):
        raise ValueError(f"{where}: adjust_lr_fn={g.get('adjust_lr_fn')!r} has no xpoptim shape_scale")
    if any(p.is_complex() for p in g["params"]):
        raise ValueError(f"{where}: complex parameters are not supported by xpoptim (optimize torch.view_as_real(p))")


def _hyperparams(rule: str, g: dict) -> dict:
    if rule in ("adam", "adamw"):
        b1, b2 = g["betas"]
        return {"lr": g["lr"], "beta1": b1, "beta2": b2, "eps": g["eps"], "weight_decay": g["weight_decay"]}
    if rule == "sgd":
        return {k: g[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
    return {
        "lr": g["lr"],
        "weight_decay": g["weight_decay"],
        "momentum": g["momentum"],
        "nesterov": g["nesterov"],
        "ns_steps": g["ns_steps"],
        "ns_coefficients": tuple(g["ns_coefficients"]),
        "ns_eps": g["eps"],
        "shape_scale": g["adjust_lr_fn"] or "original",
        "ns_dtype": torch.bfloat16,  # torch.optim.Muon always runs Newton-Schulz in bfloat16
    }


def from_torch_optim(opt: torch.optim.Optimizer, names: Any = None) -> PortableState:
    """The portable state of a running ``torch.optim`` Adam, AdamW, SGD or Muon.

    Args:
        opt: the optimizer.
        names: parameter names in param-group order, or ``model.named_parameters()`` (default: the groups'
            ``param_names``, else the positions ``"0"``, ``"1"``, ...).

    Returns:
        The :class:`PortableState` of the xpoptim rule of the same conventions (parameters that have state).

    Raises:
        TypeError: another optimizer class.
        ValueError: a group whose conventions differ (the reason is named).
    """
    rule = _rule(opt)
    where = f"torch.optim.{type(opt).__name__}"
    for g in opt.param_groups:
        _check_group(rule, g, where)
    pnames = param_names(opt.param_groups, names, where)
    sd = opt.state_dict()
    state_names = SPECS[rule].state if rule != "muon" else ("momentum_buffer",)
    out = {}
    k = 0
    for g, sg in zip(opt.param_groups, sd["param_groups"]):
        for p, pid in zip(g["params"], sg["params"]):
            name = pnames[k]
            k += 1
            st = sd["state"].get(pid)
            if rule == "sgd" and g["momentum"] == 0:  # a rule without state: torch keeps none
                st = {"momentum_buffer": None, "step": 0}
            if not st:
                continue
            arrays: dict[str, np.ndarray | None] = {}
            for n in state_names:
                v = st.get(n)
                arrays[n] = np.zeros(tuple(p.shape), tensor_to_numpy(p).dtype) if v is None else tensor_to_numpy(v)
            step = int(float(st["step"])) if "step" in st else 1
            out[name] = ParamState(rule, step, tuple(p.shape), arrays)
    return PortableState(rule, _hyperparams(rule, opt.param_groups[0]), out)


def to_torch_optim(portable: PortableState, opt: torch.optim.Optimizer, names: Any = None) -> None:
    """Load a portable state into a ``torch.optim`` Adam, AdamW, SGD or Muon (its hyperparameters are kept).

    Every parameter of ``opt`` must be in ``portable`` (by name, see :func:`from_torch_optim`) with the same shape,
    and ``portable`` must be of the rule with ``opt``'s conventions (a Muon state with fallback parameters is
    refused: torch.optim.Muon takes matrices only). Nothing changes on an error.

    Raises:
        TypeError: another optimizer class.
        ValueError: another rule, conventions that differ, names or shapes that do not match.
    """
    rule = _rule(opt)
    where = f"torch.optim.{type(opt).__name__}"
    for g in opt.param_groups:
        _check_group(rule, g, where)
    if not isinstance(portable, PortableState):
        raise TypeError(f"{where}: expected a PortableState, got {type(portable).__name__}")
    if portable.optimizer != rule:
        raise ValueError(f"{where}: the portable state is a {portable.optimizer!r} state: {where} runs xpoptim's {get_spec(rule).title} rule ({rule!r})")
    pnames = param_names(opt.param_groups, names, where)
    missing = [n for n in pnames if n not in portable.params]
    extra = [n for n in portable.params if n not in set(pnames)]
    if missing or extra:
        raise ValueError(f"{where}: parameter names do not match the portable state (missing {missing}, unexpected {extra})")
    sd = opt.state_dict()
    new = {}
    k = 0
    for g, sg in zip(opt.param_groups, sd["param_groups"]):
        for p, pid in zip(g["params"], sg["params"]):
            name = pnames[k]
            k += 1
            ps = portable.params[name]
            if ps.rule != rule:
                raise ValueError(f"{where}: parameter {name!r} is served by {ps.rule!r} in the portable state: {where} runs {rule!r} only")
            if ps.shape != tuple(p.shape):
                raise ValueError(f"{where}: parameter {name!r} has shape {tuple(p.shape)} here, {ps.shape} in the portable state")
            st: dict = {n: torch.from_numpy(np.ascontiguousarray(v)).to(p.device) for n, v in ps.state.items()}
            if rule == "sgd" and g["momentum"] == 0:
                st["momentum_buffer"] = None
            if rule in ("adam", "adamw"):
                dev = p.device if (g.get("capturable") or g.get("fused")) else "cpu"
                st["step"] = torch.tensor(float(ps.step), dtype=torch.float32, device=dev)
            new[pid] = st
    opt.load_state_dict({"state": new, "param_groups": sd["param_groups"]})
