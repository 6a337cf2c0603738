"""xpoptim.core: every update rule, written once against the Python Array API.

Pure functions over arrays (no torch, jax or cupy import, ever) and one frozen spec per optimizer.
Adapters (``xpoptim.adapters``) own memory layout, state and framework conventions.

Registry: ``SPECS`` maps a name to its spec; ``get_spec(name)`` looks one up with a clear error, and
``register(spec)`` adds a rule defined outside the package, which every adapter then serves (see
``docs/extending.md``).
"""

from __future__ import annotations

import re

from . import adam_family, balles_hennig, deva, directions, factors, functional, moments, muon, mvngrad, spec, state
from ._backend import HOST, array_namespace, erf
from .adam_family import ADABELIEF, ADAM, ADAMW, LAPROP
from .balles_hennig import ADAM_STAR, ADAM_STAR_MB, MSSD, MSVAG, MSVAG_MB, SGD, SVAG
from .deva import DEVA_LINF, DEVA_SINF
from .directions import newton_schulz, shape_scale, sign
from .factors import adam_factor, erf_factor, kappa, svag_factor, unbiasing_weight
from .moments import bias_correction, ema, minibatch_variance, minibatch_variance_from_moments
from .muon import MUON
from .mvngrad import MVNGRAD
from .spec import (
    STATE_VERSION,
    ElementwiseSpec,
    Hyper,
    HyperKind,
    MatrixSpec,
    RuleBinding,
    beta_hyper,
    bind_rule,
    eps_hyper,
    lr_hyper,
    make_direction_kernel,
    make_step_kernel,
    step_scalars,
    wd_hyper,
)
from .state import check_state_entry, default_state_dtype, state_layout

#: Every optimizer, by registry name, in the order of the README's conventions table.
SPECS: dict[str, ElementwiseSpec | MatrixSpec] = {
    s.name: s
    for s in (
        ADAM,
        ADAMW,
        ADABELIEF,
        LAPROP,
        MVNGRAD,
        SGD,
        MSSD,
        SVAG,
        MSVAG,
        ADAM_STAR,
        MSVAG_MB,
        ADAM_STAR_MB,
        DEVA_LINF,
        DEVA_SINF,
        MUON,
    )
}

#: The registered elementwise rules' names (rebuilt by :func:`register`).
ELEMENTWISE = tuple(n for n, s in SPECS.items() if s.kind == "elementwise")
#: The registered matrix rules' names (rebuilt by :func:`register`).
MATRIX = tuple(n for n, s in SPECS.items() if s.kind == "matrix")

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TITLE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def register(spec: ElementwiseSpec | MatrixSpec, *, replace: bool = False) -> ElementwiseSpec | MatrixSpec:
    """Add an optimizer to the registry, so that every adapter serves it by name.

    After ``register(LION)``, ``xpoptim.adapters.torch.create("lion", params)``,
    ``xpoptim.adapters.optax.create("lion", learning_rate=...)``, ``xpoptim.adapters.numpy.create("lion", params)``
    (the compiled C loop and the op-by-op path) and the verifier know the rule; nothing in xpoptim is edited. The
    spec itself was checked when it was built (an elementwise rule's names against its function, a matrix rule's
    fields); this checks what the registry and the adapters rely on.

    Args:
        spec: an :class:`ElementwiseSpec` or :class:`MatrixSpec`. ``name`` is the registry key (lowercase, a Python
            identifier: the optax function's name), ``title`` the class name (an identifier); its hyperparameters
            include ``lr`` and ``weight_decay``.
        replace: allow replacing a registered spec of the same name (re-running a notebook cell); the built-in
            optimizers can never be replaced.

    Returns:
        ``spec`` (so ``LION = register(ElementwiseSpec(...))`` works).

    Raises:
        TypeError: ``spec`` is not a spec.
        ValueError: a name or title that is not an identifier or is taken (by another spec's name or title), no
            ``lr`` or ``weight_decay`` hyperparameter, a matrix rule whose fallback is not a registered
            elementwise rule.

    Example:
        See ``examples/lion.py`` and ``docs/extending.md``.
    """
    global ELEMENTWISE, MATRIX
    if not isinstance(spec, (ElementwiseSpec, MatrixSpec)):
        raise TypeError(f"spec={type(spec).__name__} is invalid: expected an ElementwiseSpec or a MatrixSpec")
    if not isinstance(spec.name, str) or not _NAME.fullmatch(spec.name):
        raise ValueError(f"spec.name={spec.name!r} is invalid: expected a lowercase identifier such as 'lion'")
    if not isinstance(spec.title, str) or not _TITLE.fullmatch(spec.title):
        raise ValueError(f"spec.title={spec.title!r} is invalid: expected an identifier such as 'Lion' (the class name)")
    names = {h.name for h in spec.hyperparams}
    missing = [n for n in ("lr", "weight_decay") if n not in names]
    if missing:
        raise ValueError(f"{spec.title}: the hyperparameters lack {missing}: every rule has lr and weight_decay (use lr_hyper, wd_hyper)")
    old = SPECS.get(spec.name)
    if old is not None and (not replace or spec.name in BUILTIN):
        why = "a built-in optimizer" if spec.name in BUILTIN else "registered (pass replace=True to replace it)"
        raise ValueError(f"spec.name={spec.name!r} is taken: {why}")
    for other in SPECS.values():
        if other.name != spec.name and (other.title in (spec.title, spec.name) or other.name == spec.title):
            raise ValueError(f"spec.title={spec.title!r} is taken by the optimizer {other.name!r}")
    if isinstance(spec, MatrixSpec):
        fb = SPECS.get(spec.fallback)
        if not isinstance(fb, ElementwiseSpec):
            raise ValueError(f"{spec.title}: fallback={spec.fallback!r} is invalid: expected a registered elementwise optimizer, one of {list(ELEMENTWISE)}")
        spec.resolve_fallback()  # fallback_defaults must be valid for it
    SPECS[spec.name] = spec
    ELEMENTWISE = tuple(n for n, s in SPECS.items() if s.kind == "elementwise")
    MATRIX = tuple(n for n, s in SPECS.items() if s.kind == "matrix")
    return spec


