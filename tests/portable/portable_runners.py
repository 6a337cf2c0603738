"""Run a segment of training in one framework, starting from (and ending with) a portable state.

Each runner takes the parameters in torch orientation (NumPy), the optimizer and its hyperparameters, the
global step ``t0`` the segment starts after, and optionally a :class:`~xpoptim.portable.PortableState` to import;
it returns the parameters after every step, the losses, and the exported portable state.

* torch: ``xpoptim.adapters.torch`` with named parameters (Muon / DeVASinf route 2-D weights to the matrix rule
  and the biases to the fallback);
* JAX: ``xpoptim.adapters.optax`` on a flax-style tree ``{"0": {"kernel": (in, out), "bias"}, ...}``, jitted,
  the portable names mapped ``weight`` <-> ``kernel``;
* NumPy: ``xpoptim.adapters.numpy`` on a dict of arrays named as in torch.
"""

from __future__ import annotations

import numpy as np
import portable_problem as prob

from xpoptim.core import get_spec
from xpoptim.core.spec import ElementwiseSpec


def needs_variance(name: str) -> bool:
    spec = get_spec(name)
    return isinstance(spec, ElementwiseSpec) and bool(spec.extras)


def run_torch(name, hp, params, t0, steps, portable=None):
    import torch

    from xpoptim.adapters import torch as xt

    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = xt.create(name, list(tp.items()), **hp, compile=False)
    if portable is not None:
        opt.import_state(portable)
    traj, losses = [], []
    for t in range(t0 + 1, t0 + steps + 1):
        loss, g = prob.loss_and_grads({k: p.detach().numpy() for k, p in tp.items()}, t)
        for k, p in tp.items():
            p.grad = torch.from_numpy(g[k])
        var = {tp[k]: torch.from_numpy(v) for k, v in prob.grad_variance(g).items()} if needs_variance(name) else None
        opt.step(grad_variance=var)
        traj.append({k: p.detach().numpy().astype(np.float64) for k, p in tp.items()})
        losses.append(loss)
    return {k: p.detach().numpy().copy() for k, p in tp.items()}, traj, losses, opt.export_state()


def _to_tree(params):
    import jax.numpy as jnp

    return {
        layer: {"kernel": jnp.asarray(params[f"{layer}.weight"].T), "bias": jnp.asarray(params[f"{layer}.bias"])}
        for layer in ("0", "2")
    }


def _from_tree(tree):
    out = {}
    for layer, d in tree.items():
        out[f"{layer}.weight"] = np.asarray(d["kernel"]).T.copy()
        out[f"{layer}.bias"] = np.asarray(d["bias"]).copy()
    return out


def run_jax(name, hp, params, t0, steps, portable=None):
    import jax
    import optax

    from xpoptim.adapters import optax as xo

    tree = _to_tree(params)
    tx = xo.create(name, **hp)
    state = tx.init(tree)
    if portable is not None:
        state = xo.import_state(portable.rename(lambda n: n.replace("weight", "kernel")), tree, tx)

    @jax.jit
    def update(g, state, tree, var):
        extra = {"grad_variance": var} if var is not None else {}
        u, state = tx.update(g, state, tree, **extra)
        return optax.apply_updates(tree, u), state

    traj, losses = [], []
    for t in range(t0 + 1, t0 + steps + 1):
        loss, g = prob.loss_and_grads(_from_tree(tree), t)
        var = _to_tree(prob.grad_variance(g)) if needs_variance(name) else None
        tree, state = update(_to_tree(g), state, tree, var)
        traj.append({k: v.astype(np.float64) for k, v in _from_tree(tree).items()})
        losses.append(loss)
    out = xo.export_state(state, tree, optimizer=name).rename(lambda n: n.replace("kernel", "weight"))
    return _from_tree(tree), traj, losses, out


def run_numpy(name, hp, params, t0, steps, portable=None):
    from xpoptim.adapters import numpy as xn

    arrays = {k: v.copy() for k, v in params.items()}
    opt = xn.create(name, arrays, **hp)
    if portable is not None:
        opt.import_state(portable)
    traj, losses = [], []
    for t in range(t0 + 1, t0 + steps + 1):
        loss, g = prob.loss_and_grads(arrays, t)
        extra = {"grad_variance": prob.grad_variance(g)} if needs_variance(name) else {}
        opt.step(g, **extra)
        traj.append({k: v.astype(np.float64) for k, v in arrays.items()})
        losses.append(loss)
    return {k: v.copy() for k, v in arrays.items()}, traj, losses, opt.export_state()


RUNNERS = {"torch": run_torch, "jax": run_jax, "numpy": run_numpy}
