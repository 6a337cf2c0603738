"""The cross-backend equivalence verifier: ``python -m xpoptim.matrix`` (console script ``xpoptim-matrix``).

It runs every optimizer on every array backend installed here (NumPy always; array-api-strict, torch
CPU/CUDA, JAX CPU/GPU, CuPy when usable), in float64 and float32, for ``--steps`` steps on fixed
problems (``xpoptim._problems``: closed-loop ones, a noisy quadratic, a small tanh MLP with hand-written
backprop and a matrix least-squares problem for the spectral rules; and gradients with the structure of real
models, replayed identically to every backend, ``structured`` and ``digits``; ``--problems`` selects a subset),
and compares each parameter trajectory with the
float64 NumPy run of the same core rule (``xpoptim.core.functional``) on the same inputs (for a
float32 candidate the reference starts from the float32-rounded initial point and data, so the check
measures the candidate's arithmetic, not the rounding of its inputs). It also drives the adapters
through their shared ``create`` interfaces (torch.optim, optax, the NumPy/CuPy array adapter) on the
same problems, so the numbers users get through a framework are checked, not only the core.

**The error of a cell.** For each problem and parameter, with ``R_t`` the reference trajectory
(``t = 0..N``) and ``A_t`` the candidate's,

    err = max_t max_i max(|A_t,i - R_t,i| - F_t,i, 0) / max_t max_i |R_t,i - R_0,i|,

the largest deviation relative to the distance the reference travelled (a per-element relative error
would be dominated by elements crossing zero; relative to the parameter's size it would hide bugs
when the optimizer moves little), counted beyond ``F``, the deviation that storing the parameter in the
candidate's dtype alone can cause (:func:`representation_floor`: at most 3 roundings of ``|p|`` per step, summed
over the steps; it matters for a parameter that moves little against its size, e.g. one moved only by weight
decay). A cell's error is the maximum over problems and parameters; it passes
when ``err <= tolerance(optimizer, dtype, steps)`` (:data:`TOLERANCES`, each bound with its reason;
measured at 20 steps, scaled by ``20/steps`` for shorter runs, see :func:`tolerance`).

On the closed-loop problems every candidate computes its own gradients on its own trajectory, so the check
covers the whole training loop, not one step; on the replayed ones every candidate gets the same gradients, so a
difference is the optimizer's alone.

Nothing checked is never a pass: a backend named in ``backends`` that cannot run here is an error, a run with no
cell does not pass (exit status 1), and the report lists the backends and adapter paths actually compared.
Each rule's settings and bounds come from its spec (``spec.verification``, ``xpoptim.core.verification``), with
documented defaults, so a rule added to ``xpoptim.core.SPECS`` gets cells without an edit here.

The verifier pins matmul precision (JAX ``default_matmul_precision="float32"``, torch TF32 off) and
enables JAX x64 while it runs, restoring the previous settings at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, _backends
from ._backends import Backend, to_numpy
from ._problems import DEFAULT_PROBLEMS, PROBLEMS, Problem, get_problem
from .core import SPECS, get_spec
from .core import functional as F
from .core.deva import cluster_precision
from .core.spec import ElementwiseSpec, MatrixSpec
from .core.verification import Bound, verification_of

__all__ = [
    "Config",
    "CONFIGS",
    "Tolerance",
    "TOLERANCES",
    "tolerance",
    "Trajectory",
    "run_core",
    "trajectory_error",
    "representation_floor",
    "ROUNDINGS_PER_STEP",
    "perturbed",
    "run",
    "Report",
    "main",
]

DTYPES = ("float64", "float32")


# ----------------------------------------------------------------------------------------------
# What is run: one configuration per optimizer (plus a few non-default switches)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One optimizer configuration of the matrix.

    Attributes:
        label: row label (the optimizer name, or ``name[variant]``).
        optimizer: registry name in ``xpoptim.core.SPECS``.
        hp: hyperparameters passed to the core and to every adapter's ``create``.
    """

    label: str
    optimizer: str
    hp: Mapping[str, Any]


# The rows come from the registry: each spec's ``verification`` (``xpoptim.core.verification``) gives the
# verifier's hyperparameters, its variants and its bounds, with documented defaults for a spec that has none (a
# rule registered from outside xpoptim gets cells with no edit here). Learning rates are chosen so every parameter
# travels a visible distance in 20 steps without the problem reaching its noise floor (where sign-based rules
# oscillate); weight decay is non-zero so the decay path is checked.


def all_configs() -> tuple[Config, ...]:
    """The matrix's rows for the specs registered now: every optimizer at its verifier settings, then the variants."""
    base = tuple(Config(name, name, dict(verification_of(spec).hp)) for name, spec in SPECS.items())
    variants = tuple(
        Config(f"{name}[{suffix}]", name, dict(hp)) for name, spec in SPECS.items() for suffix, hp in verification_of(spec).variants
    )
    return base + variants


#: The rows at import time (:func:`all_configs` sees rules registered later).
CONFIGS: tuple[Config, ...] = all_configs()


def select_configs(names: Iterable[str] | None, variants: bool = True) -> list[Config]:
    """Configurations for ``names`` (optimizer names or config labels; ``None``: all).

    Raises:
        ValueError: for a name that is neither an optimizer nor a configuration label.
    """
    rows = all_configs()
    if names is None:
        return [c for c in rows if variants or c.label == c.optimizer]
    out: list[Config] = []
    known = {c.label for c in rows}
    for name in names:
        if name in SPECS:
            out.extend(c for c in rows if c.optimizer == name and (variants or c.label == name) and c not in out)
        elif name in known:
            out.extend(c for c in rows if c.label == name and c not in out)
        else:
            raise ValueError(
                f"optimizers={name!r} is unknown: expected one of {sorted(SPECS)} or a configuration label {sorted(known - set(SPECS))}"
            )
    return out


