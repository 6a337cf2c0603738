"""A small real training run in JAX: a 64-32-10 MLP on scikit-learn's bundled digits, every optimizer.

Weights use flax's (in, out) kernel layout, so Muon / DeVA_Sinf take the kernels and their fallback the biases.
The mini-batch variants get their per-element gradient variance from ``per_example_grad_variance`` (jax.vmap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xpoptim.adapters import optax as xo
from xpoptim.core import SPECS

import registry_cases

STEPS = 60
BATCH = 64

load_digits = pytest.importorskip("sklearn.datasets", reason="the digits training tests need scikit-learn (installed by the test extra)").load_digits


@pytest.fixture(scope="module")
def data():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _init(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.standard_normal((64, 32)) / 8, jnp.float32),
        "b1": jnp.zeros((32,), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((32, 10)) / np.sqrt(32), jnp.float32),
        "b2": jnp.zeros((10,), jnp.float32),
    }


def _loss_one(p, example):
    x, y = example
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return -jax.nn.log_softmax(logits)[y]


def _loss(p, x, y):
    return jnp.mean(jax.vmap(_loss_one, in_axes=(None, 0))(p, (x, y)))


@pytest.mark.parametrize("name", list(SPECS))
def test_loss_falls(name, data):
    x, y = data
    # The registry's training learning rate (the spec's verification.train_lr; sign-type and normalised rules move every
    # weight by ~lr per step, so each rule carries its own).
    tx = xo.create(name, lr=registry_cases.train_lr(name))
    params = _init()
    state = tx.init(params)
    mb = bool(getattr(SPECS[name], "extras", ()))

    @jax.jit
    def step(params, state, xb, yb):
        if mb:
            loss, g, var = xo.per_example_grad_variance(_loss_one, params, (xb, yb))
            u, state = tx.update(g, state, params, grad_variance=var)
        else:
            loss, g = jax.value_and_grad(_loss)(params, xb, yb)
            u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    full0 = float(_loss(params, x, y))
    rng = np.random.default_rng(1)
    for _ in range(STEPS):
        idx = rng.choice(x.shape[0], BATCH, replace=False)
        params, state, _ = step(params, state, x[idx], y[idx])
    full1 = float(_loss(params, x, y))
    assert step._cache_size() == 1
    assert np.isfinite(full1)
    assert full1 < 0.7 * full0, f"{name}: full-data loss {full0:.3f} -> {full1:.3f}"
