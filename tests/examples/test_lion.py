"""The worked example of ``docs/extending.md``: Lion, defined and registered in ``examples/lion.py`` only, runs
through the torch adapter (eager), the optax adapter (jitted), the NumPy adapter's compiled C loop and its op-by-op
path, and each follows an independent float64 Lion written here from the paper (Chen et al. 2023, Algorithm 2)::

    c = b1 m + (1 - b1) g;  p <- p - lr (sign(c) + wd p);  m <- b2 m + (1 - b2) g

Bounds. The rules compute ``p (1 - lr wd) - lr sign(c)``, the reference ``p - lr (sign(c) + wd p)``: equal in exact
arithmetic, and the momentum is computed with the same operations, so ``sign(c)`` agrees wherever ``|c|`` is far
from 0 (the data is checked to keep ``min |c| > 1e-3``). Each step then rounds ``p`` a few times, so after ``T``
steps ``|p - p_ref| <= T * 4 * eps * (max |p| + lr)`` in the run's dtype (float64 runs: ``eps = 2^-52``).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

import xpoptim.core as core
from xpoptim.adapters import _cfuse

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "lion.py"
STEPS = 12
HP = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.5}


@pytest.fixture(scope="module")
def lion():
    """Import the example (it registers "lion"), and restore the registry afterwards: the rule is removed again, or,
    when the run registered it itself (``--xpoptim-rules examples/lion.py``), that registration is put back."""
    before = core.SPECS.get("lion")
    spec = importlib.util.spec_from_file_location("xpoptim_example_lion", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    if before is None:
        core.unregister("lion")
    else:
        core.register(before, replace=True)
    del sys.modules[spec.name]


def lion_reference(p0: np.ndarray, grads: list, lr: float, beta1: float, beta2: float, weight_decay: float) -> tuple:
    """Lion in float64, Algorithm 2 as printed; returns the parameters after each step and ``min |c|``."""
    p = p0.astype(np.float64)
    m = np.zeros_like(p)
    out, cmin = [], np.inf
    for g in grads:
        g = g.astype(np.float64)
        c = beta1 * m + (1 - beta1) * g
        cmin = min(cmin, float(np.min(np.abs(c))))
        p = p - lr * (np.sign(c) + weight_decay * p)
        m = beta2 * m + (1 - beta2) * g
        out.append(p.copy())
    return out, cmin


def _data(dtype: type) -> tuple:
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((4, 5)).astype(dtype)
    grads = [(rng.standard_normal((4, 5)) + 0.5).astype(dtype) for _ in range(STEPS)]
    return p0, grads


def _bound(dtype: type, ref: list) -> float:
    return STEPS * 4 * float(np.finfo(dtype).eps) * (max(float(np.max(np.abs(r))) for r in ref) + HP["lr"])


@pytest.fixture(scope="module", params=[np.float64, np.float32], ids=["float64", "float32"])
def case(request):
    dtype = request.param
    p0, grads = _data(dtype)
    ref, cmin = lion_reference(p0, [g.astype(np.float64) for g in grads], **HP)
    assert cmin > 1e-3  # sign(c) is decided far from 0, so every run takes the reference's signs
    return dtype, p0, grads, ref, _bound(dtype, ref)


def _check(traj: list, ref: list, bound: float) -> None:
    assert len(traj) == len(ref)
    for t, (got, want) in enumerate(zip(traj, ref), start=1):
        err = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)))
        assert err <= bound, f"step {t}: max |p - p_ref| = {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("fuse", [True, False], ids=["compiled", "op_by_op"])
def test_numpy(lion, case, fuse: bool) -> None:
    from xpoptim.adapters import numpy as xnp

    if fuse and _cfuse.compiler() is None:
        pytest.skip("needs a C compiler (cc, gcc or clang on PATH, or $CC) to build the compiled NumPy step")
    dtype, p0, grads, ref, bound = case
    w = p0.copy()
    opt = xnp.create("lion", [w], fuse=fuse, **HP)
    traj = []
    for g in grads:
        opt.step([g])
        traj.append(w.copy())
    assert opt.fused is fuse, opt.fuse_notes
    assert type(opt).__name__ == "Lion" and opt.state_dict()["state"][0].keys() == {"exp_avg"}
    _check(traj, ref, bound)


def test_torch_eager(lion, case) -> None:
    torch = pytest.importorskip("torch")
    from xpoptim.adapters import torch as xt

    dtype, p0, grads, ref, bound = case
    w = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = xt.create("lion", [w], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), weight_decay=HP["weight_decay"], compile=False)
    traj = []
    for g in grads:
        w.grad = torch.from_numpy(g.copy())
        opt.step()
        traj.append(w.detach().numpy().copy())
    assert set(opt.state[w]) >= {"exp_avg"}
    _check(traj, ref, bound)


def test_optax(lion, case) -> None:
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    from xpoptim.adapters import optax as xo

    dtype, p0, grads, ref, bound = case
    with jax.enable_x64(dtype is np.float64):  # float64 runs need JAX's x64 mode, switched on for this block only
        tx = xo.create("lion", **HP)
        params = {"w": jnp.asarray(p0)}
        state = tx.init(params)
        update = jax.jit(tx.update)
        traj = []
        for g in grads:
            u, state = update({"w": jnp.asarray(g)}, state, params)
            params = optax.apply_updates(params, u)
            traj.append(np.asarray(params["w"]))
        assert params["w"].dtype == dtype
    _check(traj, ref, bound)


def test_the_rule_is_served_by_name_only_while_registered(lion) -> None:
    from xpoptim.adapters import numpy as xnp
    from xpoptim.adapters import optax as xo

    assert core.get_spec("lion") is lion.LION and core.get_spec("Lion") is lion.LION
    assert xnp.Lion is type(xnp.create("lion", [np.zeros(3)]))
    assert xo.scale_by_lion.__name__ == "scale_by_lion" and callable(xo.lion)
    torch = pytest.importorskip("torch")
    import copy
    import pickle

    from xpoptim.adapters import torch as xt

    w = torch.nn.Parameter(torch.ones(3))
    opt = xt.Lion([w], lr=0.1)  # a class of its own, as the shipped rules have, made for the registered rule
    assert type(opt) is xt.Lion and type(xt.create("lion", [w])) is xt.Lion and issubclass(xt.Lion, xt.XPOptimizer)
    assert xt.Lion.spec is lion.LION and xt.Lion.__doc__.startswith("Lion:") and xt.Lion.__module__ == xt.__name__
    w.grad = torch.ones(3)
    opt.step()
    assert type(copy.deepcopy(opt)) is xt.Lion and type(pickle.loads(pickle.dumps(opt))) is xt.Lion
    with pytest.raises(AttributeError, match="has no attribute 'Lamb'"):
        xt.Lamb
    with pytest.raises(ValueError, match=r"spec.name='lion' is taken: registered \(pass replace=True"):
        core.register(lion.LION)
    with pytest.raises(ValueError, match=r"spec.name='adamw' is taken: a built-in optimizer"):
        core.register(core.ADAMW, replace=True)


def test_the_registered_reference_agrees_with_this_test(lion, case) -> None:
    """The reference the example registers (``Verification(reference=...)``, used by every generic suite under
    ``--xpoptim-rules examples/lion.py``) and the one written here agree: two writings of Algorithm 2."""
    dtype, p0, grads, ref, _ = case
    hp = lion.LION.validate(**HP)
    got = lion.lion_reference(p0.astype(np.float64), lambda theta, t: grads[t - 1].astype(np.float64), STEPS, hp)
    assert got.shape == (STEPS + 1, *p0.shape)
    np.testing.assert_array_equal(got[1:], np.stack(ref))
    assert core.verification.verification_of(lion.LION).reference is lion.lion_reference