# ----------------------------------------------------------------------------------------------
# Tolerance policy
# ----------------------------------------------------------------------------------------------


#: A bound on a cell's error and its reason (``xpoptim.core.verification.Bound``).
Tolerance = Bound


class _Tolerances(Mapping):
    """``{(optimizer, dtype): Tolerance}`` read from the registered specs' ``verification`` (always current)."""

    def __getitem__(self, key: tuple[str, str]) -> Tolerance:
        name, dtype = key
        if name not in SPECS or dtype not in DTYPES:
            raise KeyError(key)
        return verification_of(SPECS[name]).bound(dtype)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter([(n, d) for n in SPECS for d in DTYPES])

    def __len__(self) -> int:
        return len(SPECS) * len(DTYPES)


#: Per (optimizer, dtype): the bound and its reason, from each spec's ``verification`` (defaults:
#: ``core.verification.DEFAULT_FLOAT64`` / ``DEFAULT_FLOAT32``). Bounds sit at least 3x above the largest error
#: measured over every problem (closed-loop and replayed), backend and adapter (``python -m xpoptim.matrix
#: --measure``; other BLAS/GPU kernels round differently) and at least 3x below the error of a rule with a 0.1 %
#: learning-rate error (~1e-3), hence ~100x below an off-by-one bias correction (5e-2 to 2e-1): ``tests/matrix``
#: proves both perturbations fail.
TOLERANCES: Mapping[tuple[str, str], Tolerance] = _Tolerances()


#: The number of steps the bounds were measured at.
REFERENCE_STEPS = 20


def tolerance(optimizer: str, dtype: str, steps: int = REFERENCE_STEPS) -> Tolerance:
    """The bound for ``optimizer`` (registry name) in ``dtype`` (``"float64"``/``"float32"``) after ``steps`` steps.

    The bounds hold for :data:`REFERENCE_STEPS` steps. Shorter runs travel less while each step still
    rounds the parameter (``~eps |p|``), so the error relative to the distance travelled grows like
    ``1/steps``: below 20 steps the bound is multiplied by ``20 / steps``. Longer runs keep the 20-step
    bound (errors relative to a longer travel do not grow in these problems).
    """
    try:
        tol = TOLERANCES[(optimizer, dtype)]
    except KeyError:
        raise ValueError(f"no tolerance for optimizer={optimizer!r}, dtype={dtype!r}: expected dtype in {DTYPES}") from None
    if steps >= REFERENCE_STEPS:
        return tol
    return Tolerance(tol.bound * REFERENCE_STEPS / steps, tol.reason + f" Scaled by {REFERENCE_STEPS}/{steps} for a {steps}-step run.")


# ----------------------------------------------------------------------------------------------
# Running the core rule on one backend
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trajectory:
    """Parameters after each step (``params[0]`` is the initial point) as float64 NumPy arrays."""

    params: list[dict]
    losses: list[float]


def _route(spec: ElementwiseSpec | MatrixSpec, hp: Mapping[str, Any], param: Any) -> tuple:
    """(spec, validated hp) serving ``param``: matrix rules take ndim >= 2, the rest goes to the fallback."""
    if isinstance(spec, MatrixSpec) and param.ndim < 2:
        fb, base = spec.resolve_fallback()
        return fb, fb.validate(**{"lr": spec.validate(**dict(hp))["lr"], **base})  # the fallback's lr follows lr
    return spec, spec.validate(**dict(hp))


def run_core(
    spec: ElementwiseSpec | MatrixSpec,
    problem: Problem,
    backend: Backend,
    dtype: str,
    hp: Mapping[str, Any],
    steps: int,
) -> Trajectory:
    """Run ``spec`` through ``xpoptim.core.functional`` on ``backend`` for ``steps`` steps.

    Matrix specs serve parameters with ``ndim >= 2`` (layout ``out_in``); other parameters go to the
    spec's elementwise fallback with its ``fallback_defaults`` and the optimizer's ``lr``.

    Args:
        spec: the rule (may be a deliberately perturbed copy, see :func:`perturbed`).
        problem: the problem.
        backend: where to run.
        dtype: ``"float64"`` or ``"float32"``.
        hp: hyperparameters of ``spec``.
        steps: number of steps.

    Returns:
        The trajectory.
    """
    xp, dt, dev = backend.xp, backend.dtypes[dtype], backend.device
    params = problem.init(xp, dt, dev)
    routes = {k: _route(spec, hp, p) for k, p in params.items()}
    states = {k: F.init(routes[k][0], p, routes[k][1]) for k, p in params.items()}
    traj = Trajectory([{k: to_numpy(p) for k, p in params.items()}], [])
    for t in range(1, steps + 1):
        loss, grads, var = problem.gradients(xp, params, t, dt, dev)
        traj.losses.append(float(to_numpy(loss)))
        new = {}
        for k, p in params.items():
            s, h = routes[k]
            extras = (var[k],) if isinstance(s, ElementwiseSpec) and s.extras else ()
            new[k], states[k] = F.step(s, p, grads[k], states[k], h, t, extras=extras)
        params = new
        traj.params.append({k: to_numpy(p) for k, p in params.items()})
    return traj


