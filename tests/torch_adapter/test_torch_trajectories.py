"""Every optimizer through the torch adapter gives the trajectory of ``core.functional`` on NumPy (float64).

The adapter runs one multi-tensor kernel per group, stacks same-shape matrices and flattens conv weights; the
reference steps each parameter on its own with NumPy arrays, so any layout, routing or bookkeeping error shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import registry_cases
from xpt_support import MATRIX, NAMES, dense_permuted, make_params, reference_run, run_torch, set_grads, spec_hp

from xpoptim.adapters import torch as xt

STEPS = 8


def _tol(name: str) -> dict:
    # Every rule, DeVASinf's eigh/QR included (canonical eigenbases in the core), agrees to float64 round-off.
    return dict(rtol=1e-12, atol=1e-14)


ROWS = registry_cases.rows()


@pytest.mark.parametrize(("name", "hp"), [pytest.param(n, hp, id=i) for i, n, hp in ROWS])
def test_trajectory_equals_core_functional(name, hp):
    """Each rule at its registry settings and at each of its variants (switches such as Nesterov or erf)."""
    params = make_params(name)
    init = [p.detach().numpy().copy() for p in params]
    skip = (1,)  # one parameter never gets a gradient: untouched, no state
    run_torch(lambda ps: xt.create(name, ps, compile=False, **spec_hp(name, **hp)), name, params, STEPS, skip=skip)
    ref = reference_run(name, init, STEPS, skip=skip, **hp)
    for i, (p, r) in enumerate(zip(params, ref)):
        if i in skip:
            assert np.array_equal(p.detach().numpy(), init[i])
        np.testing.assert_allclose(p.detach().numpy(), r, **_tol(name), err_msg=f"{name} param {i}")


@pytest.mark.parametrize("name", NAMES)
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


@pytest.mark.parametrize("shapes", [None, [(7, 3)], [(3, 7), (3, 7)]], ids=["mixed", "one-tall", "stack-wide"])
@pytest.mark.parametrize("name", MATRIX)
def test_matrix_rules_on_tall_and_stacked_shapes_follow_the_reference(name, shapes):
    """Same-shape matrices are stacked through one core step, a tall matrix is orthogonalized through its transpose:
    the trajectories follow the float64 reference."""
    if shapes is None:
        params = make_params(name)
    else:
        gen = np.random.default_rng(4)
        params = [torch.tensor(gen.standard_normal(s), dtype=torch.float64, requires_grad=True) for s in shapes]
    init = [p.detach().numpy().copy() for p in params]
    run_torch(lambda ps: xt.create(name, ps, compile=False, **spec_hp(name)), name, params, STEPS)
    ref = reference_run(name, init, STEPS)
    for i, (p, r) in enumerate(zip(params, ref)):
        np.testing.assert_allclose(p.detach().numpy(), r, **_tol(name), err_msg=f"{name} param {i}")


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_muon_low_precision_params_follow_the_float64_reference(pdtype):
    """float32 / bf16 Muon parameters (bf16 with float32 state and update, cast back once per step) against the
    float64 reference. 3 steps at lr 0.1 move the parameters by ~0.3: float32 math keeps them within ~1e-6 (measured
    2e-7 to 3e-7); a bf16 parameter is rounded once per step (half an ulp, 2^-8 |p| with |p| <= ~4: 1.6e-2 per
    step; measured 6e-3 to 9e-3 after 3 steps). Bounds: 1e-5 and 5e-2, well below the 0.3 a wrong update is off."""
    gen = np.random.default_rng(8)
    init = [gen.standard_normal((9, 4)), gen.standard_normal((4, 9))]
    params = [torch.tensor(x, dtype=pdtype, requires_grad=True) for x in init]
    init = [p.detach().double().numpy() for p in params]
    run_torch(lambda ps: xt.create("muon", ps, compile=False, **spec_hp("muon", lr=0.1)), "muon", params, 3)
    ref = reference_run("muon", init, 3, lr=0.1)
    assert max(np.abs(r - x).max() for r, x in zip(ref, init)) > 0.2  # the update is far above the bounds
    tol = 1e-5 if pdtype == torch.float32 else 5e-2
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=0, atol=tol)


@pytest.mark.parametrize("grad_layout", ["row-major", "param's"])
@pytest.mark.parametrize("name", NAMES)
def test_dense_permuted_layouts_are_kept_and_follow_the_reference(name, grad_layout):
    """channels_last and transposed parameters keep their strides (params, and state and kept gradients:
    torch.optim's ``preserve_format``) and follow the row-major float64 reference. Gradients come row-major
    (assigned by hand, fresh each step) or in the parameter's layout (what backward produces): fresh on even
    steps, written into the kept ``p.grad`` on odd ones (the ``zero_grad(set_to_none=False)`` pattern).
    Matrix rules keep their state as row-major ``(out, in*kh*kw)`` matrices (``matrix_shape``), by design."""
    params = [dense_permuted(p) for p in make_params(name)]
    strides = [p.stride() for p in params]
    assert any(not p.is_contiguous() for p in params)
    init = [p.detach().numpy().copy() for p in params]
    opt = xt.create(name, params, compile=False, **spec_hp(name))
    for step in range(STEPS):
        kept = [p.grad for p in params]
        gv = set_grads(params, step, name)  # row-major gradients, and grad_variance for the -mb rules
        if grad_layout == "param's":
            for p, old in zip(params, kept):
                g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(p.grad)
                p.grad = old.copy_(g) if (step % 2 and old is not None) else g
        opt.step(grad_variance=gv) if gv is not None else opt.step()
    ref = reference_run(name, init, STEPS)
    for i, (p, r, st) in enumerate(zip(params, ref, strides)):
        assert p.stride() == st, f"{name} param {i}: strides {p.stride()} != {st}"
        if grad_layout == "param's":
            assert p.grad.stride() == st, f"{name} param {i}: grad strides {p.grad.stride()} != {st}"
        for key, v in opt.state[p].items():
            if name not in MATRIX and isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert v.stride() == st, f"{name} param {i}: state {key} strides {v.stride()} != {st}"
        np.testing.assert_allclose(p.detach().numpy(), r, **_tol(name), err_msg=f"{name} param {i}")
