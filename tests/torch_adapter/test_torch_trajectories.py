"""Every optimizer through the torch adapter gives the trajectory of ``core.functional`` on NumPy (float64).

The adapter lays parameters out in flat buffers, stacks same-shape matrices and flattens conv weights; the
reference steps each parameter on its own with NumPy arrays, so any layout, routing or bookkeeping error shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from xpt_support import MATRIX, NAMES, make_params, reference_run, run_torch, spec_hp

from xpoptim.adapters import torch as xt

STEPS = 8


def _tol(name: str) -> dict:
    # Every rule, DeVASinf's eigh/QR included (canonical eigenbases in the core), agrees to float64 round-off.
    return dict(rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_trajectory_equals_core_functional(name):
    params = make_params(name)
    init = [p.detach().numpy().copy() for p in params]
    skip = (1,)  # one parameter never gets a gradient: untouched, no state
    run_torch(lambda ps: xt.create(name, ps, compile=False, **spec_hp(name)), name, params, STEPS, skip=skip)
    ref = reference_run(name, init, STEPS, skip=skip)
    for i, (p, r) in enumerate(zip(params, ref)):
        if i in skip:
            assert np.array_equal(p.detach().numpy(), init[i])
        np.testing.assert_allclose(p.detach().numpy(), r, **_tol(name), err_msg=f"{name} param {i}")


@pytest.mark.parametrize("name", ["adamw", "msvag", "muon", "sgd"])
def test_maximize_trajectory(name):
    params = make_params(name)
    init = [p.detach().numpy().copy() for p in params]
    run_torch(lambda ps: xt.create(name, ps, compile=False, maximize=True, **spec_hp(name)), name, params, STEPS)
    ref = reference_run(name, init, STEPS, maximize=True)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().numpy(), r, **_tol(name))


@pytest.mark.parametrize("name", [n for n in NAMES if n not in MATRIX])
def test_float32_close_to_float64_reference(name):
    """float32 params and state follow the float64 reference within float32 rounding over a few steps."""
    params = make_params(name, torch.float32)
    init = [p.detach().double().numpy().copy() for p in params]
    run_torch(lambda ps: xt.create(name, ps, compile=False, **spec_hp(name)), name, params, 5)
    ref = reference_run(name, init, 5)
    for p, r in zip(params, ref):
        # 5 steps of an O(1)-conditioned rule at lr 1e-2: each step changes p by <= ~1e-2 * O(1), computed in
        # float32 (relative 6e-8 per op, ~30 ops): absolute error well below 1e-5 * max(1, |p|).
        np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=1e-5, atol=1e-5)