def unregister(name: str) -> None:
    """Remove a rule added with :func:`register` (the built-in optimizers stay).

    Raises:
        ValueError: ``name`` is a built-in optimizer or is not registered.
    """
    global ELEMENTWISE, MATRIX
    if name in BUILTIN:
        raise ValueError(f"name={name!r} is a built-in optimizer: it cannot be removed")
    if name not in SPECS:
        raise ValueError(f"name={name!r} is not registered")
    del SPECS[name]
    ELEMENTWISE = tuple(n for n, s in SPECS.items() if s.kind == "elementwise")
    MATRIX = tuple(n for n, s in SPECS.items() if s.kind == "matrix")


#: The names of the optimizers that ship with xpoptim (the ones :func:`register` cannot replace).
BUILTIN = frozenset(SPECS)


def builtin_specs() -> list[ElementwiseSpec | MatrixSpec]:
    """The specs of the optimizers that ship with xpoptim, in registry order (rules added with :func:`register`
    are left out): what generated code, generated tables and the per-class tests cover."""
    return [s for s in SPECS.values() if s.name in BUILTIN]


def get_spec(name: str) -> ElementwiseSpec | MatrixSpec:
    """Look up an optimizer spec by registry name (``"adamw"``) or title (``"AdamW"``)."""
    if not isinstance(name, str):
        raise TypeError(
            f"optimizer={type(name).__name__} is invalid: expected an optimizer name (a str, one of {sorted(SPECS)}); "
            "were the parameters and the name passed in swapped order?"
        )
    if name in SPECS:
        return SPECS[name]
    for s in SPECS.values():
        if s.title == name:
            return s
    raise ValueError(f"optimizer={name!r} is unknown: expected one of {sorted(SPECS)}")


__all__ = [
    "SPECS",
    "ELEMENTWISE",
    "MATRIX",
    "get_spec",
    "register",
    "unregister",
    "BUILTIN",
    "builtin_specs",
    "RuleBinding",
    "bind_rule",
    "lr_hyper",
    "beta_hyper",
    "eps_hyper",
    "wd_hyper",
    "default_state_dtype",
    "state_layout",
    "check_state_entry",
    "STATE_VERSION",
    "ElementwiseSpec",
    "MatrixSpec",
    "Hyper",
    "HyperKind",
    "make_step_kernel",
    "make_direction_kernel",
    "step_scalars",
    "HOST",
    "array_namespace",
    "erf",
    "ema",
    "bias_correction",
    "minibatch_variance",
    "minibatch_variance_from_moments",
    "kappa",
    "unbiasing_weight",
    "svag_factor",
    "adam_factor",
    "erf_factor",
    "sign",
    "newton_schulz",
    "shape_scale",
    "adam_family",
    "balles_hennig",
    "deva",
    "directions",
    "factors",
    "functional",
    "moments",
    "muon",
    "mvngrad",
    "spec",
    "state",
]
