"""Bad input to the optax adapter through its aliases, every optimizer, jitted: finite gradients of any size never
give NaN, 0-d and empty leaves step, a state of another optimizer is a clear error. The input checks themselves
(complex and integer leaves, structure and shape mismatches, the traced-hyperparameter guard, ``grad_variance``)
are in ``tests/optax_adapter/test_optax_reliability.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reliability._cases import GRADIENT_FILLS, ODD_SHAPES, OPTIMIZERS
from xpoptim.adapters import optax as xo
from xpoptim.core import SPECS

MB = tuple(n for n in OPTIMIZERS if getattr(SPECS[n], "extras", ()))
SUM_MOMENTUM_STEP = ("sgd", "msvag_mb")


def _extra(name, grads, value=0.01):
    return {"grad_variance": jax.tree.map(lambda g: jnp.full(g.shape, value, g.dtype), grads)} if name in MB else {}


def _run(name, params, grads_fn, steps=3, var=0.01):
    tx = xo.create(name, lr=1e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, **_extra(name, grads, var))
        return optax.apply_updates(params, updates), state

    for s in range(steps):
        params, state = step(params, state, grads_fn(s))
    return params, state


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_finite_float32_gradients_never_give_nan(name):
    """One jitted run per optimizer, a matrix and a vector leaf per gradient size (the leaves are independent)."""
    params = {f"{kind}_{fill}": jnp.ones(shape, jnp.float32) for fill in GRADIENT_FILLS for kind, shape in (("w", (4, 3)), ("b", (3,)))}
    rng = np.random.default_rng(0)

    def grads(s):
        return {k: jnp.asarray(np.where(rng.random(p.shape) < 0.5, -1.0, 1.0) * GRADIENT_FILLS[k[2:]], jnp.float32) for k, p in params.items()}

    tx_var = {k: 0.01 * min(GRADIENT_FILLS[k[2:]] ** 2, 1e30) for k in params}
    tx = xo.create(name, lr=1e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        extra = {"grad_variance": {k: jnp.full(g.shape, tx_var[k], g.dtype) for k, g in grads.items()}} if name in MB else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    for s in range(3):
        params, state = step(params, state, grads(s))
    for key, leaf in params.items():
        fill = key[2:]
        if name in SUM_MOMENTUM_STEP and fill == "near_max_f32":
            continue  # the momentum overflows, as torch.optim.SGD's (documented)
        if name == "deva_sinf" and key.startswith("w_") and GRADIENT_FILLS[fill] >= 1e20:
            # Kronecker factors G G^T beyond float32: XLA's eigh returns NaN inside the jitted step (documented; the
            # eager NumPy adapter raises FloatingPointError with nothing changed instead)
            assert bool(jnp.all(jnp.isnan(leaf)))
            continue
        assert bool(jnp.all(jnp.isfinite(leaf))), (name, key)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_size_and_0d_leaves_step(name):
    """Every odd leaf steps (a zero-size matrix of Muon / DeVA_Sinf is skipped: an empty update, as the torch and
    NumPy adapters skip it), and the other leaves get exactly the updates they get without the odd ones."""
    params = {**{k: jnp.ones(v, jnp.float32) for k, v in ODD_SHAPES.items()}, "w": jnp.ones((4, 3), jnp.float32)}
    rng = np.random.default_rng(0)
    grads = [{k: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for k, p in params.items()} for _ in range(3)]
    out, _ = _run(name, params, lambda s: grads[s])
    alone, _ = _run(name, {"w": params["w"]}, lambda s: {"w": grads[s]["w"]})
    for k, v in ODD_SHAPES.items():
        assert out[k].shape == v and bool(jnp.all(jnp.isfinite(out[k])))
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(alone["w"]))


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in ("muon", "deva_sinf")])
def test_a_state_of_another_optimizer_is_a_clear_error(name):
    params = {"w": jnp.ones((4, 3))}
    other = "adamw" if name != "adamw" else "adam"
    tx = getattr(xo, f"scale_by_{name}")()
    state = getattr(xo, f"scale_by_{other}")().init(params)
    with pytest.raises(TypeError, match=r"state is a ScaleBy\w+State: expected the ScaleBy\w+State built by this"):
        tx.update({"w": jnp.ones((4, 3))}, state, params, **_extra(name, params))
