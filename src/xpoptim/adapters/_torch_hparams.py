"""Hyperparameters and options of the torch adapter's param groups: torch's spelling, one validation path.

Private module of the torch adapter. Groups keep the spec's hyperparameter names, except that a spec with ``beta1``
and ``beta2`` keeps them as torch's ``betas=(beta1, beta2)`` tuple (so ``OneCycleLR``/``CyclicLR`` momentum cycling
works). Every numeric value is read through :func:`number`: a Python real, a NumPy real scalar or a 1-element real
tensor (read once per step, as torch.optim reads a tensor ``lr``); anything else (``None``, arrays, complex
numbers, strings, objects) is refused with the argument, the value and what is allowed.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from xpoptim.core.spec import ElementwiseSpec, MatrixSpec

__all__ = ["OPTION_KEYS", "uses_betas", "group_keys", "to_group_form", "normalize_betas", "number", "hp_from_group", "check_options"]

#: Options every group carries besides the hyperparameters (with their defaults).
OPTION_DEFAULTS: dict[str, Any] = {"maximize": False, "state_dtype": None, "compile": False}
OPTION_KEYS = tuple(OPTION_DEFAULTS)

Spec = ElementwiseSpec | MatrixSpec


def uses_betas(spec: Spec) -> bool:
    """Whether the spec has ``beta1`` and ``beta2`` (kept as torch's ``betas`` pair in param groups)."""
    hit = _BETAS.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    names = {h.name for h in spec.hyperparams}
    out = "beta1" in names and "beta2" in names
    if len(_BETAS) >= _VALIDATED_MAX:
        _BETAS.clear()
    _BETAS[id(spec)] = (spec, out)
    return out


#: :func:`uses_betas` by spec (asked for every hyperparameter at every step); the spec is kept in the entry, so its
#: id cannot be reused by another spec while the entry lives.
_BETAS: dict[int, tuple[Spec, bool]] = {}


def group_keys(spec: Spec) -> tuple[str, ...]:
    """Group keys for a spec's hyperparameters (``beta1``/``beta2`` folded into ``betas``)."""
    keys: list[str] = []
    for h in spec.hyperparams:
        if uses_betas(spec) and h.name in ("beta1", "beta2"):
            if "betas" not in keys:
                keys.append("betas")
        else:
            keys.append(h.name)
    return tuple(keys)


def to_group_form(spec: Spec, hp: Mapping[str, Any]) -> dict:
    """Spec-named hyperparameters -> group keys (``betas`` tuple where the spec has beta1/beta2)."""
    out = {k: v for k, v in hp.items() if k not in ("beta1", "beta2") or not uses_betas(spec)}
    if uses_betas(spec) and ("beta1" in hp or "beta2" in hp):
        out["betas"] = (hp["beta1"], hp["beta2"])
    return out


def normalize_betas(spec: Spec, group: dict, where: str) -> None:
    """Fold ``beta1=``/``beta2=`` given next to (or instead of) ``betas=`` into the group's ``betas``."""
    has_b = [k for k in ("beta1", "beta2") if k in group]
    if not uses_betas(spec):
        if "betas" in group:
            raise TypeError(f"{where}: betas={group['betas']!r} is not a hyperparameter of {spec.title}")
        return
    if has_b and "betas" in group:
        raise TypeError(f"{where}: give either betas=(beta1, beta2) or beta1=/beta2=, not both")
    if "betas" in group:
        betas = group["betas"]
        if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}: betas={betas!r} is invalid: expected a pair (beta1, beta2)")
        group["betas"] = tuple(betas)
    elif has_b:
        d = spec.defaults
        group["betas"] = (group.pop("beta1", d["beta1"]), group.pop("beta2", d["beta2"]))


def number(value: Any, name: str, where: str) -> Any:
    """A numeric hyperparameter as a Python number.

    Accepted: Python ``int``/``float``, NumPy real scalars, 1-element real floating or integer tensors (read with
    ``.item()`` at every step). Refused with a ``ValueError``: ``None``, ``bool``, complex numbers, arrays and
    tensors of another size, strings and other objects.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{where}: {name}={value!r} is invalid: expected a real number or a 1-element real tensor "
                f"(Tensor {name} must be 1-element and real; got a {value.dtype} tensor of shape {tuple(value.shape)})"
            )
        return value.item()
    if type(value) in (int, float):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{where}: {name}={value!r} is invalid: expected a real number or a 1-element real tensor")


def hp_from_group(spec: Spec, group: Mapping[str, Any], where: str) -> dict:
    """Validated spec hyperparameters from a param group (Python numbers for the numeric ones)."""
    hp = {}
    betas = uses_betas(spec)
    for h in spec.hyperparams:
        if betas and h.name in ("beta1", "beta2"):
            b = group.get("betas")
            if not isinstance(b, tuple) or len(b) != 2:
                raise ValueError(f"{where}: betas={b!r} is invalid: expected a pair (beta1, beta2)")
            val = b[0] if h.name == "beta1" else b[1]
        else:
            if h.name not in group:
                raise ValueError(f"{where}: a param group lacks the hyperparameter {h.name!r}")
            val = group[h.name]
        hp[h.name] = val if h.static else number(val, h.name, where)
    # A group whose values (and their types: 2 and 2.0 validate differently) passed before passes again: the
    # validation is a function of them alone. Schedulers change lr at every step, so the cache is kept small.
    key: tuple | None = (id(spec), *((k, type(v), v) for k, v in hp.items()))
    try:
        hit = _VALIDATED.get(key) if key is not None else None
    except TypeError:  # an unhashable static value: validated every time
        key, hit = None, None
    if hit is not None and hit[0] is spec:
        return dict(hit[1])
    out = spec.validate(**hp)
    if key is not None:
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = (spec, dict(out))
    return out


#: Validated hyperparameters by (spec, values and their types); the spec is kept in the entry, so its id cannot be
#: reused by another spec while the entry lives.
_VALIDATED: dict[tuple, tuple[Spec, dict]] = {}
_VALIDATED_MAX = 256


def check_options(group: Mapping[str, Any], where: str) -> None:
    """``maximize`` (bool), ``state_dtype`` (None or a real floating dtype) and ``compile`` (bool)."""
    for key in OPTION_KEYS:
        if key not in group:
            raise ValueError(f"{where}: a param group lacks the option {key!r}")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"{where}: maximize={group['maximize']!r} is invalid: expected True or False")
    sd = group["state_dtype"]
    if sd is not None and not (isinstance(sd, torch.dtype) and sd.is_floating_point and not sd.is_complex):
        raise ValueError(f"{where}: state_dtype={sd!r} is invalid: expected None or a real floating torch.dtype")
    if not isinstance(group["compile"], bool):
        raise ValueError(
            f"{where}: compile={group['compile']!r} is invalid: expected True (torch.compile the step, opt-in) or "
            "False (the compiled C loop on CPU, torch's multi-tensor ops elsewhere)"
        )
