"""What the generic test suites know about a rule, read from the registry (never from a table keyed by name).

Every suite that runs "each optimizer" takes its list, its settings and its float64 reference from here, so a rule
registered by a user file (``python -m pytest --xpoptim-rules examples/lion.py``, see ``tests/conftest.py``) is
tested by every suite without an edit to any of them:

* :func:`names`, :func:`matrix_names`, :func:`elementwise_names`, :func:`minibatch_names`: the registered rules
  (read when a test module is collected, after the user rule files were imported).
* :func:`settings`: the hyperparameters that exercise a rule (its spec's ``verification.hp``: non-zero weight decay,
  a learning rate that moves the parameters visibly, a short preconditioner period, ...), over its defaults.
* :func:`train_lr`: the learning rate of the training runs on a small real model (``verification.train_lr``).
* :func:`float32_bound`: the float32 bound of the core trajectory tests and its reason.
* :func:`rows`: those settings and every ``verification.variants`` row (the rule's switches: Nesterov, erf
  adaptation, ...), as ``(id, name, hp)``.
* :func:`reference`: the rule's independent float64 reference. The built-in rules' references are
  ``tests/references/optimizers.py`` (written from the papers, sharing no code with xpoptim); a user rule brings its
  own as ``Verification(reference=...)`` in its registration (see ``xpoptim.core.verification``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from references import REFERENCES, run_reference

from xpoptim.core import BUILTIN, SPECS, get_spec
from xpoptim.core.verification import verification_of

__all__ = [
    "names",
    "matrix_names",
    "elementwise_names",
    "minibatch_names",
    "user_names",
    "settings",
    "train_lr",
    "float32_bound",
    "rows",
    "reference",
    "NO_REFERENCE",
]

#: Why a rule without a float64 reference is skipped by the suites that compare against one.
NO_REFERENCE = (
    "the rule registers no independent float64 reference: pass Verification(reference=...) in its spec "
    "(see docs/extending.md) to have its trajectories checked"
)


def names() -> tuple[str, ...]:
    """Every registered rule, in registry order (the built-in ones first)."""
    return tuple(SPECS)


def matrix_names() -> tuple[str, ...]:
    """The registered matrix rules."""
    return tuple(n for n, s in SPECS.items() if s.kind == "matrix")


def elementwise_names() -> tuple[str, ...]:
    """The registered elementwise rules."""
    return tuple(n for n, s in SPECS.items() if s.kind == "elementwise")


def minibatch_names() -> tuple[str, ...]:
    """The rules that take a per-element extra input at each step (``grad_variance`` of M-SVAG-mb, ...)."""
    return tuple(n for n, s in SPECS.items() if getattr(s, "extras", ()))


def user_names() -> tuple[str, ...]:
    """The registered rules that do not ship with xpoptim."""
    return tuple(n for n in SPECS if n not in BUILTIN)


def settings(name: str, **over: Any) -> dict[str, Any]:
    """The hyperparameters a suite runs ``name`` at: the spec's ``verification.hp``, then ``over``."""
    return {**dict(verification_of(get_spec(name)).hp), **over}


def train_lr(name: str) -> float:
    """The learning rate of the training runs (the spec's ``verification.train_lr``, else its ``hp["lr"]``)."""
    v = verification_of(get_spec(name))
    return float(v.train_lr) if v.train_lr is not None else float(settings(name)["lr"])


def float32_bound(name: str) -> Any:
    """The float32 bound of the core trajectory tests: the spec's ``verification.trajectory_float32``, else its
    verifier bound ``verification.float32`` (a ``core.verification.Bound``: ``bound`` and ``reason``)."""
    v = verification_of(get_spec(name))
    return v.trajectory_float32 if v.trajectory_float32 is not None else v.float32


def rows(selected: tuple[str, ...] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``(id, name, hp)`` for each rule's settings and each of its ``verification.variants`` (id ``name[suffix]``)."""
    out = []
    for name in names() if selected is None else selected:
        v = verification_of(get_spec(name))
        out.append((name, name, dict(v.hp)))
        out.extend((f"{name}[{suffix}]", name, dict(hp)) for suffix, hp in v.variants)
    return out


def reference(name: str) -> Callable[..., np.ndarray] | None:
    """The float64 reference of ``name``, called ``ref(theta0, grad_fn, steps, hp, maximize=..., layout=...)``.

    ``hp`` holds the test's settings (over the rule's defaults); the result is the trajectory
    ``theta_0 .. theta_T`` of shape ``(T + 1, *theta0.shape)``. ``grad_fn(theta, t)`` gives the gradient of step ``t``
    (for a rule with extras, the per-example gradients on axis 0). ``None`` when the rule has none. The keywords
    ``sign_mode``, ``seed`` and ``rule_dtype`` are options of the built-in DeVA_Sinf reference; a user's reference
    does not receive them.
    """
    if name in REFERENCES:
        return lambda theta0, grad_fn, steps, hp, **kw: run_reference(name, theta0, grad_fn, steps, hp, **kw)
    spec = get_spec(name)
    user = getattr(verification_of(spec), "reference", None)
    if user is None:
        return None

    def run(theta0: np.ndarray, grad_fn: Callable, steps: int, hp: Mapping[str, Any], **kw: Any) -> np.ndarray:
        for option in ("sign_mode", "seed", "rule_dtype"):  # options of the built-in DeVA_Sinf reference only
            kw.pop(option, None)
        return np.asarray(user(np.array(theta0, dtype=np.float64), grad_fn, steps, spec.validate(**dict(hp)), **kw))

    return run
