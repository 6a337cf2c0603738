"""The same optimizer in torch and in JAX: one problem, same init, same gradients, same trajectory (float64).

A torch ``Linear.weight`` is ``(out, in)``; the flax kernel is its transpose ``(in, out)``: the JAX run holds
``kernel = W.T`` and receives the transposed gradient, so Muon's and DeVA_Sinf's shape scales must agree through the
fan layout. The bias takes the matrix rules' elementwise fallback on both sides.

Skipped as a whole only while ``xpoptim.adapters.torch`` cannot be imported (it is written concurrently).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _optax_problems import BATCH, init_params, leaf_grad, per_example
from xpoptim.adapters import optax as xo
from xpoptim.core import SPECS

try:
    import torch

    xt = importlib.import_module("xpoptim.adapters.torch")
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure means "not there yet"
    xt, _IMPORT_ERROR = None, exc

pytestmark = pytest.mark.skipif(
    xt is None, reason=f"waits for xpoptim.adapters.torch to be importable (import failed: {_IMPORT_ERROR!r})"
)

STEPS = 12
MB = ("msvag_mb", "adam_star_mb")
OUT, IN = 5, 5  # square: DeVA_Sinf's null-space round-off (see test_optax_core_parity) would otherwise dominate


@pytest.mark.parametrize("name", list(SPECS))
def test_same_trajectory_in_torch_and_optax(name, x64):
    hp = {"lr": 1e-2}
    if "weight_decay" in SPECS[name].defaults:
        hp["weight_decay"] = 0.05
    p0 = init_params({"W": (OUT, IN), "b": (OUT,)})
    # torch side: Linear layout (out, in)
    w_t = torch.nn.Parameter(torch.tensor(p0["W"], dtype=torch.float64))
    b_t = torch.nn.Parameter(torch.tensor(p0["b"], dtype=torch.float64))
    opt = xt.create(name, [w_t, b_t], **hp)
    # JAX side: flax layout (in, out)
    params = {"kernel": jnp.asarray(p0["W"].T), "bias": jnp.asarray(p0["b"])}
    tx = xo.create(name, **hp)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(1, STEPS + 1):
        w_np = w_t.detach().numpy()
        if name in MB:
            pe_w, pe_b = per_example("W", w_np, t), per_example("b", b_t.detach().numpy(), t)
            gw, gb = pe_w.mean(0), pe_b.mean(0)
            vw, vb = pe_w.var(0, ddof=1) / BATCH, pe_b.var(0, ddof=1) / BATCH
        else:
            gw, gb = leaf_grad("W", w_np, t), leaf_grad("b", b_t.detach().numpy(), t)
        w_t.grad, b_t.grad = torch.tensor(gw), torch.tensor(gb)
        kw = {}
        if name in MB:
            opt.step(grad_variance={w_t: torch.tensor(vw), b_t: torch.tensor(vb)})
            kw = {"grad_variance": {"kernel": jnp.asarray(vw.T), "bias": jnp.asarray(vb)}}
        else:
            opt.step()
        u, state = update({"kernel": jnp.asarray(gw.T), "bias": jnp.asarray(gb)}, state, params, **kw)
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(np.asarray(params["kernel"]).T, w_t.detach().numpy(), rtol=1e-11, atol=1e-13,
                                   err_msg=f"{name} weight, step {t}")
        np.testing.assert_allclose(np.asarray(params["bias"]), b_t.detach().numpy(), rtol=1e-11, atol=1e-13,
                                   err_msg=f"{name} bias, step {t}")
