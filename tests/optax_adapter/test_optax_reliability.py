"""optax adapter, bad input: clear errors instead of JAX internals or silent wrong numbers, and the traced-value
policy under ``jax.jit`` (documented in ``docs/reliability.md``).

* complex and integer leaves are refused (a complex Adam would use ``g * g`` for ``|g|^2``; an integer leaf would
  get a zero or whole-number update), naming the leaf and its dtype;
* updates of another structure or shape than the params / state: a ``ValueError`` naming the leaf;
* ``optax.inject_hyperparams`` keeps the state's tree structure (a checkpoint of one restores into the other);
* a traced ``lr = -1``, ``beta1 = 1.5`` or NaN makes the update NaN (``optax.apply_if_finite`` skips it);
* a negative or NaN ``grad_variance`` is refused when concrete, and gives NaN for its elements when traced.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xpoptim.adapters import optax as xo
from xpoptim.core import ELEMENTWISE, SPECS

PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.linspace(-1.0, 1.0, 4)}
GRADS = {"w": jnp.full((3, 4), 0.5), "b": jnp.array([0.1, -0.2, 0.3, -0.4])}
ALL = list(SPECS)


def _extra(name: str, tree=GRADS) -> dict:
    return {"grad_variance": jax.tree.map(lambda g: jnp.full(g.shape, 0.01, g.dtype), tree)} if SPECS[name].extras else {}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.int32, jnp.bool_])
def test_complex_and_integer_leaves_are_refused_at_init(name, dtype):
    tx = xo.create(name, lr=1e-2)
    params = {"w": jnp.ones((3, 4), dtype), "b": jnp.ones(4)}
    with pytest.raises(TypeError, match=rf"params leaf \['w'\] has dtype {jnp.dtype(dtype)}: expected a real floating"):
        tx.init(params)


@pytest.mark.parametrize("name", ALL)
def test_complex_updates_are_refused(name):
    tx = xo.create(name, lr=1e-2)
    state = tx.init(PARAMS)
    grads = {"w": GRADS["w"].astype(jnp.complex64), "b": GRADS["b"]}
    with pytest.raises(TypeError, match=r"updates leaf \['w'\] has dtype complex64"):
        tx.update(grads, state, PARAMS, **_extra(name))


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_scale_by_refuses_complex_leaves(name):
    tx = getattr(xo, f"scale_by_{name}")()
    with pytest.raises(TypeError, match=r"complex64.*real and imaginary"):
        tx.init({"w": jnp.ones(3, jnp.complex64)})


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    ("grads", "message"),
    [
        ({"w": jnp.ones((4, 3)), "b": GRADS["b"]}, r"leaf \['w'\] has shape \(4, 3\): expected \(3, 4\)"),
        ({"w": GRADS["w"]}, r"missing leaves \[\"\['b'\]\"\]"),
        ({"w": GRADS["w"], "b": GRADS["b"], "c": jnp.ones(2)}, r"structure"),
    ],
    ids=["shape", "missing", "extra"],
)
def test_structure_and_shape_mismatches_name_the_leaf(name, grads, message):
    tx = xo.create(name, lr=1e-2)
    state = tx.init(PARAMS)
    params = PARAMS if "c" not in grads else {**PARAMS, "c": jnp.ones(2)}
    with pytest.raises(ValueError, match=message) as info:
        tx.update(grads, state, params, **_extra(name, grads))
    assert "MaskedNode" not in str(info.value) and str(info.value).startswith(SPECS[name].title)


def test_state_from_other_params_under_a_mask_is_a_clear_error():
    """The symptom users met: ``'MaskedNode' object has no attribute 'dtype'`` from a state built on other params."""
    tx = optax.masked(xo.adamw(1e-2), {"w": True, "b": False})
    state = tx.init(PARAMS)
    other_mask_tx = optax.masked(xo.adamw(1e-2), {"w": False, "b": True})
    with pytest.raises(ValueError, match="AdamW: updates leaf") as info:
        other_mask_tx.update(GRADS, state, PARAMS)
    assert "MaskedNode' object" not in str(info.value)


@pytest.mark.parametrize("value", [1e-3 + 0j, np.array([1e-3, 2e-3]), object(), None, np.array([1e-3 + 0j])], ids=repr)
@pytest.mark.parametrize("name", ["adamw", "msvag", "muon", "deva_sinf"])
def test_non_real_hyperparameters_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=r"lr=.* is invalid: got .*; expected a real number >= 0"):
        xo.create(name, lr=value)


def test_one_element_hyperparameters_are_accepted():
    tx = xo.adamw(np.array([1e-2]), beta1=jnp.asarray(0.9))
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    ref, _ = xo.adamw(1e-2).update(GRADS, xo.adamw(1e-2).init(PARAMS), PARAMS)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------------------------
# inject_hyperparams keeps the state structure
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("mask", [None, {"w": True, "b": False}], ids=["no-mask", "mask"])
def test_inject_hyperparams_keeps_the_state_structure_and_checkpoints_restore(name, mask):
    alias = getattr(xo, name)
    plain = alias(1e-2, weight_decay=0.0, mask=mask)
    injected = optax.inject_hyperparams(alias)(learning_rate=1e-2, weight_decay=0.0, mask=mask)
    s_plain = plain.init(PARAMS)
    s_inj = injected.init(PARAMS)
    assert jax.tree.structure(s_plain) == jax.tree.structure(s_inj.inner_state)
    # a checkpoint of the plain alias, taken after one step, continues under the injected one with the same numbers
    u1, s_plain = plain.update(GRADS, s_plain, PARAMS, **_extra(name))
    restored = s_inj._replace(inner_state=jax.tree.unflatten(jax.tree.structure(s_inj.inner_state), jax.tree.leaves(s_plain)))
    u_plain, _ = plain.update(GRADS, s_plain, PARAMS, **_extra(name))
    u_inj, _ = injected.update(GRADS, restored, PARAMS, **_extra(name))
    for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_inj)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Traced hyperparameters: the NaN guard
# ------------------------------------------------------------------------------------------------------------------


def _jitted_step(tx):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(GRADS, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


@pytest.mark.parametrize(
    ("name", "arg", "value"),
    [("adamw", "learning_rate", -1.0), ("adamw", "beta1", 1.5), ("adamw", "beta2", math.nan), ("adamw", "eps", -1e-8),
     ("mvngrad", "learning_rate", math.inf), ("msvag", "mu", 1.0), ("sgd", "momentum", -0.5),
     ("adam", "weight_decay", -0.1), ("deva_linf", "beta1", 2.0)],
)
def test_invalid_traced_hyperparameter_gives_nan_updates_that_apply_if_finite_skips(name, arg, value):
    alias = getattr(xo, name)
    tx = optax.inject_hyperparams(alias)(learning_rate=1e-2)
    state = tx.init(PARAMS)
    state.hyperparams[arg] = jnp.asarray(value, state.hyperparams[arg].dtype)
    _, _, updates = _jitted_step(tx)(PARAMS, state)
    assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(updates)), (name, arg, value)
    # optax.apply_if_finite leaves the parameters where they were
    safe = optax.apply_if_finite(tx, max_consecutive_errors=3)
    s = safe.init(PARAMS)
    s.inner_state.hyperparams[arg] = jnp.asarray(value, s.inner_state.hyperparams[arg].dtype)
    new_params, s, _ = _jitted_step(safe)(PARAMS, s)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(a, b)
    assert int(s.notfinite_count) == 1


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_valid_traced_hyperparameters_are_not_touched_by_the_guard(name):
    alias = getattr(xo, name)
    tx = optax.inject_hyperparams(alias)(learning_rate=1e-2)
    plain = alias(1e-2)
    st, sp = tx.init(PARAMS), plain.init(PARAMS)

    @jax.jit
    def both(st, sp):
        a, _ = tx.update(GRADS, st, PARAMS, **_extra(name))
        b, _ = plain.update(GRADS, sp, PARAMS, **_extra(name))
        return a, b

    a, b = both(st, sp)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert bool(jnp.all(jnp.isfinite(x)))
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# grad_variance
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["msvag_mb", "adam_star_mb"])
@pytest.mark.parametrize("bad", [-1e-3, math.nan])
def test_concrete_negative_or_nan_grad_variance_is_refused(name, bad):
    tx = xo.create(name, lr=1e-2)
    state = tx.init(PARAMS)
    var = {"w": jnp.full((3, 4), 0.01).at[1, 2].set(bad), "b": jnp.full(4, 0.01)}
    with pytest.raises(ValueError, match=r"grad_variance leaf \['w'\] holds .*expected a per-element variance >= 0"):
        tx.update(GRADS, state, PARAMS, grad_variance=var)


@pytest.mark.parametrize("name", ["msvag_mb", "adam_star_mb"])
def test_traced_negative_grad_variance_gives_nan_for_that_element(name):
    tx = xo.create(name, lr=1e-2)
    state = tx.init(PARAMS)
    var = {"w": jnp.full((3, 4), 0.01).at[1, 2].set(-1e-3), "b": jnp.full(4, 0.01)}
    updates, _ = jax.jit(lambda g, s, p, v: tx.update(g, s, p, grad_variance=v))(GRADS, state, PARAMS, var)
    w = np.asarray(updates["w"])
    assert np.isnan(w[1, 2]) and np.isfinite(np.delete(w.reshape(-1), 6)).all()
    assert np.isfinite(np.asarray(updates["b"])).all()