def perturbed(spec: ElementwiseSpec | MatrixSpec, kind: str = "step") -> ElementwiseSpec | MatrixSpec:
    """A deliberately wrong copy of ``spec``, to prove that the verifier catches real bugs.

    Args:
        spec: the correct spec.
        kind: ``"step"``: the step-derived scalars (bias corrections, kappa, rho) use ``t + 1``
            instead of ``t`` (an off-by-one step count; elementwise specs only, no effect on rules
            without step-dependent scalars such as M-SSD); ``"lr"``: the learning rate is 0.1 % too
            large (any spec).

    Returns:
        The perturbed spec (same name, so the tolerance policy is the correct rule's).
    """
    if kind == "step":
        if not isinstance(spec, ElementwiseSpec):
            raise ValueError(f"perturbation kind='step' is invalid for the matrix rule {spec.name!r}: use kind='lr'")
        scalars = spec.scalars
        return dataclasses.replace(spec, scalars=lambda hp, t, ops=None, _s=scalars: _s(hp, t + 1, *(() if ops is None else (ops,))))
    if kind == "lr":
        validate = spec.validate

        class _LrOff(type(spec)):  # type: ignore[misc]  # a subclass of the spec's own class, known at run time
            def validate(self, **hp: Any) -> dict:  # noqa: D102
                out = validate(**hp)
                out["lr"] = out["lr"] * 1.001
                return out

        return _LrOff(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    raise ValueError(f"perturbation kind={kind!r} is invalid: expected 'step' or 'lr'")


# ----------------------------------------------------------------------------------------------
# Comparing trajectories
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ErrorReport:
    """The worst deviation of a candidate trajectory from the reference."""

    error: float  # beyond the representation floor, relative to the distance travelled (module docstring)
    abs_error: float  # |A - R| where ``error`` is largest
    problem: str = ""
    param: str = ""
    step: int = 0
    index: tuple = ()
    raw: float = 0.0  # the largest |A - R| / travel without the floor (for the report)

    def where(self) -> str:
        if not self.param or self.error == 0:
            return ""
        return f"{self.problem}/{self.param} step {self.step} index {list(self.index)}"


#: Roundings of a parameter-sized number in one step of the update ``p <- p (1 - lr wd) - lr d``: the decay factor
#: ``1 - lr wd`` stored in the parameter's dtype (a systematic relative error up to ``u``), the product
#: ``p (1 - lr wd)`` and the sum. Fused and op-by-op forms, torch's in-place ``mul_``/``add_`` and optax's
#: ``p + (-lr (d + wd p))`` round at most this many times at the size of ``|p|``.
ROUNDINGS_PER_STEP = 3


def representation_floor(ref: np.ndarray, dtype: str) -> np.ndarray:
    """What storing the parameter in ``dtype`` alone can make a trajectory deviate from ``ref``, per step and element.

    Derivation. Each step rounds at most :data:`ROUNDINGS_PER_STEP` numbers of the size of the parameter (round
    to nearest: an error of at most ``u |x|``, ``u = eps / 2``), and a rounding error of ``p`` persists: later steps
    move ``p`` by amounts that do not depend on it, except through the decay factor ``1 - lr wd ~ 1``. Both the
    candidate (unit round-off ``u_A``) and the float64 reference (``u_R``) round, so after ``t`` steps

        ``F_t,i = ROUNDINGS_PER_STEP (u_A + u_R) sum_{s=1..t} max(|R_s-1,i|, |R_s,i|)``,  ``F_0 = 0``.

    It matters where a parameter moves little against its size: a parameter moved only by weight decay travels
    ``lr wd |p|`` per step while float32 rounds it by up to ``3 u |p|``, ``3 eps / (2 lr wd)`` of its travel
    (``9e-3`` at ``lr = 2e-3``, ``wd = 1e-2``) on every backend; on a parameter that moves ``~lr`` per step it is
    ``~1e-5`` of the travel in float32.

    Args:
        ref: the reference trajectory of one parameter, ``(steps + 1, *shape)``.
        dtype: the candidate's dtype (``"float64"`` or ``"float32"``).

    Returns:
        ``F`` with the shape of ``ref``.
    """
    u = float(np.finfo(np.dtype(dtype)).eps) / 2 + float(np.finfo(np.float64).eps) / 2
    a = np.abs(ref)
    per_step = np.maximum(a[:-1], a[1:]) if len(ref) > 1 else a[:0]
    floor = np.zeros_like(a)
    floor[1:] = ROUNDINGS_PER_STEP * u * np.cumsum(per_step, axis=0)
    return floor


def trajectory_error(actual: Trajectory, desired: Trajectory, problem: str = "", dtype: str | None = None) -> ErrorReport:
    """The cell error of ``actual`` against the reference ``desired`` (see the module docstring).

    With ``dtype`` (the candidate's), the deviation is counted beyond the :func:`representation_floor` of that
    dtype; without it, in full. NaN or inf in ``actual`` gives an infinite error.
    """
    worst = ErrorReport(0.0, 0.0)
    for name in desired.params[0]:
        ref = np.stack([p[name] for p in desired.params])
        got = np.stack([p[name] for p in actual.params])
        if got.shape != ref.shape:
            raise ValueError(f"{problem}/{name}: trajectory shapes differ: {got.shape} vs reference {ref.shape}")
        travel = float(np.max(np.abs(ref - ref[0]))) if ref.size else 0.0
        if travel == 0.0:
            travel = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1.0)
        diff = np.abs(got - ref)
        diff = np.where(np.isfinite(got), diff, np.inf)
        excess = diff if dtype is None else np.maximum(diff - representation_floor(ref, dtype), 0.0)
        flat = int(np.argmax(excess))
        idx = np.unravel_index(flat, excess.shape)
        abs_err = float(diff[idx])
        err = float(excess[idx]) / travel
        raw = max(worst.raw, float(np.max(diff)) / travel if diff.size else 0.0)
        if err > worst.error or (err == worst.error and not worst.param):
            worst = ErrorReport(err, abs_err, problem, name, int(idx[0]), tuple(int(i) for i in idx[1:]), raw)
        else:
            worst.raw = raw
    return worst


# ----------------------------------------------------------------------------------------------
# Candidates: the core on each backend, and the adapters
# ----------------------------------------------------------------------------------------------


