"""The stateful array optimizer follows the core's per-array driver, for every optimizer.

Reference: ``xpoptim.core.functional.step`` run array by array in NumPy float64, with the routing
of matrix rules written out here (``ndim >= 2`` -> the matrix rule on ``(shape[0], prod(rest))``,
else the fallback rule with ``spec.fallback_defaults``). The adapter under test buckets, chunks,
packs and stacks; none of that code is shared with the reference. Independent closed forms for
AdamW and torch.optim for Adam/AdamW/SGD anchor the whole chain.
"""

from __future__ import annotations

import numpy as np
import pytest
import registry_cases
from array_helpers import STEPS, _data, reference, settings

from xpoptim.adapters import array as A
from xpoptim.core import SPECS, MatrixSpec, get_spec

def _tol(backend_name: str) -> dict:
    # NumPy runs the same float64 operations in another order of arrays: identical bits expected.
    # Other namespaces: the cross-backend agreement of the core (~1e-16 relative per step).
    return dict(rtol=0, atol=0) if backend_name == "numpy" else dict(rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "hp"), [pytest.param(n, hp, id=i) for i, n, hp in registry_cases.rows()])
@pytest.mark.parametrize("structure", ["list", "dict"])
def test_trajectory_matches_core(backend, name: str, hp: dict, structure: str) -> None:
    """Each rule at its registry settings and each of its variants (the rule's switches)."""
    params, grads, var = _data(sum(map(ord, name)))
    ref = reference(name, hp, params, grads, var)
    arrays = [backend.asarray(p) for p in params]
    keys = [f"w{i}" for i in range(len(arrays))]
    wrap = (lambda xs: dict(zip(keys, xs))) if structure == "dict" else list
    opt = A.create(name, wrap(arrays), chunk_size=16, **hp)
    needs_var = bool(getattr(get_spec(name), "extras", ())) or False
    for t in range(STEPS):
        extras = {"grad_variance": wrap([backend.asarray(v) for v in var[t]])} if needs_var else {}
        opt.step(wrap([backend.asarray(g) for g in grads[t]]), **extras)
    assert opt.step_count == STEPS
    for i, a in enumerate(arrays):
        got = backend.to_numpy(a)
        tol = _tol(backend.name) if not isinstance(get_spec(name), MatrixSpec) or params[i].ndim < 2 else dict(rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got, ref[i], **tol, err_msg=f"{name} array {i} shape {params[i].shape}")


@pytest.mark.parametrize("name", registry_cases.names())
def test_maximize_matches_core(name: str) -> None:
    params, grads, var = _data(7)
    ref = reference(name, settings(name), params, grads, var, maximize=True)
    arrays = [p.copy() for p in params]
    opt = A.create(name, arrays, maximize=True, chunk_size=16, **settings(name))
    for g, v in zip(grads, var):
        opt.step(g, **({"grad_variance": v} if getattr(get_spec(name), "extras", ()) else {}))
    for a, r in zip(arrays, ref):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-14)


def test_adamw_closed_form() -> None:
    """AdamW from its pseudo-code (Loshchilov & Hutter Alg. 2, torch convention), float64 NumPy."""
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-8, 0.1
    params, grads, _ = _data(3)
    arrays = [p.copy() for p in params]
    opt = A.AdamW(arrays, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, chunk_size=16)
    for i, p0 in enumerate(params):
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for t in range(1, STEPS + 1):
            g = grads[t - 1][i]
            p = p * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        params[i] = p
    for g in grads:
        opt.step(g)
    for a, r in zip(arrays, params):
        np.testing.assert_allclose(a, r, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "name,torch_cls,hp,torch_hp",
    [
        ("adam", "Adam", dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1)),
        ("adamw", "AdamW", dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, weight_decay=0.1)),
        ("sgd", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ],
)
def test_matches_torch_optim(name: str, torch_cls: str, hp: dict, torch_hp: dict) -> None:
    torch = pytest.importorskip("torch")
    params, grads, _ = _data(11)
    arrays = [p.copy() for p in params]
    opt = A.create(name, arrays, chunk_size=16, **hp)
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = getattr(torch.optim, torch_cls)(tparams, foreach=False, **torch_hp)
    for g in grads:
        opt.step(g)
        for tp, gi in zip(tparams, g):
            tp.grad = torch.tensor(gi)
        topt.step()
    for a, tp in zip(arrays, tparams):
        np.testing.assert_allclose(a, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(SPECS))
def test_functional_matches_stateful_and_is_pure(name: str) -> None:
    hp = settings(name)
    params, grads, var = _data(5)
    tx = A.functional(name, **hp)
    cur = [p.copy() for p in params]
    state = tx.init(cur)
    arrays = [p.copy() for p in params]
    opt = A.create(name, arrays, chunk_size=16, **hp)
    needs_var = bool(getattr(get_spec(name), "extras", ()))
    for t in range(STEPS):
        extras = {"grad_variance": var[t]} if needs_var else {}
        before = [c.copy() for c in cur]
        g_before = [g.copy() for g in grads[t]]
        new, state = tx.update(grads[t], state, cur, **extras)
        for c, b in zip(cur, before):
            np.testing.assert_array_equal(c, b)  # inputs untouched
        for g, b in zip(grads[t], g_before):
            np.testing.assert_array_equal(g, b)
        cur = new
        opt.step(grads[t], **extras)
    assert state["step"] == STEPS
    for a, c in zip(arrays, cur):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-14)
    # The functional state has the checkpoint layout: it loads into the stateful optimizer.
    sd = opt.state_dict()
    for k, entry in sd["state"].items():
        for n, v in entry.items():
            ref = state["state"][k][n]
            if v is None:
                assert ref is None
            else:
                np.testing.assert_allclose(v, np.asarray(ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["adamw", "mvngrad", "muon"])
def test_functional_on_jax_arrays(name: str) -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    hp = settings(name)
    params, grads, var = _data(9)
    ref = reference(name, hp, params, grads, var)
    with jax.enable_x64(True):
        tx = A.functional(name, **hp)
        cur = {f"p{i}": jnp.asarray(p) for i, p in enumerate(params)}
        state = tx.init(cur)
        for t in range(STEPS):
            cur, state = tx.update({f"p{i}": jnp.asarray(g) for i, g in enumerate(grads[t])}, state, cur)
        for i, r in enumerate(ref):
            assert cur[f"p{i}"].dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(cur[f"p{i}"]), r, rtol=1e-12, atol=1e-14)
