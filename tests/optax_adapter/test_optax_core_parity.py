"""Every optimizer through optax (jitted, float64) follows the same trajectory as

* ``xpoptim.core.functional.step`` on NumPy (checks the adapter's plumbing: in-graph step scalars, decay order,
  layout, routing, the DeVA_Sinf seed/refresh switch), to ~1e-12, and
* the independent float64 references in ``tests/references/optimizers.py`` (written from the spec's pseudo-code),
  or the reference a user rule registers (``registry_cases.reference``).

The rules come from the registry (``registry_cases``), so a rule registered with ``--xpoptim-rules`` runs here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import registry_cases
from _optax_problems import BATCH, init_params, leaf_grad, per_example
from xpoptim.adapters import optax as xo
from xpoptim.core import SPECS, functional

STEPS = 25
ELEMENTWISE = registry_cases.elementwise_names()
MATRIX = registry_cases.matrix_names()
MB = registry_cases.minibatch_names()
SHAPES = {"kernel": (6, 4), "bias": (4,), "cube": (3, 2, 2)}


def _hp(name: str) -> dict:
    return {"lr": 1e-2, "weight_decay": 0.05}  # every rule has both (xpoptim.core.register checks it)


def _grads(name: str, params: dict, t: int) -> tuple:
    """(mean gradient tree, per-example tree or None) in NumPy float64."""
    if name in MB:
        pe = {k: per_example(k, np.asarray(v), t) for k, v in params.items()}
        return {k: v.mean(axis=0) for k, v in pe.items()}, pe
    return {k: leaf_grad(k, np.asarray(v), t) for k, v in params.items()}, None


def _run_optax(name: str, tx, params0: dict, steps: int = STEPS) -> list:
    params = jax.tree.map(jnp.asarray, params0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    traj = [jax.tree.map(np.asarray, params)]
    for t in range(1, steps + 1):
        g, pe = _grads(name, traj[-1], t)
        kw = {}
        if pe is not None:
            # Eq. 44, unbiased, written independently of the core: var(ddof=1) / |B|.
            kw["grad_variance"] = {k: v.var(axis=0, ddof=1) / BATCH for k, v in pe.items()}
        u, state = update(g, state, params, **kw)
        params = optax.apply_updates(params, u)
        traj.append(jax.tree.map(np.asarray, params))
    assert update._cache_size() == 1
    return traj


def _run_functional(spec_name: str, hp: dict, theta0: np.ndarray, leaf: str, name: str, layout: str = "in_out") -> list:
    spec = SPECS[spec_name]
    hp = spec.validate(**hp)
    state = functional.init(spec, theta0, hp)
    theta = theta0.copy()
    out = [theta]
    for t in range(1, STEPS + 1):
        if name in MB:
            pe = per_example(leaf, theta, t)
            g, extras = pe.mean(axis=0), (pe.var(axis=0, ddof=1) / BATCH,)
        else:
            g, extras = leaf_grad(leaf, theta, t), ()
        theta, state = functional.step(spec, theta, g, state, hp, t, extras=extras, layout=layout)
        out.append(theta)
    return out


def _reference(spec_name: str, hp: dict, theta0: np.ndarray, leaf: str, name: str) -> np.ndarray:
    run_reference = registry_cases.reference(spec_name)
    if run_reference is None:
        pytest.skip(registry_cases.NO_REFERENCE)
    if name in MB:
        return run_reference(theta0, lambda th, t: per_example(leaf, th, t), STEPS, hp, layout="in_out")
    return run_reference(theta0, lambda th, t: leaf_grad(leaf, th, t), STEPS, hp, layout="in_out")


def _close(a, b, rtol, what):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2, err_msg=what)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_trajectory_matches_core_and_reference(name, x64):
    params0 = init_params(SHAPES)
    hp = _hp(name)
    traj = _run_optax(name, xo.create(name, **hp), params0)
    for leaf, theta0 in params0.items():
        ours = np.stack([p[leaf] for p in traj])
        assert ours.dtype == np.float64
        core = np.stack(_run_functional(name, hp, theta0, leaf, name))
        _close(ours, core, 1e-12, f"{name}/{leaf} vs core.functional")
        ref = _reference(name, hp, theta0, leaf, name)
        _close(ours, ref, 1e-10, f"{name}/{leaf} vs independent reference")


#: A tall non-square kernel for every matrix rule: for DeVA_Sinf one Kronecker factor is then rank-deficient, and the
#: core's canonical null-space basis must make the result LAPACK-independent (the reference uses its own eigh).
KERNEL = (12, 5)


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_trajectory_matches_core_and_reference(name, x64):
    """The kernel takes the matrix rule in flax's (in, out) layout; bias and cube take the fallback."""
    spec = SPECS[name]
    params0 = init_params({"kernel": KERNEL, "bias": (4,), "cube": (3, 2, 2)})
    hp = {"lr": 1e-2, "weight_decay": 0.05}
    traj = _run_optax(name, xo.create(name, **hp), params0)
    ours = np.stack([p["kernel"] for p in traj])
    core = np.stack(_run_functional(name, hp, params0["kernel"], "kernel", name, layout="in_out"))
    _close(ours, core, 1e-12, f"{name} kernel vs core.functional")
    ref = _reference(name, hp, params0["kernel"], "kernel", name)
    _close(ours, ref, 1e-10, f"{name} kernel vs reference")
    fb_hp = {**SPECS[spec.fallback].defaults, **dict(spec.fallback_defaults), "lr": hp["lr"]}  # the fallback lr follows lr
    for leaf in ("bias", "cube"):
        ours = np.stack([p[leaf] for p in traj])
        core = np.stack(_run_functional(spec.fallback, fb_hp, params0[leaf], leaf, spec.fallback))
        _close(ours, core, 1e-12, f"{name} {leaf} (fallback {spec.fallback}) vs core.functional")


