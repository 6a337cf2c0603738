"""Cross-backend equivalence checks for your own code: the verifier's comparison as assertions.

* :func:`assert_trajectories_close` compares two parameter trajectories (one entry per step; each a
  dict of named arrays, a sequence of arrays, or one array; arrays of any backend) and, when they
  differ, says at which step, in which parameter, how far apart (max abs and rel error) and where.
* :func:`assert_backends_agree` runs either an xpoptim optimizer (by name) or your own function on
  every installed backend and compares with the float64 NumPy run.

Example::

    from xpoptim.testing import assert_backends_agree

    assert_backends_agree("adamw", dtypes=("float64", "float32"))           # an optimizer, our problems

    def my_training(xp, dtype, device):                                      # your own code
        w = xp.asarray([1.0, -2.0], dtype=dtype, device=device)
        traj = []
        for t in range(5):
            w = w - 0.1 * xp.sin(w)
            traj.append({"w": w})
        return traj

    assert_backends_agree(my_training)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._backends import discover, discover_required, pinned_numerics, to_numpy

__all__ = ["assert_trajectories_close", "assert_backends_agree", "DEFAULT_RTOL", "DEFAULT_ATOL"]

#: Default tolerances of :func:`assert_backends_agree` for a user function, by dtype.
DEFAULT_RTOL = {"float64": 1e-12, "float32": 1e-5}
DEFAULT_ATOL = {"float64": 1e-14, "float32": 1e-7}


def _as_steps(traj: Any) -> list[dict]:
    """Normalise a trajectory to a list of ``{name: float64 ndarray}`` (one per step)."""
    if hasattr(traj, "params") and isinstance(getattr(traj, "params"), list):  # matrix.Trajectory
        traj = traj.params
    if _is_array(traj):
        return [{"0": to_numpy(traj)}]
    if isinstance(traj, Mapping):
        return [{str(k): to_numpy(v) for k, v in traj.items()}]
    steps = list(traj)
    out = []
    for s in steps:
        if isinstance(s, Mapping):
            out.append({str(k): to_numpy(v) for k, v in s.items()})
        elif _is_array(s) or np.isscalar(s):
            out.append({"0": to_numpy(s)})
        else:
            out.append({str(i): to_numpy(v) for i, v in enumerate(s)})
    return out


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def assert_trajectories_close(
    actual: Any,
    desired: Any,
    rtol: float = 1e-7,
    atol: float = 0.0,
    *,
    label: str = "",
) -> None:
    """Assert that two trajectories agree elementwise: ``|a - d| <= atol + rtol * |d|`` at every step.

    Args:
        actual: the trajectory under test: a sequence with one entry per step, each a dict of named
            arrays, a sequence of arrays or one array (a single dict or array is one step). Arrays of
            any backend (NumPy, torch, JAX, CuPy, array-api-strict); compared in float64 on the host.
        desired: the reference, same structure.
        rtol: relative tolerance.
        atol: absolute tolerance.
        label: prefix for the message (e.g. the backend and dtype).

    Raises:
        AssertionError: naming the first step and parameter that differ, the max abs and rel error
            there with their index and values, how many elements exceed the tolerance, and the worst
            step over the whole trajectory. Also for different lengths, names, shapes, or NaN/inf
            where the reference has a finite value.
    """
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol={rtol!r}, atol={atol!r} are invalid: expected numbers >= 0")
    a_steps, d_steps = _as_steps(actual), _as_steps(desired)
    pre = f"{label}: " if label else ""
    if len(a_steps) != len(d_steps):
        raise AssertionError(f"{pre}trajectories have different lengths: actual {len(a_steps)} steps, desired {len(d_steps)}")
    first: str | None = None
    worst = (-1.0, "")
    for t, (a, d) in enumerate(zip(a_steps, d_steps)):
        if set(a) != set(d):
            raise AssertionError(f"{pre}step {t}: parameter names differ: actual {sorted(a)}, desired {sorted(d)}")
        for name in d:
            x, y = a[name], d[name]
            if x.shape != y.shape:
                raise AssertionError(f"{pre}step {t}, parameter {name!r}: shapes differ: actual {x.shape}, desired {y.shape}")
            if x.size == 0:
                continue
            diff = np.abs(x - y)
            both_nan = np.isnan(x) & np.isnan(y)
            same_inf = np.isinf(x) & np.isinf(y) & (np.sign(x) == np.sign(y))
            diff = np.where(both_nan | same_inf, 0.0, diff)
            diff = np.where(np.isnan(diff), np.inf, diff)
            bound = atol + rtol * np.abs(y)
            bad = diff > bound
            if not bad.any():
                continue
            ia = np.unravel_index(int(np.argmax(diff)), diff.shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(diff == 0, 0.0, diff / np.abs(y))
            ir = np.unravel_index(int(np.argmax(np.where(np.isnan(rel), np.inf, rel))), rel.shape)
            msg = (
                f"step {t}, parameter {name!r}: {int(bad.sum())} of {bad.size} elements differ beyond "
                f"atol={atol:g} + rtol={rtol:g}*|desired|; max abs error {float(diff[ia]):.3e} at index "
                f"{_idx(ia)} (actual {x[ia]!r}, desired {y[ia]!r}); max rel error {float(rel[ir]):.3e} at "
                f"index {_idx(ir)} (actual {x[ir]!r}, desired {y[ir]!r})"
            )
            if first is None:
                first = msg
            score = float(diff[ia])
            if score > worst[0]:
                worst = (score, f"step {t}, parameter {name!r} (max abs error {score:.3e} at index {_idx(ia)})")
    if first is not None:
        tail = "" if first.startswith(worst[1].split(" (")[0]) else f"; worst: {worst[1]}"
        raise AssertionError(f"{pre}trajectories differ first at {first}{tail}")


def _idx(idx: tuple) -> tuple:
    return tuple(int(i) for i in idx)


def assert_backends_agree(
    fn_or_optimizer_name: str | Callable[..., Any],
    *,
    backends: Iterable[str] | str | None = None,
    dtypes: Sequence[str] = ("float64",),
    steps: int = 10,
    rtol: float | Mapping[str, float] | None = None,
    atol: float | Mapping[str, float] | None = None,
    hyperparams: Mapping[str, Any] | None = None,
    problems: Sequence[str] | None = None,
    adapters: bool = True,
) -> None:
    """Assert that an optimizer, or your own function, computes the same numbers on every backend.

    Args:
        fn_or_optimizer_name: an xpoptim optimizer name (``"adamw"``): it is run through the core on
            every backend, and through the torch / optax / array adapters when ``adapters``, on the
            verifier's problems (``xpoptim._problems``) and compared with the float64 NumPy run under
            the verifier's tolerance policy (``xpoptim.matrix.TOLERANCES``) unless ``rtol`` is given.
            Or a callable ``fn(xp, dtype, device)`` returning a trajectory (see
            :func:`assert_trajectories_close`); it is run on every backend and dtype and compared
            elementwise with ``fn`` on NumPy in float64.
        backends: backend names or aliases (``"numpy,torch"``); default: ``$XPOPTIM_BACKENDS`` or every
            installed one.
        dtypes: ``"float64"`` and/or ``"float32"``.
        steps: optimizer name only: steps per trajectory.
        rtol: a number, or ``{dtype: number}``. Optimizer name: a bound on the verifier's error (the
            deviation beyond the dtype's representation floor, relative to the distance travelled;
            ``xpoptim.matrix.trajectory_error``). Callable: elementwise relative tolerance
            (default :data:`DEFAULT_RTOL`).
        atol: callable only: absolute tolerance (default :data:`DEFAULT_ATOL`).
        hyperparams: optimizer name only: hyperparameters (default: the verifier's settings).
        problems: optimizer name only: subset of the verifier's problems.
        adapters: optimizer name only: also check the adapters.

    Raises:
        AssertionError: listing every (path, backend, dtype) that disagrees, with the step, the
            parameter and the distance.
        ValueError: an unknown optimizer, backend or dtype, or a backend named in ``backends`` that is not
            installed or cannot reach its device here (a named backend is never skipped silently).
    """
    # None: $XPOPTIM_BACKENDS or every installed backend; named backends must all be usable (ValueError otherwise).
    names = None if backends is None else (backends if isinstance(backends, str) else ",".join(backends))
    if isinstance(fn_or_optimizer_name, str):
        _optimizer_agree(fn_or_optimizer_name, names, dtypes, steps, rtol, hyperparams, problems, adapters)
        return
    if not callable(fn_or_optimizer_name):
        raise TypeError(
            f"fn_or_optimizer_name={fn_or_optimizer_name!r} is invalid: expected an optimizer name or a callable fn(xp, dtype, device)"
        )
    fn = fn_or_optimizer_name
    bad_dtypes = [d for d in dtypes if d not in DEFAULT_RTOL]
    if bad_dtypes:
        raise ValueError(f"dtypes={list(dtypes)!r} is invalid: expected a subset of {list(DEFAULT_RTOL)}")
    found, _ = discover(None) if names is None else discover_required(names)
    numpy_backend = discover(["numpy"])[0][0]
    failures = []
    with pinned_numerics():
        desired = fn(numpy_backend.xp, numpy_backend.dtypes["float64"], None)
        for b in found:
            for d in dtypes:
                r = _pick(rtol, d, DEFAULT_RTOL)
                a = _pick(atol, d, DEFAULT_ATOL)
                try:
                    actual = fn(b.xp, b.dtypes[d], b.device)
                    assert_trajectories_close(actual, desired, rtol=r, atol=a, label=f"{b.name} {d}")
                except AssertionError as exc:
                    failures.append(str(exc))
                except Exception as exc:
                    failures.append(f"{b.name} {d}: raised {type(exc).__name__}: {exc}")
    if not found or not dtypes:
        raise AssertionError("nothing was compared: no usable backend or dtype in this selection")
    if failures:
        raise AssertionError(f"backends disagree with NumPy float64 ({len(failures)} case(s)):\n" + "\n".join(failures))


def _pick(value: Any, dtype: str, default: Mapping[str, float]) -> float:
    if value is None:
        return default[dtype]
    if isinstance(value, Mapping):
        return value.get(dtype, default[dtype])
    return float(value)


def _optimizer_agree(
    name: str,
    backends: str | None,
    dtypes: Sequence[str],
    steps: int,
    rtol: Any,
    hyperparams: Mapping[str, Any] | None,
    problems: Sequence[str] | None,
    adapters: bool,
) -> None:
    from . import matrix
    from .core import get_spec

    spec = get_spec(name)
    if hyperparams is None:
        configs = matrix.select_configs([spec.name], variants=False)
    else:
        configs = [matrix.Config(spec.name, spec.name, dict(hyperparams))]
    report = matrix.run(
        configs=configs, backends=backends, dtypes=tuple(dtypes), steps=steps, problems=problems, adapters=adapters
    )
    if not report.cells:
        raise AssertionError(f"{spec.title}: nothing was compared (no usable backend, adapter or problem in this selection)")
    failures = []
    for c in report.cells:
        bound = c["tolerance"] if rtol is None else _pick(rtol, c["dtype"], {c["dtype"]: c["tolerance"]})
        if c["status"] == "ERROR":
            failures.append(f"{c['path']}/{c['backend']} {c['dtype']}: raised {c['message']}")
        elif c["status"] in ("pass", "FAIL") and not (c["error"] != "inf" and c["error"] <= bound):
            failures.append(
                f"{c['path']}/{c['backend']} {c['dtype']}: error {c['error']} (max abs error {c['abs_error']}) "
                f"> {bound:g} at {c['where']} (step, parameter, index)"
            )
    if failures:
        raise AssertionError(
            f"{spec.title} disagrees with its float64 NumPy reference in {len(failures)} case(s) "
            f"(error = max deviation / distance travelled):\n" + "\n".join(failures)
        )