class NotAvailable(Exception):
    """A candidate that cannot run in this environment (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A way of running an optimizer: ``path`` (``core``, ``torch.optim``, ``optax``, ``array``) on a backend."""

    path: str
    backend: str
    runner: Callable[[Config, Problem, str, int], Trajectory] | None
    dtypes: tuple[str, ...] = DTYPES
    #: ``joint_runner(config, problems, dtype, steps) -> {problem name: Trajectory}``: runs all problems
    #: in one optimizer (one pytree), used where per-problem set-up is expensive (optax's jit).
    joint_runner: Callable[[Config, list, str, int], dict] | None = None

    def run_all(self, config: Config, problems: list, dtype: str, steps: int) -> dict:
        """Trajectories for every problem, by name."""
        if self.joint_runner is not None:
            return self.joint_runner(config, problems, dtype, steps)
        runner = self.runner
        if runner is None:
            raise ValueError(f"candidate {self.path}/{self.backend}: has neither runner nor joint_runner")
        return {p.name: runner(config, p, dtype, steps) for p in problems}


def _core_candidate(backend: Backend, override: Mapping[str, Any]) -> Candidate:
    def runner(config: Config, problem: Problem, dtype: str, steps: int) -> Trajectory:
        spec = override.get(config.optimizer) or get_spec(config.optimizer)
        return run_core(spec, problem, backend, dtype, config.hp, steps)

    return Candidate("core", backend.name, runner)


def _candidates(backends: list[Backend], override: Mapping[str, Any], adapters: bool, torch_compile: bool = False) -> tuple[list[Candidate], dict]:
    out = [_core_candidate(b, override) for b in backends]
    unavailable: dict[str, str] = {}
    if adapters:
        from . import _adapter_runs

        cands, missing = _adapter_runs.candidates(backends, torch_compile=torch_compile)
        out.extend(cands)
        unavailable.update(missing)
    return out, unavailable


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """The verifier's result: one cell per (configuration, path, backend, dtype)."""

    cells: list[dict]
    meta: dict
    unavailable: dict

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.cells if c["status"] in ("FAIL", "ERROR")]

    @property
    def not_run(self) -> int:
        """Cells of the selection left unchecked because the run reached its time limit (``run(time_limit=...)``)."""
        return int(self.meta.get("not_run", {}).get("cells", 0))

    @property
    def ok(self) -> bool:
        """Every cell passes, there is at least one (a run that checked nothing does not pass), and none of the
        selection was left unchecked at a time limit."""
        return bool(self.cells) and not self.failed and not self.not_run

    @property
    def compared(self) -> dict:
        """What the cells actually compared: ``{"backends": [...], "paths": {path: [backends]}}``."""
        paths: dict[str, list[str]] = {}
        for c in self.cells:
            if c["status"] in ("pass", "FAIL", "ERROR") and c["backend"] not in paths.setdefault(c["path"], []):
                paths[c["path"]].append(c["backend"])
        backends = sorted({b for bs in paths.values() for b in bs}, key=lambda b: _backends.BACKEND_NAMES.index(b) if b in _backends.BACKEND_NAMES else 99)
        return {"backends": backends, "paths": paths}

    def to_json(self) -> dict:
        used = sorted({(c["optimizer"], c["dtype"]) for c in self.cells})
        steps = self.meta.get("steps", REFERENCE_STEPS)
        return {
            "meta": self.meta,
            "cells": self.cells,
            "unavailable": self.unavailable,
            "tolerances": [
                {"optimizer": o, "dtype": d, "bound": tolerance(o, d, steps).bound, "reason": tolerance(o, d, steps).reason}
                for o, d in used
            ],
            "compared": self.compared,
            "summary": {
                "cells": len(self.cells),
                "passed": sum(c["status"] == "pass" for c in self.cells),
                "failed": len(self.failed),
                "not_run": self.not_run,
                "ok": self.ok,
            },
        }


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="xpoptim.matrix", unit="cell", file=sys.stderr, leave=False)
    except ImportError:
        return _SimpleBar(total)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


