"""The references agree with the peers wherever the conventions match (torch.optim Adam/AdamW/SGD, optax).

This anchors the references' conventions (eps outside the sqrt, torch's coupled L2 for Adam/SGD, SGD's buffer
seeding and dampening, decoupled decay before the step) in code the core shares nothing with. The core is
compared with the references in ``test_core_trajectories.py``, so it inherits these anchors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _core_cases import BY_ID, Problem, rel_error, run_ref

STEPS = 30

TORCH_CASES = {
    "adam-default": ("Adam", {}),
    "adam-l2-maximize": ("Adam", {}),
    "adamw-default": ("AdamW", {}),
    "adamw-wd-betas": ("AdamW", {}),
    "sgd-default": ("SGD", {}),
    "sgd-nesterov": ("SGD", {}),
    "sgd-dampening-l2": ("SGD", {}),
    "sgd-no-momentum-maximize": ("SGD", {}),
    "sgd-no-momentum-dampening": ("SGD", {}),
}


def _torch_kwargs(case):
    hp = dict(case.hp)
    if "beta1" in hp or "beta2" in hp or case.name in ("adam", "adamw"):
        hp["betas"] = (hp.pop("beta1", 0.9), hp.pop("beta2", 0.999))
    if case.name == "sgd":
        hp.setdefault("momentum", 0.9)  # the spec's M-SGD default (torch's is 0)
    if case.name == "adamw":
        hp.setdefault("weight_decay", 1e-2)
    return hp


@pytest.mark.parametrize("case_id", list(TORCH_CASES))
def test_reference_matches_torch_optim(case_id):
    torch = pytest.importorskip("torch", reason="torch not installed")
    case = BY_ID[case_id]
    prob = Problem(case, STEPS)
    p = torch.tensor(prob.theta0.copy(), dtype=torch.float64, requires_grad=True)
    opt = getattr(torch.optim, TORCH_CASES[case_id][0])([p], maximize=case.maximize, **_torch_kwargs(case))
    traj = [prob.theta0.copy()]
    for t in range(1, STEPS + 1):
        p.grad = torch.tensor(prob.grad(p.detach().numpy().copy(), t))
        opt.step()
        traj.append(p.detach().numpy().copy())
    assert rel_error(np.stack(traj), run_ref(case, STEPS)) <= 1e-12


@pytest.mark.parametrize("case_id", ["adam-default", "adamw-wd-betas"])
def test_reference_matches_optax(case_id):
    optax = pytest.importorskip("optax", reason="optax not installed")
    import jax
    import jax.numpy as jnp

    case = BY_ID[case_id]
    hp = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2, **case.hp}
    with jax.enable_x64(True):
        if case.name == "adam":
            tx = optax.adam(hp["lr"], b1=hp["beta1"], b2=hp["beta2"], eps=hp["eps"])
        else:
            tx = optax.adamw(hp["lr"], b1=hp["beta1"], b2=hp["beta2"], eps=hp["eps"], weight_decay=hp["weight_decay"])
        prob = Problem(case, STEPS)
        p = jnp.asarray(prob.theta0)
        state = tx.init(p)
        traj = [prob.theta0.copy()]
        for t in range(1, STEPS + 1):
            g = jnp.asarray(prob.grad(np.asarray(p), t))
            upd, state = tx.update(g, state, p)
            p = optax.apply_updates(p, upd)
            traj.append(np.asarray(p, dtype=np.float64))
    # optax folds lr into the update (-lr * m_hat/(sqrt(v_hat) + eps) - lr * wd * p): same math, other rounding
    assert rel_error(np.stack(traj), run_ref(dataclasses.replace(case), STEPS)) <= 1e-12
