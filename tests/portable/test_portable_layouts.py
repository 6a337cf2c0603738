"""Orientation: torch's ``(out, in)`` weights, flax ``(in, out)`` kernels, flax conv kernels ``(kh, kw, in, out)``
and the NumPy adapter's ``layout="in_out"`` all meet in the portable layout.

Each test moves a torch state to the other framework, takes one more step there and one in torch from the same
state with the same gradients (transposed as the framework holds them), and compares (float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from xpoptim.adapters import numpy as xn
from xpoptim.adapters import optax as xo
from xpoptim.adapters import torch as xt

CONV_DIMS = xo.DimensionNumbers(reduction_axis=(2, 0, 1), output_axis=3)  # (kh, kw, in, out) as torch's (out, in*kh*kw)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.head = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


def _grads(model, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _to_flax(tensors):
    """torch tensors -> a flax-style tree: conv (out, in, kh, kw) -> (kh, kw, in, out), linear (out, in) -> (in, out)."""
    return {
        "conv": {"kernel": jnp.asarray(tensors["conv.weight"].permute(2, 3, 1, 0).numpy()), "bias": jnp.asarray(tensors["conv.bias"].numpy())},
        "head": {"kernel": jnp.asarray(tensors["head.weight"].T.numpy()), "bias": jnp.asarray(tensors["head.bias"].numpy())},
    }


@pytest.mark.parametrize("name", ["muon", "deva_sinf", "adamw"])
def test_flax_conv_kernel_and_fallback_head(name, x64):
    torch.manual_seed(0)
    model = Net().double()
    groups = xt.matrix_param_groups(model, name) if name != "adamw" else model.parameters()
    opt = xt.create(name, groups, lr=0.02, compile=False)
    for t in range(3):
        _grads(model, t)
        opt.step()
    portable = opt.export_state(model.named_parameters())
    if name != "adamw":
        assert portable.params["head.weight"].rule == portable.fallback  # the head goes to the fallback rule
    params = _to_flax({n: p.detach() for n, p in model.named_parameters()})
    dims = {"conv": {"kernel": CONV_DIMS, "bias": None}, "head": {"kernel": None, "bias": None}}
    tx = xo.create(name, lr=0.02, **({"dimension_numbers": dims} if name != "adamw" else {}))
    renamed = portable.rename(lambda n: n.replace("weight", "kernel"))
    state = xo.import_state(renamed, params, tx, dimension_numbers=dims)
    back = xo.export_state(state, params, optimizer=name, dimension_numbers=dims)
    for n, ps in renamed.params.items():
        assert back.params[n].shape == ps.shape
        for k, v in ps.state.items():
            assert (v is None) == (back.params[n].state[k] is None)
            if v is not None:
                np.testing.assert_array_equal(back.params[n].state[k], v)
    g = _grads(model, 3)
    opt.step()
    u, _ = tx.update(_to_flax(g), state, params)
    new = _to_flax({n: p.detach() for n, p in model.named_parameters()})
    for a, b in zip(jax.tree.leaves(optax.apply_updates(params, u)), jax.tree.leaves(new)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["muon", "deva_sinf", "mvngrad"])
def test_numpy_in_out_layout(name):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    opt = xt.create(name, list(model.named_parameters()), lr=0.02, compile=False)

    def grads(t):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        return {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}

    for t in range(3):
        grads(t)
        opt.step()
    flip = lambda n, a: a.T.copy() if n.endswith("weight") else a.copy()  # noqa: E731
    arrays = {n: flip(n, p.detach().numpy()) for n, p in model.named_parameters()}
    mine = xn.create(name, arrays, lr=0.02, layout="in_out")
    mine.import_state(opt.export_state())
    g = grads(3)
    opt.step()
    mine.step({n: flip(n, v) for n, v in g.items()})
    for n, p in model.named_parameters():
        np.testing.assert_allclose(flip(n, arrays[n]), p.detach().numpy(), rtol=0, atol=1e-13)