class _SimpleBar:
    """A minimal text progress bar on stderr (used when tqdm is not installed)."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.text, self.t0 = total, 0, "", time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        done = int(30 * self.n / max(self.total, 1))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} {time.perf_counter() - self.t0:5.1f}s {self.text[:40]:<40}")
        sys.stderr.flush()

    def set_postfix_str(self, s: str) -> None:
        self.text = s

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def run(
    optimizers: Iterable[str] | None = None,
    backends: Iterable[str] | str | None = None,
    dtypes: Sequence[str] = DTYPES,
    steps: int = 20,
    problems: Sequence[str] | None = None,
    *,
    adapters: bool = True,
    variants: bool = True,
    override: Mapping[str, ElementwiseSpec | MatrixSpec] | None = None,
    progress: bool = False,
    configs: Sequence[Config] | None = None,
    torch_compile: bool = False,
    time_limit: float | None = None,
) -> Report:
    """Run the equivalence matrix and return its report.

    Args:
        optimizers: optimizer names or configuration labels (default: every configuration).
        backends: backend names or aliases (``"numpy,torch"``; default: ``$XPOPTIM_BACKENDS`` or all).
        dtypes: subset of ``("float64", "float32")``.
        steps: steps per trajectory (>= 1).
        problems: subset of ``PROBLEMS`` (default: ``DEFAULT_PROBLEMS``, all of them; ``digits`` only where
            scikit-learn is installed).
        adapters: also check the torch / optax / array adapters.
        variants: include the non-default configurations when ``optimizers`` names an optimizer.
        override: registry name -> spec used by the *core candidates* instead of the real one (the
            reference always uses the real spec); how the tests prove a wrong rule fails.
        progress: show a progress bar on stderr.
        configs: explicit configurations (instead of ``optimizers``), e.g. your own hyperparameters.
        torch_compile: also run the torch adapter with ``compile=True`` (slow: one compile per rule).
        time_limit: seconds after which no further cell starts (``None``: no limit). The cells checked so far
            are reported; the rest are counted in ``Report.not_run`` and listed by configuration in the report,
            and the run does not pass (:attr:`Report.ok`).

    Returns:
        The :class:`Report`.

    Raises:
        ValueError: for an unknown optimizer, backend, dtype or problem, ``steps < 1`` or a ``time_limit`` that
            is not a positive number of seconds.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
    if time_limit is not None and (
        isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0 or math.isinf(time_limit)
    ):
        raise ValueError(f"time_limit={time_limit!r} is invalid: expected a finite number of seconds > 0, or None for no limit")
    dtypes = tuple(dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"dtypes={list(dtypes)!r} is invalid: expected a non-empty subset of {list(DTYPES)}")
    probs, skipped = _build_problems(problems)
    if configs is None:
        configs = select_configs(list(optimizers) if optimizers is not None else None, variants=variants)
    else:
        configs = list(configs)
        for c in configs:
            get_spec(c.optimizer).validate(**dict(c.hp))
    if backends is None:
        found, unavailable = _backends.discover(None)
    else:  # named explicitly: each name must be usable here
        found, unavailable = _backends.discover_required(backends if isinstance(backends, str) else ",".join(backends))
    unavailable.update(skipped)
    numpy_backend = _backends.discover(["numpy"])[0][0]
    t0 = time.perf_counter()
    stop_at = math.inf if time_limit is None else t0 + time_limit
    cells: list[dict] = []
    not_run: list[str] = []  # configurations with at least one cell left unchecked at the time limit
    with _backends.pinned_numerics():
        cands, missing = _candidates(found, override or {}, adapters, torch_compile)
        unavailable.update(missing)
        total = sum(len([d for d in dtypes if d in c.dtypes]) for c in cands) * len(configs)
        bar = _progress(total, progress)
        try:
            for config in configs:
                if time.perf_counter() >= stop_at:
                    not_run.append(config.label)
                    continue
                ref_spec = get_spec(config.optimizer)
                wanted = verification_of(ref_spec).problems
                cprobs = [p for p in probs if wanted is None or p.name in wanted]
                refs = {(p.name, d): _reference(ref_spec, p, d, numpy_backend, config.hp, steps) for p in cprobs for d in dtypes}
                for cand in cands:
                    for dtype in dtypes:
                        if dtype not in cand.dtypes:
                            continue
                        if time.perf_counter() >= stop_at:
                            if config.label not in not_run:
                                not_run.append(config.label)
                            continue
                        bar.set_postfix_str(f"{config.label} {cand.path}/{cand.backend} {dtype}")
                        cells.append(_cell(config, cand, dtype, cprobs, refs, steps))
                        bar.update(1)
        finally:
            bar.close()
    meta = _meta(steps, probs, [b.name for b in found], dtypes, time.perf_counter() - t0)
    meta["time_limit"] = time_limit
    if not_run:
        meta["not_run"] = {"cells": total - len(cells), "configs": not_run}
    return Report(cells, meta, unavailable)


def _build_problems(names: Sequence[str] | None) -> tuple[list[Problem], dict[str, str]]:
    """The problems to run, and those of the default set that cannot be built here (with the reason).

    A problem named explicitly that cannot be built (``digits`` without scikit-learn) is an error.
    """
    if names is not None:
        names = list(names)
        if not names:
            raise ValueError(f"problems=[] is invalid: expected a non-empty subset of {list(PROBLEMS)}")
        out = []
        for n in names:
            try:
                out.append(get_problem(n))
            except ImportError as exc:
                raise ValueError(f"problems={names!r}: {n!r} cannot be built here: {exc}") from None
        return out, {}
    out, skipped = [], {}
    for n in DEFAULT_PROBLEMS:
        try:
            out.append(get_problem(n))
        except ImportError as exc:
            skipped[f"problem {n}"] = str(exc)
    return out, skipped


def _reference(spec: Any, problem: Problem, dtype: str, numpy_backend: Backend, hp: Mapping[str, Any], steps: int) -> Trajectory:
    """The float64 NumPy run of ``spec`` on ``problem`` rounded to ``dtype``: the rule a ``dtype`` candidate computes.

    Rules whose definition depends on the working precision (DeVA_Sinf's eigenvalue clusters, ``tau =
    sqrt(n eps)``) are computed with ``dtype``'s ``eps`` (``core.deva.cluster_precision``), in float64 arithmetic.
    """
    with cluster_precision(float(np.finfo(dtype).eps)):
        return run_core(spec, problem.rounded(dtype), numpy_backend, "float64", hp, steps)


def _cell(config: Config, cand: Candidate, dtype: str, probs: list[Problem], refs: dict, steps: int) -> dict:
    tol = tolerance(config.optimizer, dtype, steps)
    cell = {
        "optimizer": config.optimizer,
        "config": config.label,
        "path": cand.path,
        "backend": cand.backend,
        "dtype": dtype,
        "tolerance": tol.bound,
    }
    t0 = time.perf_counter()
    worst = ErrorReport(0.0, 0.0)
    raw = 0.0
    per_problem: dict[str, dict] = {}
    try:
        trajs = cand.run_all(config, probs, dtype, steps)
        for p in probs:
            e = trajectory_error(trajs[p.name], refs[(p.name, dtype)], p.name, dtype)
            per_problem[p.name] = {"error": _finite_or_inf(e.error), "raw_error": _finite_or_inf(e.raw)}
            raw = max(raw, e.raw)
            if e.error > worst.error or not worst.param:
                worst = e
    except NotAvailable as exc:
        cell.update(status="n/a", error=None, abs_error=None, where="", message=str(exc))
        return cell
    except Exception as exc:  # a crash is a failing cell, with the reason
        cell.update(status="ERROR", error=None, abs_error=None, where="", message=f"{type(exc).__name__}: {exc}")
        return cell
    err = worst.error
    cell.update(
        status="pass" if err <= tol.bound else "FAIL",
        error=err if math.isfinite(err) else "inf",
        abs_error=worst.abs_error if math.isfinite(worst.abs_error) else "inf",
        raw_error=_finite_or_inf(raw),
        problems=per_problem,
        where=worst.where(),
        message="",
        seconds=round(time.perf_counter() - t0, 3),
    )
    return cell


