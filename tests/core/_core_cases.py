"""Trajectory cases shared by the core tests: small noisy problems, hyperparameter settings, and runners.

A case runs ``steps`` optimizer steps on a small problem whose gradient is ``h * (theta - theta_star)`` plus
pre-drawn Gaussian noise (per-example noise for the mini-batch rules), with one "dead" coordinate
(``h = 0``, no noise) in the elementwise problems so the 0/0 branches (M-SVAG's ``m = 0``, ...) are exercised
inside real trajectories. Matrix problems have no dead entries (rank-deficient Kronecker factors, dead rows and
non-square matrices are covered by ``test_core_deva_determinism.py``).

The error measure is ``max_t |Delta_core(t) - Delta_ref(t)|_inf / max_t |Delta_ref(t)|_inf`` with
``Delta(t) = theta_t - theta_0``: relative to how far the optimizer moved, so a small lr cannot hide an error
in the update behind the size of the parameter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from references.backends import to_numpy

import registry_cases

from xpoptim.core import functional as F
from xpoptim.core import get_spec, minibatch_variance

STEPS = 30
BATCH = 6  # per-example gradients for the mini-batch rules


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    name: str
    hp: dict
    shape: tuple = (3, 4)
    maximize: bool = False
    layout: str = "out_in"
    sigma: float = 0.5
    seed: int = 0

    @property
    def mb(self) -> bool:
        return bool(getattr(get_spec(self.name), "extras", ()))

    @property
    def matrix(self) -> bool:
        return get_spec(self.name).kind == "matrix"


def _c(name, tag="default", **kw):
    hp = kw.pop("hp", {})
    return Case(id=f"{name}-{tag}", name=name, hp=hp, **kw)


CASES: tuple[Case, ...] = (
    _c("adam", hp=dict(lr=0.02)),
    _c("adam", "l2-maximize", hp=dict(lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1), maximize=True),
    _c("adamw", hp=dict(lr=0.02)),
    _c("adamw", "wd-betas", hp=dict(lr=0.02, beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.3)),
    _c("adabelief", hp=dict(lr=0.01)),
    _c("adabelief", "wd-eps", hp=dict(lr=0.01, eps=1e-8, weight_decay=0.2, beta2=0.99)),
    _c("laprop", hp=dict(lr=0.02)),
    _c("laprop", "wd-maximize", hp=dict(lr=0.02, eps=1e-8, weight_decay=0.2, beta1=0.7), maximize=True),
    _c("mvngrad", hp=dict(lr=0.01)),
    _c("mvngrad", "m_prev", hp=dict(lr=0.01, residual="m_prev")),
    _c("mvngrad", "eps_s-wd", hp=dict(lr=0.01, eps_s=1e-3, weight_decay=0.1, beta2=0.99)),
    _c("mvngrad", "beta1_0-m_prev", hp=dict(lr=0.01, beta1=0.0, residual="m_prev")),
    _c("sgd", hp=dict(lr=0.05)),
    _c("sgd", "nesterov", hp=dict(lr=0.05, nesterov=True)),
    _c("sgd", "dampening-l2", hp=dict(lr=0.05, dampening=0.5, weight_decay=0.1)),
    _c("sgd", "no-momentum-maximize", hp=dict(lr=0.05, momentum=0.0), maximize=True),
    _c("sgd", "no-momentum-dampening", hp=dict(lr=0.05, momentum=0.0, dampening=0.5)),
    _c("mssd", hp=dict(lr=0.02)),
    _c("mssd", "wd", hp=dict(lr=0.02, weight_decay=0.2, mu=0.5)),
    _c("svag", hp=dict(lr=0.05)),
    _c("svag", "paper", hp=dict(lr=0.05, variance_unbiasing=False)),
    _c("msvag", hp=dict(lr=0.05)),
    _c("msvag", "paper", hp=dict(lr=0.05, variance_unbiasing=False)),
    _c("msvag", "wd-maximize", hp=dict(lr=0.05, weight_decay=0.2, mu=0.8), maximize=True),
    _c("adam_star", hp=dict(lr=0.02)),
    _c("adam_star", "erf", hp=dict(lr=0.02, adaptation="erf")),
    _c("adam_star", "erf-wd", hp=dict(lr=0.02, adaptation="erf", weight_decay=0.2, mu=0.7)),
    _c("msvag_mb", hp=dict(lr=0.01)),
    _c("msvag_mb", "wd-maximize", hp=dict(lr=0.01, weight_decay=0.2, mu=0.5), maximize=True),
    _c("adam_star_mb", hp=dict(lr=0.02)),
    _c("adam_star_mb", "erf", hp=dict(lr=0.02, adaptation="erf")),
    _c("deva_linf", hp=dict(lr=0.002)),
    _c("deva_linf", "nesterov", hp=dict(lr=0.002, nesterov=True, beta2=0.99)),
    _c("deva_linf", "gradient", hp=dict(lr=0.002, second_moment_of="gradient")),
    _c("deva_linf", "bias_correction", hp=dict(lr=0.02, bias_correction=True)),
    _c("deva_linf", "wd-maximize-all", hp=dict(lr=0.02, weight_decay=0.1, nesterov=True, bias_correction=True,
                                                 second_moment_of="gradient"), maximize=True),
    _c("deva_sinf", hp=dict(lr=0.01), shape=(4, 4)),
    _c("deva_sinf", "f3-stack", hp=dict(lr=0.01, precondition_frequency=3), shape=(2, 4, 4)),
    _c("deva_sinf", "no-nesterov-no-bc", hp=dict(lr=0.01, nesterov=False, correct_bias=False, precondition_frequency=4,
                                                 shampoo_beta=0.9), shape=(5, 5)),
    _c("deva_sinf", "normalize-wd-maximize", hp=dict(lr=0.01, normalize_grads=True, weight_decay=0.1,
                                                     precondition_frequency=5), shape=(4, 4), maximize=True),
    _c("deva_sinf", "one-sided", hp=dict(lr=0.01, max_precond_dim=4, precondition_frequency=3), shape=(6, 3)),
    _c("muon", hp=dict(lr=0.02), shape=(4, 6)),
    _c("muon", "tall-in_out", hp=dict(lr=0.02, shape_scale="match_rms_adamw"), shape=(6, 4), layout="in_out"),
    _c("muon", "plain-add-wd", hp=dict(lr=0.02, nesterov=False, ns_prenorm="frobenius_add", weight_decay=0.3),
       shape=(5, 3)),
    _c("muon", "schatten8-table-stack", hp=dict(lr=0.02, ns_prenorm="schatten8", ns_steps=3,
                                                ns_coefficients=((3.4445, -4.7750, 2.0315), (3.0, -3.2, 1.2),
                                                                 (1.5, -0.5, 0.0))),
       shape=(2, 3, 5), maximize=True),
)

def _registry_cases() -> tuple[Case, ...]:
    """Every registered rule at its registry settings and each of its variants (``registry_cases.rows``): the spec's
    ``verification.hp`` / ``variants``, so a rule registered with ``--xpoptim-rules`` gets trajectory cases (against
    the reference it registers) without an edit here. Matrix rules run on a square (4, 4) matrix, as the default
    DeVA_Sinf case: full-rank Kronecker factors (the rank-deficient ones are ``test_core_deva_determinism.py``'s)."""
    out = []
    for row_id, name, hp in registry_cases.rows():
        shape = (4, 4) if get_spec(name).kind == "matrix" else (3, 4)
        out.append(Case(id=f"registry-{row_id}", name=name, hp=dict(hp), shape=shape))
    return tuple(out)


#: The cases written for the shipped rules' references (each exercises a branch of the rule and its reference),
#: then the registry's rows for every registered rule.
REFERENCE_CASES = CASES
CASES = REFERENCE_CASES + _registry_cases()
CASE_IDS = tuple(c.id for c in CASES)
BY_ID = {c.id: c for c in CASES}


class Problem:
    """Noisy quadratic ``g = h (theta - theta_star) + noise_t`` (per-example noise for the mini-batch rules)."""

    def __init__(self, case: Case, steps: int = STEPS) -> None:
        rng = np.random.default_rng(1000 + case.seed)
        shape = case.shape
        self.h = rng.uniform(0.2, 3.0, size=shape)
        self.theta_star = rng.standard_normal(shape)
        self.theta0 = rng.standard_normal(shape)
        noise_shape = (steps, BATCH, *shape) if case.mb else (steps, *shape)
        self.noise = case.sigma * rng.standard_normal(noise_shape)
        if not case.matrix:  # one dead coordinate: zero gradient, zero noise, forever
            self.h.reshape(-1)[0] = 0.0
            self.noise.reshape(*self.noise.shape[: -len(shape)], -1)[..., 0] = 0.0
        self.mb = case.mb

    def grad(self, theta: np.ndarray, t: int) -> np.ndarray:
        mean = self.h * (theta - self.theta_star)
        return mean[None] + self.noise[t - 1] if self.mb else mean + self.noise[t - 1]


def run_core(case: Case, backend, dtype: str, steps: int = STEPS, problem: Problem | None = None) -> np.ndarray:
    """The core (through ``xpoptim.core.functional``) on ``backend`` in ``dtype``; trajectory as float64 NumPy."""
    problem = problem or Problem(case, steps)
    xp = backend.xp
    spec = get_spec(case.name)
    hp = spec.validate(**case.hp)
    p = backend.asarray(problem.theta0, dtype)
    state = F.init(spec, p, hp)
    traj = [to_numpy(p).astype(np.float64)]
    for t in range(1, steps + 1):
        g_np = problem.grad(to_numpy(p).astype(np.float64), t)
        extras = ()
        if case.mb:
            pe = backend.asarray(g_np, dtype)
            g = xp.mean(pe, axis=0)
            extras = (minibatch_variance(xp, pe, axis=0),)
        else:
            g = backend.asarray(g_np, dtype)
        p, state = F.step(spec, p, g, state, hp, t, extras=extras, maximize=case.maximize, layout=case.layout)
        traj.append(to_numpy(p).astype(np.float64))
    return np.stack(traj)


def run_ref(case: Case, steps: int = STEPS, **kw) -> np.ndarray:
    """The case's float64 reference trajectory (``registry_cases.reference``; skips a rule that has none).

    A float32 run compares with ``run_ref(case, rule_dtype="float32")``: the float32 rule computed in float64
    (DeVA_Sinf's cluster tolerance is float32's, see ``references.optimizers.run_reference``).
    """
    reference = registry_cases.reference(case.name)
    if reference is None:
        pytest.skip(registry_cases.NO_REFERENCE)
    problem = Problem(case, steps)
    return reference(problem.theta0, problem.grad, steps, case.hp, maximize=case.maximize, layout=case.layout, **kw)


def rel_error(traj: np.ndarray, ref: np.ndarray) -> float:
    """``max_t |Delta(t) - Delta_ref(t)|_inf / max_t |Delta_ref(t)|_inf`` (see module docstring)."""
    d, dr = traj - traj[0], ref - ref[0]
    scale = np.max(np.abs(dr))
    assert scale > 0, "the reference did not move: the case tests nothing"
    return float(np.max(np.abs(d - dr)) / scale)
