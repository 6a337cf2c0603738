"""The optax side: rule states found inside ``inject_hyperparams`` and schedules, counts restored beside them, and
refusals that name the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xpoptim.portable as xpp
from xpoptim.adapters import numpy as xn
from xpoptim.adapters import optax as xo


def _params():
    rng = np.random.default_rng(0)
    return {"a": {"kernel": jnp.asarray(rng.standard_normal((3, 4))), "bias": jnp.asarray(rng.standard_normal(4))}}


def _run(tx, params, state, t0, steps):
    for t in range(t0, t0 + steps):
        g = jax.tree.map(lambda x: jnp.cos(x * (t + 1)), params)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("wrap", ["schedule", "inject_hyperparams"])
def test_schedule_resumes_where_it_was(wrap, x64):
    """An lr schedule (its own count in the chain, or inject_hyperparams' count) resumes at the imported step."""
    sched = optax.linear_schedule(0.05, 0.0, 10)

    def make():
        if wrap == "schedule":
            return xo.adamw(learning_rate=sched, weight_decay=0.1)
        return optax.inject_hyperparams(xo.adamw)(learning_rate=sched, weight_decay=0.1)

    tx = make()
    params0 = _params()
    p1, s1 = _run(tx, params0, tx.init(params0), 0, 4)
    portable = xo.export_state(s1, p1, optimizer="adamw")
    assert {ps.step for ps in portable.params.values()} == {4}
    moved_tx = make()
    state = xo.import_state(portable, p1, moved_tx)
    counts = [int(x) for x in jax.tree.leaves(state) if getattr(x, "dtype", None) == jnp.int32]
    assert counts and set(counts) == {4}
    got, _ = _run(moved_tx, p1, state, 4, 4)
    ref, _ = _run(tx, p1, s1, 4, 4)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_optax_refusals():
    params = _params()
    tx = xo.adamw(1e-2)
    portable = xo.export_state(tx.init(params), params, optimizer="adamw")
    assert portable.names == ["a.bias", "a.kernel"]
    with pytest.raises(ValueError, match=r"leaf 'a.bias' is not in the portable state"):
        xo.import_state(portable.rename({"a.bias": "b"}), params, tx)
    with pytest.raises(ValueError, match="is a 'adamw' state; tx runs rule 'adam'"):
        xo.import_state(portable, params, xo.adam(1e-2))
    uneven = portable.rename({})
    uneven.params["a.bias"] = xpp.ParamState("adamw", 3, (4,), dict(portable.params["a.bias"].state))
    with pytest.raises(ValueError, match=r"different steps \[0, 3\]"):
        xo.import_state(uneven, params, tx)
    with pytest.raises(ValueError, match="holds no xpoptim rule state"):
        xo.export_state(optax.adamw(1e-2).init(params), params, optimizer="adamw")
    kept = {"a": {"kernel": xo.DimensionNumbers(reduction_axis=1, output_axis=0), "bias": None}}  # (3, 4) kept as is
    wrong = xo.export_state(tx.init(params), params, optimizer="adamw", dimension_numbers=kept)
    with pytest.raises(ValueError, match=r"leaf 'a.kernel' has shape \(4, 3\) in the portable orientation, \(3, 4\)"):
        xo.import_state(wrong, params, tx)


def test_numpy_refusals_change_nothing():
    params = {"w": np.ones((3, 4)), "b": np.zeros(3)}
    opt = xn.AdamW(params, lr=0.1)
    opt.step({"w": np.full((3, 4), 0.5), "b": np.ones(3)})
    before = xpp.flatten_state_dict(opt.state_dict())
    good = opt.export_state()
    uneven = good.rename({})
    uneven.params["b"] = xpp.ParamState("adamw", 5, (3,), dict(good.params["b"].state))
    with pytest.raises(ValueError, match=r"different steps \[1, 5\]"):
        opt.import_state(uneven)
    with pytest.raises(ValueError, match=r"missing \['w'\]"):
        opt.import_state(good.rename({"w": "v"}))
    bad = good.rename({})
    bad.params["b"] = xpp.ParamState("adamw", 1, (3,), {"exp_avg": np.zeros(3), "exp_avg_sq": np.zeros(2)})
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.import_state(bad)
    after = xpp.flatten_state_dict(opt.state_dict())
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].tobytes() == after[k].tobytes(), k
