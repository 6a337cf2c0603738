"""A run moved torch -> JAX -> NumPy -> torch continues an uninterrupted torch run, for every optimizer.

Four segments of three steps; between segments the state is exported, written to a file (safetensors, then
``.npz``, then safetensors), read back and imported into the next framework (JAX with flax ``(in, out)``
kernels). The moved trajectory must stay within the cross-backend bound of the README's tolerance table
(``xpoptim.matrix.tolerance`` for the optimizer, dtype and number of steps) of the uninterrupted one. Muon and
DeVA_Sinf run with their fallback rule on the biases.
"""

from __future__ import annotations

import jax
import numpy as np
import portable_problem as prob
import pytest
from portable_runners import RUNNERS, run_torch

import xpoptim.portable as xpp
from xpoptim.core import SPECS
from xpoptim.matrix import Trajectory, tolerance, trajectory_error

SEGMENTS = (("torch", 3, "a.safetensors"), ("jax", 3, "b.npz"), ("numpy", 3, "c.safetensors"), ("torch", 3, None))
STEPS = sum(s for _, s, _ in SEGMENTS)


def _hp(name: str) -> dict:
    """Default hyperparameters; SGD with a larger step so that it travels."""
    return {"lr": 0.05} if name == "sgd" else {}


def moved_run(name: str, dtype: str, tmp_path, segments=SEGMENTS) -> tuple[list, list]:
    params = prob.init(dtype)
    traj, losses, portable, t = [], [], None, 0
    for fw, steps, fname in segments:
        params, tr, ls, portable = RUNNERS[fw](name, _hp(name), params, t, steps, portable)
        traj += tr
        losses += ls
        t += steps
        if fname is not None:
            portable.save(tmp_path / fname)
            portable = xpp.load(tmp_path / fname)
    return traj, losses


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(SPECS))
def test_torch_jax_numpy_torch_continues_the_run(name, dtype, tmp_path):
    with jax.enable_x64(dtype == "float64"), jax.default_matmul_precision("float32"):
        moved, _ = moved_run(name, dtype, tmp_path)
    p0 = prob.init(dtype)
    _, ref, _, _ = run_torch(name, _hp(name), p0, 0, STEPS)
    start = {k: v.astype(np.float64) for k, v in p0.items()}
    err = trajectory_error(Trajectory([start, *moved], []), Trajectory([start, *ref], []), name)
    bound = tolerance(name, dtype, STEPS).bound
    assert err.error <= bound, f"{name} {dtype}: moved run differs by {err} (bound {bound:.1e})"


LONG = (("torch", 7, "a.safetensors"), ("jax", 5, "b.npz"), ("numpy", 11, "c.npz"), ("torch", 7, None))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(SPECS))
def test_long_uneven_segments_continue_the_run(name, dtype, tmp_path):
    """30 steps in uneven segments: DeVA_Sinf refreshes its eigenbases (every 10 steps) in two frameworks."""
    steps = sum(s for _, s, _ in LONG)
    with jax.enable_x64(dtype == "float64"), jax.default_matmul_precision("float32"):
        moved, _ = moved_run(name, dtype, tmp_path, LONG)
    p0 = prob.init(dtype)
    _, ref, _, _ = run_torch(name, _hp(name), p0, 0, steps)
    start = {k: v.astype(np.float64) for k, v in p0.items()}
    err = trajectory_error(Trajectory([start, *moved], []), Trajectory([start, *ref], []), name)
    bound = tolerance(name, dtype, steps).bound
    assert err.error <= bound, f"{name} {dtype}: moved run differs by {err} (bound {bound:.1e})"