def _finite_or_inf(x: float) -> float | str:
    """``x``, or ``"inf"`` (JSON has no infinity)."""
    return x if math.isfinite(x) else "inf"


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("array_api_compat", "array_api_strict", "torch", "jax", "optax", "cupy"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def _meta(steps: int, probs: list[Problem], backends: list[str], dtypes: Sequence[str], seconds: float) -> dict:
    from . import __version__

    return {
        "xpoptim": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.machine()}, {platform.system()})",
        "versions": _versions(),
        "steps": steps,
        "problems": {p.name: p.description for p in probs},
        "backends": backends,
        "dtypes": list(dtypes),
        "seconds": round(seconds, 1),
        "error": "max_t max_i max(|A - R| - F, 0) / max_t max_i |R_t - R_0| over problems and parameters; "
        "R = float64 NumPy run of the core rule on the same inputs (rounded to the candidate's dtype); "
        "F = 3 (u_dtype + u_float64) sum_s max(|R_s-1|, |R_s|), what storing the parameter in the candidate's dtype "
        "alone can change (3 roundings of |p| per step)",
        "numerics": "JAX x64 on, default_matmul_precision=float32; torch float32_matmul_precision=highest, TF32 off",
    }


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _fmt_err(x: Any) -> str:
    if x is None:
        return "-"
    if x == "inf":
        return "inf"
    return "0" if x == 0 else f"{x:.1e}"