@pytest.mark.parametrize("name", MATRIX)
def test_dimension_numbers_batch_axes(name, x64):
    """A (2, in, out) leaf with batch axis 0 is two independent (in, out) matrices."""
    dims = xo.DimensionNumbers(reduction_axis=1, output_axis=2)
    params0 = init_params({"w": (2, *KERNEL)})
    hp = {"lr": 1e-2, "weight_decay": 0.05}
    traj = _run_optax(name, xo.create(name, **hp, dimension_numbers={"w": dims}), params0)
    ours = np.stack([p["w"] for p in traj])
    ref = _reference(name, hp, params0["w"], "w", name)  # the reference treats leading axes as a stack
    _close(ours, ref, 1e-10, f"{name} batched leaf vs reference")


def test_dimension_numbers_transposed_layout_equals_transpose(x64):
    """Torch's (out, in) layout via DimensionNumbers(1, 0) gives the transpose of the flax-layout trajectory."""
    p0 = init_params({"w": (6, 4)})
    pT = {"w": p0["w"].T.copy()}
    tx_a = xo.muon(1e-2, weight_decay=0.05)
    tx_b = xo.muon(1e-2, weight_decay=0.05, dimension_numbers={"w": xo.DimensionNumbers(1, 0)})
    a, b = jnp.asarray(p0["w"]), jnp.asarray(pT["w"])
    sa, sb = tx_a.init({"w": a}), tx_b.init({"w": b})
    for t in range(1, 6):
        g = leaf_grad("w", np.asarray(a), t)
        ua, sa = tx_a.update({"w": jnp.asarray(g)}, sa, {"w": a})
        ub, sb = tx_b.update({"w": jnp.asarray(g.T)}, sb, {"w": b})
        a, b = a + ua["w"], b + ub["w"]
    np.testing.assert_allclose(np.asarray(b), np.asarray(a).T, rtol=1e-12)
