"""The fallback rule of Muon / DeVA_Sinf takes the optimizer's learning rate unless one is given for it.

The rule (``MatrixSpec.fallback_defaults``): the fallback's ``lr`` is the optimizer's ``lr`` (the same value, a
schedule included), overridden by ``fallback_hyperparams={"lr": ...}`` or a param group's own ``lr``. Checked in
every adapter against closed forms: one AdamW step from zero state with betas (0.9, 0.95), eps 1e-10 and no decay
moves a parameter by ``-lr g / (|g| + 1e-10)``; DeVA_Sinf's fallback against a DeVALinf optimizer built with that
learning rate.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from xpoptim.adapters import numpy as xn
from xpoptim.adapters import optax as xo
from xpoptim.adapters import torch as xt

G = np.array([0.5, -2.0, 1e-3])


def adamw_first_step(b0: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
    """Closed form of one AdamW step from zero state (bias corrections make m_hat = g, v_hat = g^2)."""
    return b0 - lr * g / (np.abs(g) + 1e-10)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()


@pytest.mark.parametrize("given", [None, 1e-4])
def test_torch_muon_fallback_follows_lr(given):
    model = _model()
    fb = {"lr": given} if given is not None else None
    opt = xt.Muon(xt.matrix_param_groups(model, fallback_hyperparams=fb), lr=5e-3, compile=False)
    want = 5e-3 if given is None else given
    assert [g["lr"] for g in opt.param_groups] == [5e-3, want]
    b = model[2].bias
    b0 = b.detach().numpy().copy()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    b.grad = torch.tensor(G)
    opt.step()
    np.testing.assert_allclose(b.detach().numpy(), adamw_first_step(b0, G, want), rtol=1e-15, atol=1e-15)


def test_torch_fallback_group_with_its_own_lr_and_plain_tensors():
    model = _model()
    groups = xt.matrix_param_groups(model)
    groups[1]["lr"] = 2e-3
    assert xt.Muon(groups, lr=5e-3).param_groups[1]["lr"] == 2e-3
    assert xt.Muon(_model().parameters(), lr=5e-3).param_groups[1]["lr"] == 5e-3  # routed by ndim
    opt = xt.DeVASinf(xt.matrix_param_groups(_model(), "deva_sinf"), lr=0.01)
    assert opt.param_groups[1]["rule"] == "deva_linf" and opt.param_groups[1]["lr"] == 0.01
    opt = xt.Muon(xt.matrix_param_groups(_model(), fallback="sgd"), lr=0.01)
    assert opt.param_groups[1]["lr"] == 0.01  # another fallback rule follows too
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.005, 0.005]


def _jax_params():
    return {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros(3, jnp.float32)}


@pytest.mark.parametrize("given", [None, 1e-4])
def test_optax_muon_fallback_follows_learning_rate(given):
    fb = {"learning_rate": given} if given is not None else None
    tx = xo.muon(learning_rate=5e-3, fallback_hyperparams=fb)
    params = _jax_params()
    grads = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.asarray(G, jnp.float32)}
    u, _ = tx.update(grads, tx.init(params), params)
    want = 5e-3 if given is None else given
    np.testing.assert_allclose(np.asarray(u["b"]), adamw_first_step(np.zeros(3), G, want), rtol=1e-6)


def test_optax_fallback_follows_a_schedule():
    sched = optax.linear_schedule(1e-2, 1e-3, 4)
    tx = xo.muon(learning_rate=sched)
    params = _jax_params()
    state = tx.init(params)
    grads = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.asarray(G, jnp.float32)}
    ref_tx = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.0)
    ref_state = ref_tx.init(params["b"])
    for _ in range(3):
        u, state = tx.update(grads, state, params)
        r, ref_state = ref_tx.update(grads["b"], ref_state, params["b"])
        np.testing.assert_allclose(np.asarray(u["b"]), np.asarray(r), rtol=2e-6)


def test_optax_deva_sinf_fallback_follows_learning_rate():
    params = _jax_params()
    grads = {"w": jnp.zeros((3, 4), jnp.float32), "b": jnp.asarray(G, jnp.float32)}
    u, _ = xo.deva_sinf(learning_rate=0.01, weight_decay=0.0).update(grads, xo.deva_sinf(learning_rate=0.01).init(params), params)
    r, _ = xo.deva_linf(learning_rate=0.01).update(grads["b"], xo.deva_linf().init(params["b"]), params["b"])
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(r))


@pytest.mark.parametrize("given", [None, 1e-4])
def test_numpy_muon_fallback_follows_lr(given):
    fb = {"lr": given} if given is not None else None
    params = {"w": np.ones((3, 4)), "b": np.zeros(3)}
    opt = xn.Muon(params, lr=5e-3, fallback_hyperparams=fb)
    opt.step({"w": np.zeros((3, 4)), "b": G.copy()})
    want = 5e-3 if given is None else given
    np.testing.assert_allclose(params["b"], adamw_first_step(np.zeros(3), G, want), rtol=1e-15, atol=1e-15)


def test_numpy_fallback_follows_set_hyperparams_and_deva():
    params = {"w": np.ones((3, 4)), "b": np.zeros(3)}
    opt = xn.Muon(params, lr=5e-3)
    opt.lr = 1e-2
    opt.step({"w": np.zeros((3, 4)), "b": G.copy()})
    np.testing.assert_allclose(params["b"], adamw_first_step(np.zeros(3), G, 1e-2), rtol=1e-15, atol=1e-15)
    pa, pb = {"w": np.ones((3, 4)), "b": np.zeros(3)}, {"b": np.zeros(3)}
    xn.DeVASinf(pa, lr=0.01).step({"w": np.zeros((3, 4)), "b": G.copy()})
    xn.DeVALinf(pb, lr=0.01).step({"b": G.copy()})
    np.testing.assert_array_equal(pa["b"], pb["b"])
