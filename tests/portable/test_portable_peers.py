"""Migration from and to the peers: torch.optim Adam / AdamW / SGD / Muon and optax adam / adamw / sgd /
contrib.muon.

The references are the peers themselves: a peer run that is moved to xpoptim half-way must end where the peer's
uninterrupted run ends (float64). The torch.optim.AdamW case is also checked bit for bit: a checkpoint imported
through ``xpoptim.portable`` continues exactly as an xpoptim AdamW whose state was filled by hand from that
checkpoint (its own ``load_state_dict`` format, written out in this test).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
import torch

import xpoptim.portable as xpp
from xpoptim.adapters import numpy as xn
from xpoptim.adapters import optax as xo
from xpoptim.adapters import torch as xt
from xpoptim.core import STATE_VERSION

N1, N2 = 4, 4


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)


def _train(model, opt, t0, steps):
    for t in range(t0, t0 + steps):
        x, y = _batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _travel_error(got, ref, start):
    err = max(float((a - b).detach().abs().max()) for a, b in zip(got.parameters(), ref.parameters()))
    travel = max(float((a - b).detach().abs().max()) for a, b in zip(ref.parameters(), start.parameters()))
    return err / travel


def test_torch_optim_adamw_checkpoint_continues_bit_for_bit_in_float64():
    model = _model()
    peer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    _train(model, peer, 0, N1)
    checkpoint = copy.deepcopy(peer.state_dict())

    # Through xpoptim.portable, via a file.
    moved = copy.deepcopy(model)
    resumed = torch.optim.AdamW(moved.parameters(), lr=0.01, weight_decay=0.1)
    resumed.load_state_dict(checkpoint)
    ours = xt.AdamW(moved.parameters(), lr=0.01, weight_decay=0.1, compile=False)
    ours.import_state(xpp.from_torch_optim(resumed))
    for (i, st), p in zip(checkpoint["state"].items(), moved.parameters()):
        mine = ours.state[p]
        assert torch.equal(mine["exp_avg"], st["exp_avg"]) and torch.equal(mine["exp_avg_sq"], st["exp_avg_sq"]), i
        assert float(mine["step"]) == float(st["step"]) == N1
    _train(moved, ours, N1, N2)

    # By hand: the checkpoint written into xpoptim's own state-dict format.
    by_hand = copy.deepcopy(model)
    ref = xt.AdamW(by_hand.parameters(), lr=0.01, weight_decay=0.1, compile=False)
    sd = ref.state_dict()
    sd["state"] = {
        i: {"step": st["step"].clone(), "state_version": STATE_VERSION, "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
        for i, st in checkpoint["state"].items()
    }
    ref.load_state_dict(sd)
    _train(by_hand, ref, N1, N2)
    for a, b in zip(moved.parameters(), by_hand.parameters()):
        assert torch.equal(a, b)

    # And the peer itself, uninterrupted: the same trajectory up to float64 rounding.
    start = copy.deepcopy(model)
    _train(model, peer, N1, N2)
    assert _travel_error(moved, model, start) < 1e-13


def _peer(name, params):
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01, weight_decay=0.05, foreach=False)
    if name == "adam_decoupled":
        return torch.optim.Adam(params, lr=0.01, weight_decay=0.05, decoupled_weight_decay=True, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=False)
    if name == "sgd_nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    if name == "sgd_plain":
        return torch.optim.SGD(params, lr=0.05)
    return torch.optim.Muon(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")


@pytest.mark.parametrize(
    "name, target",
    [(n, t) for n in ("adam", "adam_decoupled", "sgd", "sgd_nesterov", "sgd_plain") for t in ("torch", "numpy")] + [("muon", "torch")],
)
def test_torch_optim_run_continues_in_xpoptim(name, target):
    """torch.optim for N1 steps, then xpoptim (torch or NumPy) with the peer's hyperparameters for N2 steps.

    Muon: torch.optim.Muon always runs Newton-Schulz in bfloat16 (recorded as ``ns_dtype`` in the portable
    hyperparameters); bf16 rounding would hide a migration error, so the peer's continuation is taken from
    :func:`torch_muon_float64`, torch.optim.Muon's rule written out in float64, and ours runs in float64 too.
    """
    model = _model()
    if name == "muon":  # torch.optim.Muon takes matrices only
        for m in (model[0], model[2]):
            m.bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    peer = _peer(name, params)
    _train(model, peer, 0, N1)
    portable = xpp.from_torch_optim(peer)
    hp = dict(portable.hyperparams)
    if name == "muon":
        assert hp.pop("ns_dtype") == "bfloat16"
    moved = copy.deepcopy(model)
    mparams = [p for p in moved.parameters() if p.requires_grad]
    if target == "torch":
        ours = xt.create(portable.optimizer, mparams, **hp, compile=False)
        ours.import_state(portable)
        _train(moved, ours, N1, N2)
    else:
        arrays = [p.detach().numpy().copy() for p in mparams]
        ours = xn.create(portable.optimizer, arrays, **hp)
        ours.import_state(portable)
        for t in range(N1, N1 + N2):
            with torch.no_grad():
                for p, a in zip(mparams, arrays):
                    p.copy_(torch.from_numpy(a))
            x, y = _batch(t)
            for p in mparams:
                p.grad = None
            torch.nn.functional.mse_loss(moved(x), y).backward()
            ours.step([p.grad.numpy() for p in mparams])
        with torch.no_grad():
            for p, a in zip(mparams, arrays):
                p.copy_(torch.from_numpy(a))
    start = copy.deepcopy(model)
    _train(model, torch_muon_float64(peer) if name == "muon" else peer, N1, N2)
    assert _travel_error(moved, model, start) < 1e-12


class torch_muon_float64:  # noqa: N801  (stands in for the optimizer in _train)
    """torch.optim.Muon's update (torch/optim/_muon.py, single-tensor path) in float64, from the peer's state."""

    def __init__(self, peer):
        self.peer = peer

    def zero_grad(self):
        self.peer.zero_grad()

    @torch.no_grad()
    def step(self):
        for g in self.peer.param_groups:
            a, b, c = g["ns_coefficients"]
            mu = g["momentum"]
            for p in g["params"]:
                buf = self.peer.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                x = p.grad.lerp(buf, mu) if g["nesterov"] else buf.clone()
                tall = x.size(0) > x.size(1)
                x = x.T if tall else x
                x = x / x.norm().clamp(min=g["eps"])
                for _ in range(g["ns_steps"]):
                    gram = x @ x.T
                    x = a * x + (b * gram + c * gram @ gram) @ x
                x = x.T if tall else x
                rows, cols = p.shape
                scale = 0.2 * max(rows, cols) ** 0.5 if g["adjust_lr_fn"] == "match_rms_adamw" else max(1, rows / cols) ** 0.5
                p.mul_(1 - g["lr"] * g["weight_decay"]).add_(x, alpha=-g["lr"] * scale)


def test_export_back_to_torch_optim():
    model = _model()
    ours = xt.AdamW(model.parameters(), lr=0.01, compile=False)
    _train(model, ours, 0, N1)
    moved = copy.deepcopy(model)
    peer = torch.optim.AdamW(moved.parameters(), lr=0.01)
    xpp.to_torch_optim(ours.export_state(), peer)
    assert all(float(st["step"]) == N1 for st in peer.state.values())
    start = copy.deepcopy(model)
    _train(moved, peer, N1, N2)
    _train(model, ours, N1, N2)
    assert _travel_error(moved, model, start) < 1e-13


def test_torch_optim_refusals():
    model = _model()
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        xpp.from_torch_optim(torch.optim.Adam(model.parameters(), amsgrad=True))
    with pytest.raises(TypeError, match="torch.optim.rmsprop.RMSprop is not supported"):
        xpp.from_torch_optim(torch.optim.RMSprop(model.parameters()))
    muon = xt.Muon(model.named_parameters(), compile=False)  # matrices and a fallback group
    _train(model, muon, 0, 1)
    exported = muon.export_state()
    assert exported.params["2.bias"].rule == "adamw"
    weight_and_bias = xpp.PortableState("muon", {}, {"a": exported.params["0.weight"], "b": exported.params["0.bias"]})
    peer = torch.optim.Muon([model[0].weight, model[2].weight])
    with pytest.raises(ValueError, match="served by 'adamw' in the portable state: torch.optim.Muon runs 'muon' only"):
        xpp.to_torch_optim(weight_and_bias, peer, names=["a", "b"])
    assert len(peer.state) == 0
    with pytest.raises(ValueError, match="is a 'muon' state: torch.optim.AdamW runs xpoptim's AdamW"):
        xpp.to_torch_optim(muon.export_state(), torch.optim.AdamW(model.parameters()))


# ----------------------------------------------------------------------------------------------------------------------
# optax peers
# ----------------------------------------------------------------------------------------------------------------------


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": jnp.asarray(rng.standard_normal((3, 5))), "bias": jnp.asarray(rng.standard_normal(5))},
            "out": {"kernel": jnp.asarray(rng.standard_normal((5, 4))), "bias": jnp.zeros(4)}}


def _loss(p, t):
    rng = np.random.default_rng(200 + t)
    x, y = jnp.asarray(rng.standard_normal((8, 3))), jnp.asarray(rng.standard_normal((8, 4)))
    return jnp.mean((jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2)


def _run_optax(tx, params, state, t0, steps):
    for t in range(t0, t0 + steps):
        g = jax.grad(_loss)(params, t)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


PEERS = {
    "adam": (lambda: optax.adam(0.01), "adam", {"lr": 0.01}),
    "adamw": (lambda: optax.adamw(0.01, weight_decay=0.1), "adamw", {"lr": 0.01, "weight_decay": 0.1}),
    "sgd": (lambda: optax.sgd(0.05, momentum=0.9), "sgd", {"lr": 0.05, "momentum": 0.9}),
    "sgd_nesterov": (lambda: optax.sgd(0.05, momentum=0.9, nesterov=True), "sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "sgd_plain": (lambda: optax.sgd(0.05), "sgd", {"lr": 0.05, "momentum": 0.0}),
}


@pytest.mark.parametrize("peer", list(PEERS))
def test_optax_run_continues_in_xpoptim(peer):
    make, name, hp = PEERS[peer]
    with jax.enable_x64(True):
        params0 = _tree()
        tx = make()
        params, state = _run_optax(tx, params0, tx.init(params0), 0, N1)
        portable = xpp.from_optax(state, params, peer.split("_")[0], hyperparams=hp)
        ours = xo.create(name, **hp)
        mine, _ = _run_optax(ours, params, xo.import_state(portable, params, ours), N1, N2)
        ref, _ = _run_optax(tx, params, state, N1, N2)
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(ref)))
        travel = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)))
        assert err / travel < 1e-12, (err, travel)


def test_optax_contrib_muon_is_refused_with_the_reason_or_mapped_exactly():
    with jax.enable_x64(True):
        params0 = _tree()
        tx = optax.contrib.muon(0.02)
        params, state = _run_optax(tx, params0, tx.init(params0), 0, N1)
        with pytest.raises(ValueError, match="bias-corrects the momentum"):
            xpp.from_optax(state, params, "contrib.muon")
        portable = xpp.from_optax(state, params, "contrib.muon", strict=False)
        assert {n: p.rule for n, p in portable.params.items()} == {
            "dense.bias": "adamw", "dense.kernel": "muon", "out.bias": "adamw", "out.kernel": "muon"}
        mu = state.inner_states["muon"].inner_state[0].mu
        np.testing.assert_array_equal(portable.params["dense.kernel"].state["momentum_buffer"], np.asarray(mu["dense"]["kernel"]).T)
        nu = state.inner_states["adam"].inner_state[0].nu
        np.testing.assert_array_equal(portable.params["out.bias"].state["exp_avg_sq"], np.asarray(nu["out"]["bias"]))
        assert portable.params["out.bias"].step == N1
        ours = xo.muon(0.02)
        imported = xo.import_state(portable, params, ours)
        back = xo.export_state(imported, params, optimizer="muon")
        for n in portable.names:
            for k, v in portable.params[n].state.items():
                np.testing.assert_array_equal(back.params[n].state[k], v)
