"""Optimizer specs: one frozen object per optimizer, shared by every adapter.

A spec names the optimizer, lists its hyperparameters (defaults, validation, which are static
switches), the per-element state it keeps, the step-derived scalars its rule needs, and the rule.
Every adapter (torch, optax, NumPy/CuPy) builds from the same spec, so an optimizer has one name, one
set of defaults and one set of numbers in every framework.

Two kinds of rule:

* ``ElementwiseSpec``: ``direction(xp, g, <extras>, <state>, <scalars>, *, <static>) -> (d, *new_state)``
  where every operation is elementwise (fusable: no array creation, no Python branch on array values,
  no in-place writes). The parameter update is ``p <- p * (1 - lr*wd) - lr * d`` (decoupled decay,
  before the step, AdamW/torch order), or ``g <- g + wd * p`` before the rule (coupled L2, torch
  Adam/SGD), built by :func:`make_step_kernel`. The rule's arguments are bound **by name**: each
  extra input and state buffer goes to the parameter of the same name (or the one named in the
  spec's ``arguments``), the values of ``scalars`` go to the remaining parameters, and the new state
  comes back in the order the rule lists its state parameters. The spec checks this when it is built
  (:func:`bind_rule`), so a spec whose names do not match its rule is refused.
* ``MatrixSpec``: a rule over one matrix or a stack of same-shape matrices (Muon, DeVA_Sinf), plus
  the elementwise spec that non-matrix parameters are routed to.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from ._backend import HOST, real_scalar

__all__ = [
    "Hyper",
    "HyperKind",
    "STATIC_KINDS",
    "dtype_name",
    "concrete",
    "ElementwiseSpec",
    "MatrixSpec",
    "make_step_kernel",
    "make_direction_kernel",
    "step_scalars",
    "RuleBinding",
    "bind_rule",
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

class HyperKind(str, enum.Enum):
    """How a hyperparameter is validated. A ``str`` enum: ``HyperKind.LR == "lr"``.

    Numeric kinds (a real number, or a 0-D / 1-element real array of any framework; a traced value is checked
    when it is concrete, see :func:`_backend.real_scalar`):

    * ``LR``: ``>= 0``; ``NONNEG``: ``>= 0``; ``POSITIVE``: ``> 0``;
    * ``BETA``: ``0 <= x < 1``; ``BETA_OPEN``: ``0 < x < 1``;
    * ``BETA_OR_NEGATIVE``: ``x < 1``, a negative value meaning "use another beta" (DeVA_Sinf's ``shampoo_beta``).

    NaN and infinities are refused by every numeric kind. Static switches (Python values, never traced):

    * ``BOOL``: ``True`` or ``False``; ``CHOICE``: one of ``Hyper.choices`` (same type and value);
    * ``INT_POS``: an integer ``>= 1``;
    * ``DTYPE``: None, a floating dtype of any framework (``numpy.float32``, ``torch.bfloat16``, ``jnp.bfloat16``)
      or its name (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``);
    * ``ANY``: checked by the spec's own ``check``.
    """

    LR = "lr"
    BETA = "beta"
    BETA_OPEN = "beta_open"
    BETA_OR_NEGATIVE = "beta_or_negative"
    NONNEG = "nonneg"
    POSITIVE = "positive"
    BOOL = "bool"
    CHOICE = "choice"
    INT_POS = "int_pos"
    DTYPE = "dtype"
    ANY = "any"

    def __str__(self) -> str:
        return self.value


#: The static kinds: Python values that shape the computation.
STATIC_KINDS = frozenset({HyperKind.BOOL, HyperKind.CHOICE, HyperKind.INT_POS, HyperKind.DTYPE, HyperKind.ANY})

#: The floating dtypes a ``DTYPE`` hyperparameter may name.
FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(value: Any) -> str | None:
    """The name of a floating dtype given as a dtype object of any framework or a string, else None.

    ``numpy.float32`` / ``np.dtype("float32")`` / ``torch.float32`` / ``jnp.float32`` / ``"float32"`` all give
    ``"float32"``; anything that names no floating dtype of :data:`FLOAT_DTYPE_NAMES` gives None.
    """
    if isinstance(value, str):
        name = value
    elif isinstance(value, type):
        name = value.__name__
    else:
        attr = getattr(value, "name", None)
        name = attr if isinstance(attr, str) else str(value).rsplit(".", 1)[-1]
    return name if name in FLOAT_DTYPE_NAMES else None


@dataclasses.dataclass(frozen=True)
class Hyper:
    """One hyperparameter of an optimizer.

    Attributes:
        name: the argument name (the same in every adapter; torch's ``betas`` tuple maps to
            ``beta1``/``beta2``).
        default: the default value.
        kind: the validation rule, a :class:`HyperKind` (its string value is accepted and converted; a
            misspelled kind raises ``ValueError`` when the spec is built).
        doc: one line for docstrings and the README.
        choices: the allowed values for ``HyperKind.CHOICE``.
    """

    name: str
    default: Any
    kind: HyperKind
    doc: str = ""
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        try:
            kind = HyperKind(self.kind)
        except ValueError:
            raise ValueError(
                f"Hyper {self.name!r}: kind={self.kind!r} is invalid: expected one of {[k.value for k in HyperKind]}"
            ) from None
        object.__setattr__(self, "kind", kind)
        if kind is HyperKind.CHOICE and not self.choices:
            raise ValueError(f"Hyper {self.name!r}: kind='choice' needs the allowed values in choices=")

    @property
    def static(self) -> bool:
        """Static switches shape the computation (Python values, never traced)."""
        return self.kind in STATIC_KINDS

    def allowed(self) -> str:
        """What the kind allows, in words (the end of every error message)."""
        k = self.kind
        return {
            HyperKind.LR: "a real number >= 0",
            HyperKind.NONNEG: "a real number >= 0",
            HyperKind.POSITIVE: "a real number > 0",
            HyperKind.BETA: f"a real number with 0 <= {self.name} < 1",
            HyperKind.BETA_OPEN: f"a real number with 0 < {self.name} < 1",
            HyperKind.BETA_OR_NEGATIVE: f"a real number with 0 <= {self.name} < 1, or a negative number",
            HyperKind.BOOL: "True or False",
            HyperKind.CHOICE: f"one of {self.choices}",
            HyperKind.INT_POS: "an integer >= 1",
            HyperKind.DTYPE: f"None or a floating dtype ({', '.join(FLOAT_DTYPE_NAMES)}) of the arrays' framework",
            HyperKind.ANY: "see the optimizer's documentation",
        }[k]

    def check(self, value: Any, optimizer: str) -> None:
        """Raise ``ValueError`` naming the optimizer, the argument, the value and what is allowed.

        Numeric kinds take a real number or a 0-D / 1-element real array of any framework (as ``torch.optim``
        takes a tensor ``lr``); a traced value (under ``jax.jit``) passes and is checked when concrete.
        """
        where = f"{optimizer}: {self.name}={value!r} is invalid"
        k = self.kind
        if k is HyperKind.ANY:
            return
        if k is HyperKind.BOOL:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: expected {self.allowed()}")
            return
        if k is HyperKind.CHOICE:
            if not any(type(value) is type(c) and value == c for c in self.choices):
                raise ValueError(f"{where}: expected {self.allowed()}")
            return
        if k is HyperKind.INT_POS:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: expected {self.allowed()}")
            return
        if k is HyperKind.DTYPE:
            if value is not None and dtype_name(value) is None:
                raise ValueError(f"{where}: expected {self.allowed()}")
            return
        try:
            x = real_scalar(value)
        except TypeError as exc:
            raise ValueError(f"{where}: got {exc}; expected {self.allowed()}") from None
        if x is None:
            return  # a traced value (optax.inject_hyperparams under jax.jit): see docs/reliability.md
        if math.isnan(x):
            raise ValueError(f"{where}: NaN is not allowed; expected {self.allowed()}")
        if math.isinf(x):
            raise ValueError(f"{where}: expected a finite number, {self.allowed()}")
        ok = {
            HyperKind.LR: x >= 0,
            HyperKind.NONNEG: x >= 0,
            HyperKind.POSITIVE: x > 0,
            HyperKind.BETA: 0 <= x < 1,
            HyperKind.BETA_OPEN: 0 < x < 1,
            HyperKind.BETA_OR_NEGATIVE: x < 1,
        }[k]
        if not ok:
            raise ValueError(f"{where}: expected {self.allowed()}")

    def is_valid(self, value: Any) -> Any:
        """The numeric kind's rule as an array expression (comparisons only), for a traced ``value``.

        False for NaN, infinities and values out of range; see :meth:`_HyperparamsMixin.traced_guard`.
        """
        finite = abs(value) < math.inf
        k = self.kind
        if k in (HyperKind.LR, HyperKind.NONNEG):
            return finite & (value >= 0)
        if k is HyperKind.POSITIVE:
            return finite & (value > 0)
        if k is HyperKind.BETA:
            return (value >= 0) & (value < 1)
        if k is HyperKind.BETA_OPEN:
            return (value > 0) & (value < 1)
        if k is HyperKind.BETA_OR_NEGATIVE:
            return finite & (value < 1)
        raise ValueError(f"Hyper {self.name!r}: kind {k} is not numeric")


def concrete(value: Any) -> float | None:
    """A validated numeric hyperparameter as a Python float, or None while it is traced.

    For cross-field checks (``check(hp)`` of a spec), which run after every ``Hyper.check`` passed: a traced
    value skips the rule until it is concrete. The one helper for this; see :func:`_backend.real_scalar`.
    """
    try:
        return real_scalar(value)
    except TypeError:
        return None


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

    def traced_validity(self, hp: Mapping[str, Any]) -> tuple[Any, tuple[str, ...]]:
        """The validity of the *traced* hyperparameters in ``hp``, as one boolean array expression.

        Values that are concrete were checked by :meth:`validate`; a traced one (``optax.inject_hyperparams``
        under ``jax.jit``) can only be checked inside the graph. Cross-field rules (``check``) are not re-checked.

        Args:
            hp: the hyperparameters, some of them traced 0-D (or 1-element) arrays.

        Returns:
            ``(ok, names)``: ``ok`` is True where every traced value is valid (None when nothing is traced),
            ``names`` the traced hyperparameters.
        """
        ok, names = None, []
        for h in self.hyperparams:
            if h.static or h.name not in hp or hp[h.name] is None or callable(hp[h.name]):
                continue
            value = hp[h.name]
            try:
                if real_scalar(value) is not None:
                    continue  # concrete: validated already
            except TypeError:
                continue
            cond = h.is_valid(value)
            ok = cond if ok is None else ok & cond
            names.append(h.name)
        return ok, tuple(names)

    def traced_guard(self, xp: Any, hp: Mapping[str, Any]) -> Any:
        """A factor that is 1 when every traced hyperparameter is valid and NaN otherwise (see
        :meth:`traced_validity`): multiplying the update by it turns an invalid traced value (``lr = -1``,
        ``beta1 = 1.5``, NaN) into a NaN update, which never passes unnoticed.

        Returns:
            The factor (a 0-D array), or None when no value is traced.
        """
        ok, _ = self.traced_validity(hp)
        return None if ok is None else xp.where(ok, 1.0, math.nan)


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
        arguments: the rule's parameter name for an extra input or state buffer whose name differs
            (``{"exp_avg": "m", "exp_avg_sq": "v"}``: papers' symbols in the rule, framework names in
            checkpoints). Names not listed are passed to the parameter of the same name.

    Raises:
        TypeError, ValueError: at construction, when the rule's parameters do not match ``extras``,
            ``state``, ``arguments`` and the values ``scalars`` returns (:func:`bind_rule`).
    """

    name: str
    title: str
    hyperparams: tuple[Hyper, ...]
    state: tuple[str, ...]
    scalars: Callable[..., tuple | Mapping[str, Any]]
    direction: Callable[..., tuple]
    weight_decay: str = "decoupled"
    extras: tuple[str, ...] = ()
    conventions: str = ""
    source: str = ""
    check: Callable[[dict], None] | None = None
    fusable: Callable[[dict], bool] | bool = True
    kind: str = "elementwise"
    #: The verifier's settings and bounds (``core.verification.Verification``; ``None``: the documented defaults).
    verification: Any = None
    arguments: Mapping[str, str] | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        bind_rule(self)  # refuse a spec whose names do not match its rule (cached for the kernels)

    @property
    def binding(self) -> RuleBinding:
        """How the kernels call ``direction`` (see :func:`bind_rule`)."""
        return bind_rule(self)

    def rule_scalars(self, hp: Mapping[str, Any], t: Any, ops: Any = HOST) -> tuple:
        """``scalars(hp, t, ops)`` as a tuple in the order of ``binding.scalars`` (a mapping is ordered by name)."""
        raw = self.scalars(hp, t, ops)
        if isinstance(raw, Mapping):
            return tuple(raw[n] for n in self.binding.scalars)
        return tuple(raw)

    def static(self, hp: Mapping[str, Any]) -> dict:
        """The static switches ``direction`` takes as keyword arguments (others only shape scalars)."""
        accepted = _keyword_only(self.direction)
        return {h.name: hp[h.name] for h in self.hyperparams if h.static and h.name in accepted}

    def is_fusable(self, hp: Mapping[str, Any]) -> bool:
        return self.fusable(dict(hp)) if callable(self.fusable) else bool(self.fusable)


@dataclasses.dataclass(frozen=True)
class RuleBinding:
    """How the step and direction kernels call an elementwise rule, derived from its signature.

    Attributes:
        inputs: the rule's parameter for each of ``(*spec.extras, *spec.state)``, in that order.
        scalars: the rule's parameters that receive ``spec.scalars(...)``, in the order it returns them
            (the rule's own order).
        outputs: for each buffer of ``spec.state``, the position of its new value among the state values
            the rule returns after ``d`` (the rule returns them in the order of its state parameters).
    """

    inputs: tuple[str, ...]
    scalars: tuple[str, ...]
    outputs: tuple[int, ...]


_BINDINGS: dict[int, tuple[Any, RuleBinding]] = {}


def bind_rule(spec: ElementwiseSpec) -> RuleBinding:
    """Match an elementwise rule's parameters to the spec's names, by name; refuse a mismatch.

    The rule is ``direction(xp, g, ..., *, <static switches>)``. Every extra input and state buffer of the spec is
    passed to the parameter of the same name (or ``spec.arguments[name]``); the remaining positional parameters
    receive the values of ``spec.scalars(hp, t, ops)``: by name when it returns a mapping, in the rule's order
    when it returns a tuple. The rule returns ``(d, *new_state)`` in the order of its own state parameters.

    Args:
        spec: the elementwise spec.

    Returns:
        The binding (cached per spec).

    Raises:
        TypeError: the rule is not a function of named parameters, or a keyword-only parameter is neither a
            static hyperparameter nor defaulted.
        ValueError: a name in ``extras`` / ``state`` / ``arguments`` that the rule does not take, two names
            bound to one parameter, or a number or names of scalars that do not match the rule's remaining
            parameters. The message names the spec, the names and the rule's signature.
    """
    cached = _BINDINGS.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    title = getattr(spec, "title", "?")
    fn = spec.direction
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise TypeError(f"{title}: direction={fn!r} is invalid: expected a Python function with named parameters") from None
    P = inspect.Parameter
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind is P.POSITIONAL_OR_KEYWORD]
    first_kw = next((i for i, p in enumerate(params) if p.kind is P.KEYWORD_ONLY), -1)
    rule = f"{getattr(fn, '__name__', 'direction')}({', '.join(('*, ' if p.kind is P.KEYWORD_ONLY and i == first_kw else '') + p.name for i, p in enumerate(params))})"
    bad = [p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    if bad or len(positional) < 2:
        raise TypeError(
            f"{title}: the rule {rule} is invalid: expected direction(xp, g, <named inputs>, *, <static switches>), "
            "with no positional-only, *args or **kwargs parameters (the arguments are passed by name)"
        )
    static_names = {h.name for h in spec.hyperparams if h.static}
    for p in params:
        if p.kind is P.KEYWORD_ONLY and p.name not in static_names and p.default is P.empty:
            raise TypeError(
                f"{title}: the rule's keyword-only parameter {p.name!r} is neither a static hyperparameter "
                f"(one of {sorted(static_names)}) nor defaulted; rule: {rule}"
            )
    named = positional[2:]
    arguments = dict(spec.arguments or {})
    declared = (*spec.extras, *spec.state)
    unknown = sorted(set(arguments) - set(declared))
    if unknown:
        raise ValueError(f"{title}: arguments names {unknown}, which are not extras or state of the spec: expected keys among {list(declared)}")
    inputs = tuple(arguments.get(n, n) for n in declared)
    missing = [(n, a) for n, a in zip(declared, inputs) if a not in named]
    if missing:
        what = ", ".join(f"{n!r}" + (f" (as {a!r})" if a != n else "") for n, a in missing)
        raise ValueError(
            f"{title}: the rule {rule} has no parameter for {what}: name the rule's parameter after the spec's "
            f"extras {list(spec.extras)} and state {list(spec.state)}, or map it with arguments={{name: parameter}}"
        )
    if len(set(inputs)) != len(inputs):
        raise ValueError(f"{title}: two of the spec's extras/state {list(declared)} are bound to one rule parameter ({list(inputs)})")
    scalar_params = tuple(n for n in named if n not in inputs)
    hp = {h.name: h.default for h in spec.hyperparams}
    try:
        sample = spec.scalars(hp, 1, HOST)
    except Exception as exc:
        raise ValueError(f"{title}: scalars(defaults, t=1) raised {type(exc).__name__}: {exc}") from None
    if isinstance(sample, Mapping):
        if set(sample) != set(scalar_params):
            raise ValueError(
                f"{title}: scalars returns the names {sorted(sample)} but the rule {rule} takes the scalars "
                f"{list(scalar_params)} (its parameters after the extras and state)"
            )
    elif len(tuple(sample)) != len(scalar_params):
        raise ValueError(
            f"{title}: scalars returns {len(tuple(sample))} value(s) but the rule {rule} takes "
            f"{len(scalar_params)} scalar(s) {list(scalar_params)} (its parameters after the extras and state)"
        )
    state_params = [n for n in named if n in inputs[len(spec.extras):]]
    outputs = tuple(state_params.index(a) for a in inputs[len(spec.extras):])
    binding = RuleBinding(inputs=inputs, scalars=scalar_params, outputs=outputs)
    _BINDINGS[id(spec)] = (spec, binding)
    return binding


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
    return (lr, wd_term, *spec.rule_scalars(hp, t, ops))


def make_step_kernel(spec: ElementwiseSpec, xp: Any, static: Mapping[str, Any], maximize: bool = False) -> Callable:
    """Build the fusable full step ``kernel(p, g, *extras, *state, lr, wd_term, *scalars)``.

    The kernel returns ``(p_new, *new_state)``, the state in ``spec.state`` order. It is a named ``def``
    over positional arrays and scalars only, so ``jax.jit``, ``torch.compile`` and ``cupy.fuse`` can compile
    it to one kernel; inside, the rule is called by name (``spec.binding``).

    Args:
        spec: the optimizer.
        xp: the array namespace the kernel will run on.
        static: the static switches (``spec.static(hp)``).
        maximize: ascend instead of descend (the gradient is negated inside the kernel).

    Returns:
        The kernel.
    """
    call = _bound_call(spec, xp, static)
    n_in = len(spec.extras) + len(spec.state)
    coupled = spec.weight_decay == "coupled"

    def step_kernel(p: Any, g: Any, *args: Any) -> tuple:
        lr, wd_term = args[n_in], args[n_in + 1]
        if maximize:
            g = -g
        if coupled:
            g = g + wd_term * p
            out = call(g, args[:n_in], args[n_in + 2 :])
            return (p - lr * out[0], *out[1:])
        out = call(g, args[:n_in], args[n_in + 2 :])
        return (p * wd_term - lr * out[0], *out[1:])

    step_kernel.__name__ = f"{spec.name}_step_kernel"
    return step_kernel


def make_direction_kernel(spec: ElementwiseSpec, xp: Any, static: Mapping[str, Any]) -> Callable:
    """Build ``kernel(g, *extras, *state, *scalars) -> (d, *new_state)``: the rule without lr or decay.

    This is the optax ``scale_by_<rule>`` layer: the alias adds decay and the learning rate.
    """
    call = _bound_call(spec, xp, static)
    n_in = len(spec.extras) + len(spec.state)

    def direction_kernel(g: Any, *args: Any) -> tuple:
        return call(g, args[:n_in], args[n_in:])

    direction_kernel.__name__ = f"{spec.name}_direction_kernel"
    return direction_kernel


def _bound_call(spec: ElementwiseSpec, xp: Any, static: Mapping[str, Any]) -> Callable:
    """``call(g, inputs, scalars) -> (d, *new_state)``: the rule called by name, its new state in ``spec.state`` order."""
    direction = spec.direction
    binding = spec.binding
    inputs, scalar_names, outputs = binding.inputs, binding.scalars, binding.outputs
    static = dict(static)

    def call(g: Any, values: tuple, scalars: tuple) -> tuple:
        kwargs = dict(zip(inputs, values))
        kwargs.update(zip(scalar_names, scalars))
        out = direction(xp, g, **kwargs, **static)
        new_state = out[1:]
        return (out[0], *(new_state[i] for i in outputs))

    return call


# ----------------------------------------------------------------------------------------------
# Matrix specs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatrixSpec(_HyperparamsMixin):
    """Spec of a matrix optimizer (Muon, DeVA_Sinf): its hyperparameters and its behaviour.

    The rule acts on one matrix or a stack of same-shape matrices ``(..., n, m)`` (the adapters flatten conv
    weights and choose the fan layout). One step ``t >= 1`` is, for ``phase = phases[phase_of(hp, t, ops)]``::

        d, new_state = direction(xp, phase, g, state, hp, t, scale, ops)
        p_new = p if d is None else apply(xp, p, d, lr, weight_decay, scale)

    :meth:`step` does exactly this on the host; the optax adapter runs the same functions under ``jax.jit``
    (one ``lax.switch`` branch per phase, ``t`` a traced step counter, ``ops = jax.numpy``).

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
        state: the names of the state arrays, in checkpoint order.
        init: ``init(xp, like, hp) -> dict``: the state at ``t = 0`` for matrices shaped and typed like ``like``
            (the state dtype); every name of ``state`` is a key (``None`` for an array the rule does not keep).
        state_shapes: ``state_shapes(shape, hp) -> {name: shape or None}``: the state layout of one
            ``(n, m)`` matrix (what checkpoints are checked against).
        direction: ``direction(xp, phase, g, state, hp, t, scale, ops) -> (d, new_state)``: the rule; ``d`` is
            ``None`` in a phase that does not move the parameter. ``scale`` is the shape scale
            (:func:`xpoptim.core.functional.matrix_scale`). Hyperparameters that are arrays (traced) come in
            ``g``'s dtype (the adapter casts them); scalars the rule derives from a traced ``t`` it casts itself.
        apply: ``apply(xp, p, d, lr, weight_decay, scale) -> p_new``: the parameter update with its decay.
        decay: ``"before"`` (``p (1 - lr wd) - lr d``: optax chains ``add_decayed_weights`` then the learning
            rate) or ``"after"`` (``apply`` decays the stepped parameter; optax runs ``apply`` itself).
        direction_includes_scale: True when ``direction`` already multiplies by ``scale`` (otherwise ``apply``
            does, and the optax ``scale_by_<name>`` returns ``scale * d``).
        phases: the names of the step's phases (``("step",)``; DeVA_Sinf: seed, step, refresh).
        phase_of: ``phase_of(hp, t, ops) -> index`` into ``phases`` (a Python int on the host, an int array
            when ``t`` is traced). Default: always 0.
        still_phases: the phases in which the parameter does not move (no step, no decay).
        sharding: ``"elementwise"``: every state array has the parameter's shape and is updated elementwise,
            so it can be sharded like the parameter; only :attr:`matrix_stage` needs the whole matrix
            (``d = matrix_stage(xp, elementwise_stage(xp, g, state, hp)[0], hp)``, and ``apply`` is
            elementwise). ``"replicated"``: the state is per whole matrix (factors, eigenbases), kept whole on
            every device and the whole step runs on the gathered matrix.
        elementwise_stage: ``"elementwise"`` sharding: ``(xp, g, state, hp) -> (x, new_state)``, elementwise.
        matrix_stage: ``"elementwise"`` sharding: ``(xp, x, hp) -> d``, on the whole matrix.
    """

    name: str
    title: str
    hyperparams: tuple[Hyper, ...]
    fallback: str
    fallback_defaults: Mapping[str, Any]
    state: tuple[str, ...]
    init: Callable[..., dict]
    state_shapes: Callable[[tuple, Mapping[str, Any]], dict]
    direction: Callable[..., tuple]
    apply: Callable[..., Any]
    decay: str = "before"
    direction_includes_scale: bool = False
    phases: tuple[str, ...] = ("step",)
    phase_of: Callable[..., Any] | None = None
    still_phases: tuple[str, ...] = ()
    sharding: str = "replicated"
    elementwise_stage: Callable[..., tuple] | None = None
    matrix_stage: Callable[..., Any] | None = None
    conventions: str = ""
    source: str = ""
    check: Callable[[dict], None] | None = None
    kind: str = "matrix"
    #: The verifier's settings and bounds (``core.verification.Verification``; ``None``: the documented defaults).
    verification: Any = None

    def __post_init__(self) -> None:
        where = f"{self.title} (MatrixSpec)"
        for field in ("init", "state_shapes", "direction", "apply"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{where}: {field}={getattr(self, field)!r} is invalid: expected a function")
        if not self.state or not all(isinstance(n, str) for n in self.state):
            raise ValueError(f"{where}: state={self.state!r} is invalid: expected the names of the state arrays")
        if self.decay not in ("before", "after"):
            raise ValueError(f"{where}: decay={self.decay!r} is invalid: expected 'before' or 'after'")
        if not self.phases or len(set(self.phases)) != len(self.phases):
            raise ValueError(f"{where}: phases={self.phases!r} is invalid: expected distinct phase names")
        if len(self.phases) > 1 and not callable(self.phase_of):
            raise TypeError(f"{where}: phase_of is required with several phases {self.phases}")
        if set(self.still_phases) - set(self.phases):
            raise ValueError(f"{where}: still_phases={self.still_phases!r} names phases not in {self.phases}")
        if self.sharding not in ("elementwise", "replicated"):
            raise ValueError(f"{where}: sharding={self.sharding!r} is invalid: expected 'elementwise' or 'replicated'")
        if self.sharding == "elementwise" and not (callable(self.elementwise_stage) and callable(self.matrix_stage)):
            raise TypeError(f"{where}: sharding='elementwise' needs elementwise_stage and matrix_stage")
        shapes = self.state_shapes((3, 2), self.defaults)
        if set(shapes) != set(self.state):
            raise ValueError(f"{where}: state_shapes returns {sorted(shapes)}: expected the state names {sorted(self.state)}")

    def static(self, hp: Mapping[str, Any]) -> dict:
        return {h.name: hp[h.name] for h in self.hyperparams if h.static}

    def phase(self, hp: Mapping[str, Any], t: Any, ops: Any = HOST) -> Any:
        """The index into :attr:`phases` of step ``t`` (``t >= 1``)."""
        return 0 if self.phase_of is None else self.phase_of(hp, t, ops)

    def step(self, xp: Any, param: Any, grad: Any, state: Mapping[str, Any], hp: Mapping[str, Any], t: int, scale: float) -> tuple[Any, dict]:
        """Step ``t`` (a host int, ``t >= 1``) on a matrix or a stack; returns ``(new_param, new_state)``.

        Args:
            xp: array namespace.
            param: ``(..., n, m)`` parameter, in the state dtype.
            grad: its gradient (same shape and dtype).
            state: from :attr:`init` or the previous step (not modified).
            hp: validated hyperparameters.
            t: the step being taken.
            scale: the shape scale (``functional.matrix_scale``).

        Returns:
            ``(new_param, new_state)``; ``new_param`` is ``param`` itself in a still phase.
        """
        phase = self.phases[self.phase(hp, t, HOST)]
        d, new_state = self.direction(xp, phase, grad, dict(state), hp, t, scale, HOST)
        if d is None:
            return param, new_state
        return self.apply(xp, param, d, hp["lr"], hp["weight_decay"], scale), new_state

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
        from . import SPECS, get_spec  # noqa: PLC0415  (the registry's package imports this module)

        name = self.fallback if fallback is None else fallback
        try:
            spec = get_spec(name)
        except ValueError:
            spec = None
        if not isinstance(spec, ElementwiseSpec):
            raise ValueError(f"{self.title}: fallback={name!r} is invalid: expected an elementwise optimizer, one of {[n for n, s in SPECS.items() if isinstance(s, ElementwiseSpec)]}")
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
    return Hyper("lr", default, HyperKind.LR, "learning rate (a float; adapters also take schedules)")


def beta_hyper(name: str, default: float, doc: str) -> Hyper:
    return Hyper(name, default, HyperKind.BETA, doc)


def eps_hyper(default: float, doc: str = "numerical floor (see the conventions table)") -> Hyper:
    return Hyper("eps", default, HyperKind.NONNEG, doc)


def wd_hyper(default: float = 0.0, doc: str = "decoupled weight decay: p <- p (1 - lr wd) before the step") -> Hyper:
    return Hyper("weight_decay", default, HyperKind.NONNEG, doc)
