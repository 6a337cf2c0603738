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

import registry_cases
from test_optax_contract import _INJECT

from xpoptim.adapters import optax as xo
from xpoptim.core import ELEMENTWISE, SPECS

PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.linspace(-1.0, 1.0, 4)}
GRADS = {"w": jnp.full((3, 4), 0.5), "b": jnp.array([0.1, -0.2, 0.3, -0.4])}
ALL = list(SPECS)


def _extra(name: str, tree=GRADS) -> dict:
    return {"grad_variance": jax.tree.map(lambda g: jnp.full(g.shape, 0.01, g.dtype), tree)} if getattr(SPECS[name], "extras", ()) else {}


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
        # the same value; the float64 lr array multiplies before the cast back to float32 (one rounding apart)
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# inject_hyperparams keeps the state structure
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("mask", [None, {"w": True, "b": False}], ids=["no-mask", "mask"])
def test_inject_hyperparams_keeps_the_state_structure_and_checkpoints_restore(name, mask):
    """``alias(weight_decay=0.0)`` and the same alias under ``inject_hyperparams`` (where 0 is a traced array and the
    decay stage must exist) have one state structure, so a checkpoint of one continues in the other. Hyperparameters
    exactly representable in float32, so both compute the same scalars."""
    hp = {**_INJECT[name], "weight_decay": 0.0}
    alias = getattr(xo, name)
    plain = alias(**hp, mask=mask)
    injected = optax.inject_hyperparams(alias)(**hp, mask=mask)
    s_plain = plain.init(PARAMS)
    s_inj = injected.init(PARAMS)
    assert jax.tree.structure(s_plain) == jax.tree.structure(s_inj.inner_state)
    _, s_plain = plain.update(GRADS, s_plain, PARAMS, **_extra(name))
    restored = s_inj._replace(inner_state=jax.tree.unflatten(jax.tree.structure(s_inj.inner_state), jax.tree.leaves(s_plain)))
    u_plain, _ = plain.update(GRADS, s_plain, PARAMS, **_extra(name))
    u_inj, _ = injected.update(GRADS, restored, PARAMS, **_extra(name))
    for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_inj)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # the tolerance of test_inject_hyperparams_equivalence


# ------------------------------------------------------------------------------------------------------------------
# Traced hyperparameters: the NaN guard
# ------------------------------------------------------------------------------------------------------------------


def _jitted_step(tx):
    @jax.jit
    def step(params, state):
        updates, state = tx.update(GRADS, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


INVALID_TRACED = [
    ("adamw", "learning_rate", -1.0), ("adamw", "beta1", 1.5), ("adamw", "beta2", math.nan), ("adamw", "eps", -1e-8),
    ("mvngrad", "learning_rate", math.inf), ("msvag", "mu", 1.0), ("sgd", "momentum", -0.5),
    ("adam", "weight_decay", -0.1), ("deva_linf", "beta1", 2.0),
]


def _injected_with(name: str, arg: str, value: float):
    tx = optax.inject_hyperparams(getattr(xo, name))(learning_rate=1e-2)
    state = tx.init(PARAMS)
    state.hyperparams[arg] = jnp.asarray(value, state.hyperparams[arg].dtype)
    return tx, state


@pytest.mark.parametrize(("name", "arg", "value"), INVALID_TRACED)
def test_invalid_traced_hyperparameter_gives_nan_updates(name, arg, value):
    tx, state = _injected_with(name, arg, value)
    _, new_state, updates = _jitted_step(tx)(PARAMS, state)
    assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(updates)), (name, arg, value)
    # the rule's state stays as it was (a bad value does not poison the moments); the counter too
    for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
        if arg in ("learning_rate", "weight_decay"):
            assert bool(jnp.all(jnp.isfinite(a)))  # used outside the rule: the rule's step went ahead
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("name", "arg", "value"), INVALID_TRACED[:3])
def test_apply_if_finite_after_the_optimizer_skips_the_nan_update(name, arg, value):
    tx, _ = _injected_with(name, arg, value)
    safe = optax.chain(tx, optax.apply_if_finite(optax.identity(), max_consecutive_errors=3))
    state = safe.init(PARAMS)
    state[0].hyperparams[arg] = jnp.asarray(value, state[0].hyperparams[arg].dtype)
    new_params, state, _ = _jitted_step(safe)(PARAMS, state)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(a, b)
    assert int(state[1].notfinite_count) == 1