def format_table(report: Report) -> str:
    """The console table: one line per cell."""
    rows = [("optimizer", "path", "backend", "dtype", "max rel err", "tol", "status")]
    for c in report.cells:
        status = c["status"] if not c.get("message") else f"{c['status']} ({c['message'][:60]})"
        rows.append((c["config"], c["path"], c["backend"], c["dtype"], _fmt_err(c["error"]), f"{c['tolerance']:.0e}", status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: What each ``path`` of the report means (the ways an optimizer is run).
PATH_LABELS: dict[str, str] = {
    "core": "the core rule (xpoptim.core.functional) run directly on the backend's arrays",
    "torch.optim": "xpoptim.adapters.torch, eager (torch.optim.Optimizer, gradients in p.grad)",
    "torch.optim[compile]": "xpoptim.adapters.torch with compile=True (the rule under torch.compile)",
    "optax": "xpoptim.adapters.optax under jax.jit (matrices handed over in the flax (in, out) layout)",
    "array": "xpoptim.adapters.array, stateful, in place (NumPy: the compiled C loop when a C compiler is found; CuPy: cupy.fuse)",
    "array[op-by-op]": "xpoptim.adapters.array with fuse=False (one array operation at a time)",
    "array.functional": "xpoptim.adapters.array.functional, the pure init/update layer (on JAX)",
}

#: What the bracketed suffix of a row label means: a non-default configuration of the rule.
VARIANT_NOTE = (
    "A row `name[variant]` runs the rule with non-default switches, from the spec's verification settings: "
    "`sgd[nesterov]` Nesterov momentum; `mvngrad[m_prev]` the residual against the previous momentum; "
    "`msvag[kappa]` the paper's literal kappa weighting; `*[erf]` the erf adaptation factor; "
    "`deva_linf[nesterov,bc,g2]` Nesterov sign, bias correction, v = EMA(g^2); `muon[rms,plain]` RMS-matching scale, "
    "plain momentum, Frobenius pre-normalisation."
)


def _variant_lines(report: Report) -> list[str]:
    out = []
    for label in sorted({c["config"] for c in report.cells if c["config"] != c["optimizer"]}):
        opt = next(c["optimizer"] for c in report.cells if c["config"] == label)
        base = dict(verification_of(get_spec(opt)).hp)
        hp = next((h for suffix, h in verification_of(get_spec(opt)).variants if f"{opt}[{suffix}]" == label), None)
        if hp is not None:
            diff = {k: v for k, v in hp.items() if base.get(k, object()) != v}
            out.append(f"{label}: {', '.join(f'{k}={v!r}' for k, v in diff.items())}")
    return out


def format_summary(report: Report) -> str:
    """One line per optimizer: cells passed, the worst error against its bound per dtype."""
    rows: dict[str, dict[str, Any]] = {}
    for c in report.cells:
        r = rows.setdefault(c["optimizer"], {"cells": 0, "passed": 0, "worst": {}, "raw": {}})
        r["cells"] += 1
        r["passed"] += c["status"] == "pass"
        e = c["error"]
        if e is not None:
            e = math.inf if e == "inf" else e
            w = c.get("raw_error", e)
            w = math.inf if w == "inf" else w
            r["worst"][c["dtype"]] = max(r["worst"].get(c["dtype"], 0.0), e)
            r["raw"][c["dtype"]] = max(r["raw"].get(c["dtype"], 0.0), w)
    steps = report.meta.get("steps", REFERENCE_STEPS)
    lines = ["per optimizer (cells passed; worst error / bound per dtype, and in brackets without the representation floor):"]
    for name, r in rows.items():
        parts = [
            f"{d} {_fmt_err(r['worst'][d])} / {tolerance(name, d, steps).bound:.0e} ({_fmt_err(r['raw'][d])})"
            for d in DTYPES
            if d in r["worst"]
        ]
        status = "ok" if r["passed"] == r["cells"] else "FAIL"
        lines.append(f"  {name:14s} {r['passed']:3d}/{r['cells']:<3d} {status:4s}  " + "; ".join(parts))
    return "\n".join(lines)


def per_problem_worst(report: Report) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """``{(optimizer, dtype): {problem: (worst error, worst error without the floor)}}`` over the report's cells."""
    out: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for c in report.cells:
        for name, e in (c.get("problems") or {}).items():
            err = math.inf if e["error"] == "inf" else e["error"]
            raw = math.inf if e["raw_error"] == "inf" else e["raw_error"]
            row = out.setdefault((c["optimizer"], c["dtype"]), {})
            old = row.get(name, (0.0, 0.0))
            row[name] = (max(old[0], err), max(old[1], raw))
    return out


def _per_problem_lines(report: Report) -> list[str]:
    worst = per_problem_worst(report)
    names = [p for p in report.meta.get("problems", {}) if any(p in row for row in worst.values())]
    if not names:
        return []
    out = [
        "",
        "## Per problem",
        "",
        "Worst error per optimizer, dtype and problem over every backend and path (without the representation floor in "
        "brackets).",
        "",
        "| optimizer | dtype | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for (o, d), row in worst.items():
        cells = [f"{_fmt_err(row[n][0])} ({_fmt_err(row[n][1])})" if n in row else "-" for n in names]
        out.append(f"| {o} | {d} | " + " | ".join(cells) + " |")
    return out


def format_compared(report: Report) -> str:
    """Which backends and adapter paths the cells compared (and what the paths and variant labels mean)."""
    cmp = report.compared
    lines = [f"compared backends: {', '.join(cmp['backends']) or 'none'}"]
    for path, backends in cmp["paths"].items():
        lines.append(f"  {path:18s} on {', '.join(backends)}: {PATH_LABELS.get(path, '')}")
    variants = _variant_lines(report)
    if variants:
        lines.append("variants (non-default settings): " + "; ".join(variants))
    return "\n".join(lines)


def _compile_cache() -> str:
    """Where the NumPy adapter caches its compiled C loop (empty when the adapter cannot be imported)."""
    try:
        from .adapters import _cfuse
    except Exception:  # noqa: BLE001 (the adapter's own import problems are reported by the cells)
        return ""
    return _cfuse._cache_dir()


def _not_run_text(report: Report) -> str:
    """``"; N cells not run (time limit T s)"`` for a run stopped at its time limit, else ``""``."""
    if not report.not_run:
        return ""
    return f"; {report.not_run} cells not run (time limit {report.meta['time_limit']:g} s)"


def format_markdown(report: Report) -> str:
    """The Markdown report: environment, the matrix, failures, the tolerance policy, what was not run."""
    m = report.meta
    s = report.to_json()["summary"]
    out = [
        "# xpoptim equivalence matrix",
        "",
        f"- result: **{'PASS' if report.ok else 'FAIL'}**, {s['passed']} of {s['cells']} cells pass" + _not_run_text(report),
        f"- date: {m['date']}; machine: {m['machine']}; {m['seconds']} s",
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- steps: {m['steps']}; dtypes: {', '.join(m['dtypes'])}; backends: {', '.join(m['backends'])}",
        f"- problems: {'; '.join(f'`{k}` ({v})' for k, v in m['problems'].items())}",
        f"- error: {m['error']}",
        f"- numerics: {m['numerics']}",
        "",
        "| optimizer | path | backend | dtype | max rel err | without floor | tolerance | status | worst at |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report.cells:
        status = c["status"] if not c.get("message") else f"{c['status']}: {c['message']}".replace("|", "\\|")
        out.append(
            f"| {c['config']} | {c['path']} | {c['backend']} | {c['dtype']} | {_fmt_err(c['error'])} | "
            f"{_fmt_err(c.get('raw_error'))} | {c['tolerance']:.0e} | {status} | {c['where']} |"
        )
    cmp = report.compared
    out += ["", "## What was compared", "", f"Backends: {', '.join(cmp['backends']) or 'none'}.", "", "| path | backends | what it runs |", "| --- | --- | --- |"]
    out += [f"| {p} | {', '.join(b)} | {PATH_LABELS.get(p, '')} |" for p, b in cmp["paths"].items()]
    out += ["", VARIANT_NOTE]
    variants = _variant_lines(report)
    if variants:
        out += [""] + [f"- `{v.split(':')[0]}`:{v.split(':', 1)[1]}" for v in variants]
    out += ["", "## Per optimizer", "", "```", format_summary(report), "```"]
    out += _per_problem_lines(report)
    if report.not_run:
        out += ["", "## Not run (time limit)", "", f"The run stopped starting cells after {m['time_limit']:g} s; "
                f"{report.not_run} cells of these configurations were not checked:", ""]
        out += [f"- `{label}`" for label in m["not_run"]["configs"]]
    if report.unavailable:
        out += ["", "## Not available here", ""]
        out += [f"- `{k}`: {v}" for k, v in sorted(report.unavailable.items())]
    out += ["", "## Tolerance policy", "", "| optimizer | dtype | bound | reason |", "| --- | --- | --- | --- |"]
    for t in report.to_json()["tolerances"]:
        out.append(f"| {t['optimizer']} | {t['dtype']} | {t['bound']:.0e} | {t['reason']} |")
    return "\n".join(out) + "\n"


def write_report(report: Report, out: str | Path) -> tuple[Path, Path]:
    """Write ``matrix.md`` and ``matrix.json`` into ``out`` (created); returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "matrix.md", folder / "matrix.json"
    md.write_text(format_markdown(report))
    js.write_text(json.dumps(report.to_json(), indent=1, sort_keys=False) + "\n")
    return md, js


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xpoptim.matrix",
        description="Verify that every xpoptim optimizer computes the same numbers on every installed backend "
        "(and through the torch / optax / array adapters) as the float64 NumPy run of its core rule.",
    )
    p.add_argument("--optimizers", help="comma-separated optimizer names or configuration labels (default: all)")
    p.add_argument("--backends", help="comma-separated backends or aliases (numpy, strict, torch, jax, cupy, gpu; default: $XPOPTIM_BACKENDS or all installed)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of float64,float32")
    p.add_argument("--problems", help=f"comma-separated subset of {','.join(PROBLEMS)} (default: all; 'digits' needs scikit-learn)")
    p.add_argument("--steps", type=int, default=20, help="steps per trajectory (default 20)")
    p.add_argument("--out", help="write matrix.md and matrix.json into this folder")
    p.add_argument("--no-adapters", action="store_true", help="check the core rules only")
    p.add_argument("--no-variants", action="store_true", help="only the default configuration of each optimizer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--torch-compile", action="store_true", help="also check the torch adapter with compile=True (slow)")
    p.add_argument("--demo", dest="demo", action="store_true", default=False, help="also run the torch-vs-JAX training demo afterwards (writes its loss-curve PNG when matplotlib is installed: demo_loss.png into --out, or xpoptim-demo.png in the current folder)")
    p.add_argument("--no-demo", dest="demo", action="store_false", help="do not run the demo (the default; kept so older command lines work)")
    p.add_argument("--version", action="version", version=f"xpoptim {__version__}")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="start no cell after this many seconds; the report then covers the cells checked so far, lists the configurations left unchecked, and the run fails")
    p.add_argument("--measure", action="store_true", help="also print the largest error per (optimizer, dtype) next to its bound")
    p.add_argument(
        "--perturb",
        metavar="OPT[:KIND]",
        help="self-check: run OPT's core candidates with a deliberately wrong rule (KIND 'step': off-by-one step count "
        "in the bias corrections, default for elementwise rules; 'lr': lr 0.1%% too large, default for matrix rules); "
        "the run must then fail",
    )
    return p


def measured(report: Report) -> str:
    """Per (optimizer, dtype): the largest error measured in ``report`` next to the current bound.

    How the float32 bounds of :data:`TOLERANCES` were set (``python -m xpoptim.matrix --measure``).
    """
    worst: dict[tuple[str, str], float] = {}
    raw: dict[tuple[str, str], float] = {}
    for c in report.cells:
        e = c["error"]
        if e is None:
            continue
        e = math.inf if e == "inf" else e
        r = c.get("raw_error", e)
        r = math.inf if r == "inf" else r
        key = (c["optimizer"], c["dtype"])
        worst[key] = max(worst.get(key, 0.0), e)
        raw[key] = max(raw.get(key, 0.0), r)
    lines = [f"{'optimizer':14s} {'dtype':8s} {'measured':>9s} {'bound':>7s} {'margin':>7s} {'no floor':>9s}"]
    for (o, d), e in sorted(worst.items()):
        b = tolerance(o, d, report.meta.get("steps", REFERENCE_STEPS)).bound
        lines.append(f"{o:14s} {d:8s} {e:9.1e} {b:7.0e} {b / e if e else math.inf:7.1f} {raw[(o, d)]:9.1e}")
    return "\n".join(lines)


def _split(s: str | None) -> list[str] | None:
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0: every cell passes, 1: a cell fails, 2: bad usage)."""
    args = _parser().parse_args(argv)
    override = {}
    try:
        if args.perturb:
            name, _, kind = args.perturb.partition(":")
            spec = get_spec(name)
            override[spec.name] = perturbed(spec, kind or ("step" if isinstance(spec, ElementwiseSpec) else "lr"))
        report = run(
            _split(args.optimizers),
            args.backends,
            tuple(_split(args.dtypes) or ()),
            args.steps,
            _split(args.problems),
            adapters=not args.no_adapters,
            variants=not args.no_variants,
            override=override,
            progress=not args.no_progress,
            torch_compile=args.torch_compile,
            time_limit=args.time_limit,
        )
    except ValueError as exc:
        print(f"xpoptim.matrix: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    print()
    print(format_summary(report))
    print()
    print(format_compared(report))
    for name, why in sorted(report.unavailable.items()):
        print(f"not available: {name}: {why}")
    cache = _compile_cache()
    if cache:
        print(f"NumPy adapter compile cache: {cache}")
    if args.measure:
        print(measured(report))
    if args.out:
        md, js = write_report(report, args.out)
        print(f"wrote {md} and {js}")
    s = report.to_json()["summary"]
    if not report.cells and not report.not_run:
        print("no cell was checked (no usable backend, adapter or problem in this selection): nothing is verified", file=sys.stderr)
    if report.not_run:
        print(f"stopped at the time limit: not checked: {', '.join(report.meta['not_run']['configs'])}", file=sys.stderr)
    print(f"{s['passed']}/{s['cells']} cells pass in {report.meta['seconds']} s" + (f"; {s['failed']} FAIL" if s["failed"] else "") + _not_run_text(report))
    for c in report.failed:
        print(f"FAIL {c['config']} {c['path']}/{c['backend']} {c['dtype']}: error {_fmt_err(c['error'])} > {c['tolerance']:.0e} {c['where']} {c.get('message', '')}")
    if args.demo:
        from . import demo

        try:
            demo.run(png=Path(args.out) / "demo_loss.png" if args.out else Path(demo.DEFAULT_PNG))
        except Exception as exc:  # the demo is part of the main job: a crash fails the run, with the reason
            print(f"xpoptim.demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
