"""Optimizer specs: one frozen object per optimizer, shared by every adapter.

A spec names the optimizer, lists its hyperparameters (defaults, validation, which are static
switches), the per-element state it keeps, the step-derived scalars its rule needs, and the rule.
Every adapter (torch, optax, NumPy/CuPy) builds from the same spec, so an optimizer has one name, one
set of defaults and one set of numbers in every framework.

Two kinds of rule:

* ``ElementwiseSpec``: ``direction(xp, g, *extras, *state, *scalars, **static) -> (d, *new_state)``
  where every operation is elementwise (fusable: no array creation, no Python branch on array values,
  no in-place writes). The parameter update is ``p <- p * (1 - lr*wd) - lr * d`` (decoupled decay,
  before the step, AdamW/torch order), or ``g <- g + wd * p`` before the rule (coupled L2, torch
  Adam/SGD), built by :func:`make_step_kernel`.
* ``MatrixSpec``: a rule over one matrix or a stack of same-shape matrices (Muon, DeVA_Sinf), plus
  the elementwise spec that non-matrix parameters are routed to.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from ._backend import HOST, is_concrete_number

__all__ = [
    "Hyper",
    "ElementwiseSpec",
    "MatrixSpec",
    "make_step_kernel",
    "make_direction_kernel",
    "step_scalars",
    "STATE_VERSION",
    "lr_hyper",
    "beta_hyper",
    "eps_hyper",
    "wd_hyper",
]

#: Version of the state layout (names, shapes, meaning). Adapters write it into checkpoints and
#: refuse a checkpoint of another version with a clear error.
STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Hyperparameters and validation
# ----------------------------------------------------------------------------------------------

_KINDS = ("lr", "beta", "beta_open", "nonneg", "positive", "bool", "choice", "int_pos", "any")


@dataclasses.dataclass(frozen=True)
class Hyper:
    """One hyperparameter of an optimizer.

    Attributes:
        name: the argument name (the same in every adapter; torch's ``betas`` tuple maps to
            ``beta1``/``beta2``).
        default: the default value.
        kind: the validation rule: ``"lr"`` (>= 0), ``"beta"`` (0 <= x < 1), ``"beta_open"``
            (0 < x < 1), ``"nonneg"`` (>= 0), ``"positive"`` (> 0), ``"bool"``, ``"choice"``,
            ``"int_pos"`` (integer >= 1), ``"any"``.
        doc: one line for docstrings and the README.
        choices: the allowed values for ``"choice"``.
    """

    name: str
    default: Any
    kind: str
    doc: str = ""
    choices: tuple[Any, ...] = ()

    @property
    def static(self) -> bool:
        """Static switches shape the computation (Python values, never traced)."""
        return self.kind in ("bool", "choice", "int_pos", "any")

    def check(self, value: Any, optimizer: str) -> None:
        """Raise ``ValueError`` naming the argument, the value and what is allowed."""
        where = f"{optimizer}: {self.name}={value!r} is invalid"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected True or False")
            return
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{where}: expected one of {self.choices}")
            return
        if self.kind == "int_pos":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: expected an integer >= 1")
            return
        if self.kind == "any":
            return
        if isinstance(value, (bool, str, bytes, tuple, list, dict)) or value is None:
            raise ValueError(f"{where}: expected a real number")
        if not is_concrete_number(value):
            return  # a traced array (optax.inject_hyperparams): checked when concrete
        x = float(value)
        if math.isnan(x):
            raise ValueError(f"{where}: NaN is not allowed")
        if self.kind in ("lr", "nonneg") and not x >= 0:
            raise ValueError(f"{where}: expected a number >= 0")
        if self.kind == "positive" and not x > 0:
            raise ValueError(f"{where}: expected a number > 0")
        if self.kind == "beta" and not 0 <= x < 1:
            raise ValueError(f"{where}: expected 0 <= {self.name} < 1")
        if self.kind == "beta_open" and not 0 < x < 1:
            raise ValueError(f"{where}: expected 0 < {self.name} < 1")
        if math.isinf(x):
            raise ValueError(f"{where}: expected a finite number")


def _validate(name: str, hyperparams: tuple[Hyper, ...], check: Callable | None, values: Mapping[str, Any]) -> dict:
    known = {h.name: h for h in hyperparams}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TypeError(f"{name}: unknown hyperparameter(s) {unknown}; expected a subset of {sorted(known)}")
    out = {h.name: values.get(h.name, h.default) for h in hyperparams}
    for h in hyperparams:
        h.check(out[h.name], name)
    if check is not None:
        check(out)
    return out


class _HyperparamsMixin:
    """``validate`` and ``defaults``, the same for every spec (fields ``title``, ``hyperparams``, ``check``)."""

    title: str
    hyperparams: tuple[Hyper, ...]
    check: Callable[[dict], None] | None

    def validate(self, **hp: Any) -> dict:
        """Fill defaults and validate; returns the full hyperparameter dict."""
        return _validate(self.title, self.hyperparams, self.check, hp)

    @property
    def defaults(self) -> dict:
        return {h.name: h.default for h in self.hyperparams}


# ----------------------------------------------------------------------------------------------
# Elementwise specs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ElementwiseSpec(_HyperparamsMixin):
    """Spec of an elementwise optimizer.

    Attributes:
        name: registry key (``"adamw"``); adapters derive class/function names from ``title``.
        title: display name (``"AdamW"``).
        hyperparams: all hyperparameters, ``lr`` and ``weight_decay`` included.
        state: names of the per-element state buffers, each of the parameter's shape, zero at t = 0.
        scalars: ``scalars(hp, t, ops) -> tuple``: the numeric inputs of ``direction`` after the
            state (betas, eps, bias corrections, kappa, ...). ``t >= 1`` is the step being taken;
            ``ops`` is ``HOST`` (Python floats, float64) or an array namespace (0-D arrays in a
            traced graph).
        direction: the rule (see module docstring).
        weight_decay: ``"decoupled"`` (``p (1 - lr wd)`` before the step) or ``"coupled"``
            (``g + wd p`` fed to the rule).
        extras: names of extra per-element inputs after the gradient (``("grad_variance",)`` for the
            mini-batch variants).
        conventions: eps placement / bias correction / decay position, for the README table.
        source: provenance of the equations (paper, code, or reconstruction).
        check: cross-field validation, ``check(hp)`` raising ``ValueError``.
        fusable: False when the rule calls a non-standard function (``erf``) that the fusing compilers
            may not accept.
    """

    name: str
    title: str
    hyperparams: tuple[Hyper, ...]
    state: tuple[str, ...]
    scalars: Callable[..., tuple]
    direction: Callable[..., tuple]
    weight_decay: str = "decoupled"
    extras: tuple[str, ...] = ()
    conventions: str = ""
    source: str = ""
    check: Callable[[dict], None] | None = None
    fusable: Callable[[dict], bool] | bool = True
    kind: str = "elementwise"

    def static(self, hp: Mapping[str, Any]) -> dict:
        """The static switches ``direction`` takes as keyword arguments (others only shape scalars)."""
        accepted = _keyword_only(self.direction)
        return {h.name: hp[h.name] for h in self.hyperparams if h.static and h.name in accepted}

    def is_fusable(self, hp: Mapping[str, Any]) -> bool:
        return self.fusable(dict(hp)) if callable(self.fusable) else bool(self.fusable)


@functools.lru_cache(maxsize=None)
def _keyword_only(fn: Callable) -> frozenset:
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def step_scalars(spec: ElementwiseSpec, hp: Mapping[str, Any], t: Any, ops: Any = HOST) -> tuple:
    """All scalar inputs of the step kernel: ``(lr, wd_term, *spec.scalars(hp, t, ops))``.

    ``wd_term`` is ``1 - lr * wd`` for decoupled decay and ``wd`` for coupled decay, computed here
    (in float64 on the host, or in the graph's float dtype) so no step scalar is ever formed in a
    low-precision parameter dtype.

    Args:
        spec: the optimizer.
        hp: validated hyperparameters (numbers or 0-D arrays).
        t: the step being taken (``t >= 1``): a Python int or a 0-D float array.
        ops: ``HOST`` or an array namespace.

    Returns:
        The tuple of scalars, in the order :func:`make_step_kernel` expects.
    """
    lr, wd = hp["lr"], hp["weight_decay"]
    wd_term = 1 - lr * wd if spec.weight_decay == "decoupled" else wd
    return (lr, wd_term, *spec.scalars(hp, t, ops))


def make_step_kernel(spec: ElementwiseSpec, xp: Any, static: Mapping[str, Any], maximize: bool = False) -> Callable:
    """Build the fusable full step ``kernel(p, g, *extras, *state, lr, wd_term, *scalars)``.

    The kernel returns ``(p_new, *new_state)``. It is a named ``def`` over positional arrays and
    scalars only, so ``jax.jit``, ``torch.compile`` and ``cupy.fuse`` can compile it to one kernel.

    Args:
        spec: the optimizer.
        xp: the array namespace the kernel will run on.
        static: the static switches (``spec.static(hp)``).
        maximize: ascend instead of descend (the gradient is negated inside the kernel).

    Returns:
        The kernel.
    """
    direction = spec.direction
    n_extra, n_state = len(spec.extras), len(spec.state)
    coupled = spec.weight_decay == "coupled"
    static = dict(static)

    def step_kernel(p: Any, g: Any, *args: Any) -> tuple:
        extras = args[:n_extra]
        state = args[n_extra : n_extra + n_state]
        lr, wd_term = args[n_extra + n_state], args[n_extra + n_state + 1]
        scalars = args[n_extra + n_state + 2 :]
        if maximize:
            g = -g
        if coupled:
            g = g + wd_term * p
            out = direction(xp, g, *extras, *state, *scalars, **static)
            return (p - lr * out[0], *out[1:])
        out = direction(xp, g, *extras, *state, *scalars, **static)
        return (p * wd_term - lr * out[0], *out[1:])

    step_kernel.__name__ = f"{spec.name}_step_kernel"
    return step_kernel


def make_direction_kernel(spec: ElementwiseSpec, xp: Any, static: Mapping[str, Any]) -> Callable:
    """Build ``kernel(g, *extras, *state, *scalars) -> (d, *new_state)``: the rule without lr or decay.

    This is the optax ``scale_by_<rule>`` layer: the alias adds decay and the learning rate.
    """
    direction = spec.direction
    static = dict(static)

    def direction_kernel(g: Any, *args: Any) -> tuple:
        return direction(xp, g, *args, **static)

    direction_kernel.__name__ = f"{spec.name}_direction_kernel"
    return direction_kernel


# ----------------------------------------------------------------------------------------------
# Matrix specs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatrixSpec(_HyperparamsMixin):
    """Spec of a matrix optimizer (Muon, DeVA_Sinf).

    Attributes:
        name, title, hyperparams, conventions, source, check: as for ``ElementwiseSpec``.
        fallback: the registry name of the default elementwise spec for non-matrix parameters
            (overridable per optimizer with the ``fallback`` argument of the adapters).
        fallback_defaults: hyperparameter overrides for the fallback rule (e.g. Muon's AdamW with
            betas (0.9, 0.95), eps 1e-10 as in KellerJordan/Muon's ``MuonWithAuxAdam``). Never the
            learning rate: the fallback's learning rate **follows the optimizer's** ``lr`` (the same value,
            as optax.contrib.muon's Adam does, and torch param groups without their own ``lr``) unless it
            is given explicitly (``fallback_hyperparams={"lr": ...}``, or a param group's own ``lr``), in
            every adapter.
    """

    name: str
    title: str
    hyperparams: tuple[Hyper, ...]
    fallback: str
    fallback_defaults: Mapping[str, Any]
    conventions: str = ""
    source: str = ""
    check: Callable[[dict], None] | None = None
    kind: str = "matrix"

    def static(self, hp: Mapping[str, Any]) -> dict:
        return {h.name: hp[h.name] for h in self.hyperparams if h.static}

    def resolve_fallback(self, fallback: str | None = None, hyperparams: Mapping[str, Any] | None = None) -> tuple[ElementwiseSpec, dict]:
        """The elementwise rule for the non-matrix parameters, and the hyperparameters given for it.

        ``fallback_defaults`` apply only when the rule is the spec's own fallback (by name or title), restricted to
        the hyperparameters that rule has; ``hyperparams`` go over them.

        Args:
            fallback: registry name or title of the rule; None: ``self.fallback``.
            hyperparams: the user's hyperparameters for the rule (spec names).

        Returns:
            ``(fallback_spec, hp)``. ``hp`` holds the given values only (``fallback_defaults``, then
            ``hyperparams``), not the rule's own defaults, so adapters can put per-group values over it; it has
            passed ``fallback_spec.validate`` (``fallback_spec.validate(**hp)`` is the full dict).

        Raises:
            ValueError: ``fallback`` is unknown or not an elementwise rule; a hyperparameter value is invalid.
            TypeError: a hyperparameter the rule does not have.
        """
        from . import ELEMENTWISE, get_spec  # noqa: PLC0415  (the registry's package imports this module)

        name = self.fallback if fallback is None else fallback
        try:
            spec = get_spec(name)
        except ValueError:
            spec = None
        if not isinstance(spec, ElementwiseSpec):
            raise ValueError(f"{self.title}: fallback={name!r} is invalid: expected an elementwise optimizer, one of {list(ELEMENTWISE)}")
        hp: dict = {}
        if spec is get_spec(self.fallback):
            known = {h.name for h in spec.hyperparams}
            hp = {k: v for k, v in self.fallback_defaults.items() if k in known}
        hp.update(hyperparams or {})
        spec.validate(**hp)
        return spec, hp


# ----------------------------------------------------------------------------------------------
# Shorthands for the hyperparameters most optimizers share
# ----------------------------------------------------------------------------------------------


def lr_hyper(default: float) -> Hyper:
    return Hyper("lr", default, "lr", "learning rate (a float; adapters also take schedules)")


def beta_hyper(name: str, default: float, doc: str) -> Hyper:
    return Hyper(name, default, "beta", doc)


def eps_hyper(default: float, doc: str = "numerical floor (see the conventions table)") -> Hyper:
    return Hyper("eps", default, "nonneg", doc)


def wd_hyper(default: float = 0.0, doc: str = "decoupled weight decay: p <- p (1 - lr wd) before the step") -> Hyper:
    return Hyper("weight_decay", default, "nonneg", doc)