@pytest.mark.parametrize(("name", "arg", "value"), INVALID_TRACED[:4])
def test_checkify_names_the_invalid_traced_hyperparameter(name, arg, value):
    from jax.experimental import checkify

    tx, state = _injected_with(name, arg, value)
    err, _ = checkify.checkify(_jitted_step(tx))(PARAMS, state)
    with pytest.raises(checkify.JaxRuntimeError, match=rf"an injected hyperparameter is invalid: .*{'lr' if arg == 'learning_rate' else arg}="):
        err.throw()
    tx, state = _injected_with(name, arg, 0.5 if arg != "learning_rate" else 1e-2)
    err, _ = checkify.checkify(_jitted_step(tx))(PARAMS, state)
    assert err.get() is None


@pytest.mark.parametrize("name", list(_INJECT))
def test_valid_traced_hyperparameters_are_not_touched_by_the_guard(name):
    hp = _INJECT[name]
    alias = getattr(xo, name)
    tx = optax.inject_hyperparams(alias)(**hp)
    plain = alias(**hp)
    square = SPECS[name].kind == "matrix"  # a square matrix: full-rank DeVA_Sinf factors
    params = {"w": jnp.ones((4, 4)), "b": PARAMS["b"]} if square else PARAMS
    grads = {"w": jnp.full((4, 4), 0.5), "b": GRADS["b"]} if square else GRADS
    st, sp = tx.init(params), plain.init(params)

    @jax.jit
    def both(st, sp):
        a, _ = tx.update(grads, st, params, **_extra(name, grads))
        b, _ = plain.update(grads, sp, params, **_extra(name, grads))
        return a, b

    a, b = both(st, sp)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert bool(jnp.all(jnp.isfinite(x)))
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------------
# grad_variance
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", registry_cases.minibatch_names())
@pytest.mark.parametrize("bad", [-1e-3, math.nan])
def test_concrete_negative_or_nan_grad_variance_is_refused(name, bad):
    tx = xo.create(name, lr=1e-2)
    state = tx.init(PARAMS)
    var = {"w": jnp.full((3, 4), 0.01).at[1, 2].set(bad), "b": jnp.full(4, 0.01)}
    with pytest.raises(ValueError, match=r"grad_variance leaf \['w'\] holds .*expected a per-element variance >= 0"):
        tx.update(GRADS, state, PARAMS, grad_variance=var)


@pytest.mark.parametrize("name", registry_cases.minibatch_names())
def test_traced_negative_grad_variance_gives_nan_for_that_element(name):
    tx = xo.create(name, lr=1e-2)
    state = tx.init(PARAMS)
    var = {"w": jnp.full((3, 4), 0.01).at[1, 2].set(-1e-3), "b": jnp.full(4, 0.01)}
    updates, _ = jax.jit(lambda g, s, p, v: tx.update(g, s, p, grad_variance=v))(GRADS, state, PARAMS, var)
    w = np.asarray(updates["w"])
    assert np.isnan(w[1, 2]) and np.isfinite(np.delete(w.reshape(-1), 6)).all()
    assert np.isfinite(np.asarray(updates["b"])).all()


@pytest.mark.parametrize(("name", "arg", "value"), [("muon", "momentum", 1.5), ("muon", "learning_rate", -1.0),
                                                    ("deva_sinf", "beta2", math.nan), ("deva_sinf", "weight_decay", -1.0)])
def test_invalid_traced_hyperparameter_of_a_matrix_rule_gives_nan_matrix_updates(name, arg, value):
    """The matrix leaves get NaN updates. The fallback rule's leaves keep finite updates when the invalid value is
    one the fallback does not use; its learning rate follows the matrix rule's, so an invalid ``learning_rate`` makes
    its updates NaN too."""
    tx, state = _injected_with(name, arg, value)
    step = _jitted_step(tx)
    params = PARAMS
    for _ in range(2):  # DeVA_Sinf's first call only seeds its preconditioner
        params, state, updates = step(params, state)
    assert bool(jnp.all(jnp.isnan(updates["w"])))
    fallback_uses_it = arg == "learning_rate"
    assert bool(jnp.all(jnp.isnan(updates["b"]) if fallback_uses_it else jnp.isfinite(updates["b"])))
