"""equinox models with the optax adapter's matrix rules, and their portable state.

``eqx.filter(model, eqx.is_array)`` leaves ``None`` where a module holds no array (activation functions), and
equinox modules are callable pytrees. ``dimension_numbers`` may be given as a function of the parameters or as a
pytree (itself an ``eqx.Module``) of ``DimensionNumbers`` / ``None``: both must route exactly as the same arrays in
a plain dict with the dimension numbers written out per leaf (equinox's ``Linear.weight`` is ``(out, in)``:
``DimensionNumbers(reduction_axis=1, output_axis=0)``).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xpoptim.adapters import optax as xo

OUT_IN = xo.DimensionNumbers(reduction_axis=1, output_axis=0)


def _dims(p):
    return jax.tree.map(lambda x: OUT_IN if x.ndim == 2 else None, p)


def _model():
    model = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    return eqx.filter(model, eqx.is_array)


def _grads(params, t):
    return jax.tree.map(lambda x: jnp.sin(x * (t + 1)) + 0.1 * t, params)


def _run(tx, params, steps=3):
    state = tx.init(params)

    @jax.jit
    def step(params, state, t):
        u, state = tx.update(_grads(params, t), state, params)
        return optax.apply_updates(params, u), state

    for t in range(steps):
        params, state = step(params, state, t)
    return params, state


@pytest.mark.parametrize("name", ["muon", pytest.param("deva_sinf", marks=pytest.mark.slow)])  # DeVA: ~20 s of XLA compile
@pytest.mark.parametrize("form", ["callable", "pytree"])
def test_equinox_model_with_dimension_numbers(name, form):
    params = _model()
    assert len(jax.tree.leaves(params)) == 6  # and two None fields (the activations) in the tree
    dn = _dims if form == "callable" else _dims(params)
    assert callable(dn)  # an eqx.Module is callable: it must be read as a tree, not called
    got, _ = _run(xo.create(name, lr=1e-2, dimension_numbers=dn), params)
    leaves, treedef = jax.tree.flatten(params)
    flat = {str(i): x for i, x in enumerate(leaves)}
    ref_dims = {str(i): (OUT_IN if x.ndim == 2 else None) for i, x in enumerate(leaves)}
    ref, _ = _run(xo.create(name, lr=1e-2, dimension_numbers=ref_dims), flat)
    for a, (i, b) in zip(jax.tree.leaves(got), sorted(ref.items(), key=lambda kv: int(kv[0]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=i)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), leaves)]
    assert min(moved) > 0


def test_equinox_portable_state_is_torch_oriented():
    params = _model()
    tx = xo.muon(1e-2, dimension_numbers=_dims)
    params2, state = _run(tx, params)
    p = xo.export_state(state, params2, optimizer="muon", dimension_numbers=_dims)
    assert p.names == [f"layers.{i}.{w}" for i in range(3) for w in ("weight", "bias")]
    w = p.params["layers.1.weight"]
    assert (w.rule, w.shape, w.state["momentum_buffer"].shape) == ("muon", (4, 4), (4, 4))
    assert p.params["layers.2.weight"].shape == (2, 4)  # (out, in), as equinox and torch keep it
    back = xo.import_state(p, params2, tx, dimension_numbers=_dims)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mismatched_dimension_numbers_still_name_the_counts():
    params = _model()
    with pytest.raises(ValueError, match="dimension_numbers has 2 entries but the parameters have 6 leaves"):
        xo.muon(1e-2, dimension_numbers=[OUT_IN, None]).init(params)
