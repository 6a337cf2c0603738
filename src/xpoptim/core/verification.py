"""What the cross-backend verifier (``python -m xpoptim.matrix``) needs to know about a rule, kept with its spec.

Every spec carries a :class:`Verification` (its ``verification`` attribute; ``None`` means the documented
defaults below), so a rule added to the registry, from inside xpoptim or from a user's code, gets verifier
cells without any edit to the verifier:

* ``hp``: hyperparameters the verifier runs the rule at (over the spec's defaults). Default: none, the spec's
  defaults.
* ``variants``: extra rows, ``(label suffix, hyperparameters)``; the row is labelled ``name[suffix]``.
* ``float64`` / ``float32``: the bound on a cell's error (the largest deviation from the float64 NumPy run beyond
  what storing the parameter in the dtype can cause, relative to the distance that run travelled;
  ``xpoptim.matrix.trajectory_error``) and the reason it is what it is. Defaults:
  :data:`DEFAULT_FLOAT64` and :data:`DEFAULT_FLOAT32`.
* ``problems``: the verifier problems the rule runs on (``None``: all of them).
* ``trajectory_float32``: the bound of xpoptim's core trajectory tests in float32 (the core in float32 on every
  array backend against the rule's float64 reference, 30 steps of a noisy quadratic; the same error measure as the
  verifier's), with the largest error measured over 10 problem seeds and its reason. ``None``: ``float32``.
* ``train_lr``: a learning rate at which the rule trains the test suites' small real model (an MLP 64-32-10 with
  tanh on scikit-learn's digits, batches of 64 to 128) to well below its initial loss within a few dozen steps, in
  every adapter. ``None``: ``hp["lr"]``. Rules whose step scales with the gradient (SGD, SVAG, M-SVAG) need a larger
  one than the sign-like and normalised rules, whose every coordinate moves by about ``lr``.
* ``reference``: the rule's independent float64 reference, for a rule registered from outside xpoptim (the
  built-in rules' references live with xpoptim's tests). The test suites (``python -m pytest --xpoptim-rules
  my_rule.py``) compare the rule's trajectories on every backend and adapter against it; without one those
  comparisons are skipped with a message saying so. It is called
  ``reference(theta0, grad_fn, steps, hp, *, maximize=False, layout="out_in")`` with ``theta0`` a float64 NumPy
  array, ``grad_fn(theta, t)`` the gradient of step ``t >= 1`` (per-example gradients on axis 0 for a rule with
  ``extras``), ``hp`` every hyperparameter (the spec's defaults with the test's settings over them) and ``layout``
  the matrix layout (``"out_in"``/``"in_out"``; matrix rules only), and returns the trajectory
  ``theta_0 .. theta_T`` as one float64 array of shape ``(T + 1, *theta0.shape)``. Write it from the paper in
  plain NumPy, sharing no code with the rule: it is the evidence that the rule computes what the paper says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Bound", "Verification", "DEFAULT_FLOAT64", "DEFAULT_FLOAT32", "DEFAULT_VERIFICATION", "verification_of"]


@dataclasses.dataclass(frozen=True)
class Bound:
    """A bound on a verifier cell's error and why it is what it is."""

    bound: float
    reason: str


#: Default float64 bound: every backend runs the same IEEE-double operations.
DEFAULT_FLOAT64 = Bound(
    1e-12,
    "float64: every backend runs the same operations in IEEE double; differences are reassociation in BLAS and "
    "reductions and in-graph step scalars under jit (~1e-16 per op), carried through the loop.",
)

#: Default float32 bound: a smooth elementwise rule.
DEFAULT_FLOAT32 = Bound(
    1e-4,
    "float32, smooth elementwise rule: the parameter's own rounding (up to 3 eps/2 of its size per step) is the "
    "representation floor, counted apart; beyond it the moments and the step round (a few eps of a ~lr step); set "
    "3x below the error of a learning rate 0.1 % off (~1e-3).",
)


@dataclasses.dataclass(frozen=True)
class Verification:
    """The verifier's settings for one rule (see the module docstring for the defaults).

    Attributes:
        hp: hyperparameters of the verifier's default row.
        variants: extra rows ``(label suffix, hyperparameters)``.
        float64: the float64 bound.
        float32: the float32 bound.
        problems: problem names (``None``: every verifier problem).
        trajectory_float32: the float32 bound of the core trajectory tests (``None``: ``float32``).
        train_lr: the learning rate of the test suites' training runs (``None``: ``hp["lr"]``).
        reference: the rule's independent float64 reference (a user rule's; see the module docstring).
    """

    hp: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    variants: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    float64: Bound = DEFAULT_FLOAT64
    float32: Bound = DEFAULT_FLOAT32
    problems: tuple[str, ...] | None = None
    trajectory_float32: Bound | None = None
    train_lr: float | None = None
    reference: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)

    def bound(self, dtype: str) -> Bound:
        """The bound for ``"float64"`` or ``"float32"``."""
        if dtype == "float64":
            return self.float64
        if dtype == "float32":
            return self.float32
        raise ValueError(f"dtype={dtype!r} is invalid: expected 'float64' or 'float32'")


#: The settings of a spec without its own.
DEFAULT_VERIFICATION = Verification()


def verification_of(spec: Any) -> Verification:
    """``spec.verification``, or :data:`DEFAULT_VERIFICATION` when the spec has none."""
    v = getattr(spec, "verification", None)
    return DEFAULT_VERIFICATION if v is None else v


# Bounds several rules share (each spec names the one that applies to it).

#: float32, sign-based rules (M-SSD, DeVA_linf).
SIGN_FLOAT32 = Bound(
    1e-4,
    "float32, sign-based rules: sign() is exact away from 0 but a flip where the momentum crosses 0 moves an "
    "element by 2 lr; exact zeros stay exact (sign(0) = 0 everywhere) and the problems keep other momenta away from 0.",
)
