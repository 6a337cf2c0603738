"""The optax contract: state of arrays, no recompilation, inject_hyperparams, masks, partition, MultiSteps,
extra args, dtypes, validation at construction, the mini-batch variance helpers and the flat paths."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import registry_cases
from _optax_problems import BATCH, init_params, leaf_grad
from xpoptim.adapters import optax as xo
from xpoptim.core import SPECS, HyperKind

NAMES = list(registry_cases.names())
MB = registry_cases.minibatch_names()


def _tree(shapes=None, dtype=jnp.float32, seed=0):
    shapes = shapes or {"w": (6, 4), "b": (4,)}
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), init_params(shapes, seed))


def _grads(params, t):
    return jax.tree.map(lambda p: jnp.asarray(leaf_grad("g", np.asarray(p, np.float64), t), p.dtype), params)


def _extra(name, g):
    return {"grad_variance": jax.tree.map(lambda x: 0.1 * x * x + 0.01, g)} if name in MB else {}


def _run(name, tx, params, n=4):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(1, n + 1):
        g = _grads(params, t)
        u, state = update(g, state, params, **_extra(name, g))
        params = optax.apply_updates(params, u)
    return params, state, update


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_is_arrays_and_no_recompilation(name):
    params = _tree()
    params, state, update = _run(name, xo.create(name, lr=1e-2), params, n=4)
    assert update._cache_size() == 1, "the jitted update recompiled after the first step"
    for leaf in jax.tree.leaves(state):
        assert isinstance(leaf, jax.Array)
    counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32 and x.shape == ()]
    assert counts and all(int(c) == 4 for c in counts)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def test_no_recompilation_logged(caplog):
    """The same check through jax's compilation log (jax_log_compiles)."""
    params = _tree()
    tx = xo.mvngrad(1e-2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = _grads(params, 1)
    update(g, state, params)  # compile
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for _ in range(3):
            u, state = update(g, state, params)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    with jax.log_compiles(True), caplog.at_level("WARNING"):  # control: a new shape does log a compilation
        update(_grads(_tree({"w": (3, 3), "b": (3,)}), 1), tx.init(_tree({"w": (3, 3), "b": (3,)})), None)
    assert [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_count_saturates():
    params = _tree()
    tx = xo.scale_by_adamw()
    state = tx.init(params)._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    _, new = tx.update(_grads(params, 1), state)
    assert int(new.count) == np.iinfo(np.int32).max


def test_state_names_follow_the_spec():
    state = xo.scale_by_mvngrad().init(_tree())
    assert type(state).__name__ == "ScaleByMVNGradState"
    assert state._fields == ("count", *SPECS["mvngrad"].state)
    assert xo.ScaleByMVNGradState is type(state)


# ----------------------------------------------------------------------------------------------
# inject_hyperparams
# ----------------------------------------------------------------------------------------------

def _dyadic(x: float, bits: int = 6) -> float:
    """``x`` rounded to ``bits`` significant bits: exactly representable in float32 (and far from its range)."""
    if x == 0:
        return 0.0
    m, e = math.frexp(x)
    return math.ldexp(round(m * 2**bits) / 2**bits, e)


def _inject_hp(name: str, hp: dict) -> dict:
    """Every numeric hyperparameter of ``name`` given (inject_hyperparams injects the defaults too), at the registry
    row's value (else the default) rounded to a few bits, so the injected (float32 array) and the Python-float
    versions compute identical scalars: a beta ``b`` keeps ``1 - b`` dyadic, and ``1 - b`` is exact in float32 for
    ``b >= 1/2``. Any remaining difference would be the adapter's. The row's static switches are passed as given."""
    spec = SPECS[name]
    out = {}
    for h in spec.hyperparams:
        v = hp.get(h.name, h.default)
        if h.static or isinstance(v, bool) or not isinstance(v, (int, float)):
            if h.name in hp:
                out[h.name] = v
            continue
        if h.kind in (HyperKind.BETA, HyperKind.BETA_OPEN) and 0 < v < 1:
            v = 1 - _dyadic(1 - v)
        out["learning_rate" if h.name == "lr" else h.name] = _dyadic(v) if h.kind not in (HyperKind.BETA, HyperKind.BETA_OPEN) else v
    return out


#: Every rule at its registry settings and variants (``registry_cases.rows``); matrix rules get a square matrix (full
#: rank DeVA_Sinf factors), the static switches go to ``static_args``.
_INJECT_ROWS = [pytest.param(name, _inject_hp(name, hp), id=i) for i, name, hp in registry_cases.rows()]

def _static_names(name: str) -> set:
    return {h.name for h in SPECS[name].hyperparams if h.static}


#: Per registered rule, its numeric hyperparameters only (no static switch), as ``_inject_hp`` gives them.
_INJECT = {
    name: {k: v for k, v in _inject_hp(name, registry_cases.settings(name)).items() if k not in _static_names(name)}
    for name in registry_cases.names()
}


@pytest.mark.parametrize(("name", "hp"), _INJECT_ROWS)
def test_inject_hyperparams_equivalence(name, hp):
    alias = getattr(xo, name)
    params = _tree({"w": (5, 5), "b": (4,)} if SPECS[name].kind == "matrix" else None)
    static = tuple(h.name for h in SPECS[name].hyperparams if h.static and h.name in hp)
    a, _, _ = _run(name, alias(**hp), params)
    b, state, update = _run(name, optax.inject_hyperparams(alias, static_args=static)(**hp), params)
    assert update._cache_size() == 1
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), rtol=1e-6, atol=1e-7)
    assert set(state.hyperparams) >= {k for k in hp if k not in static}


def test_inject_hyperparams_changes_take_effect():
    params = _tree()
    tx = optax.inject_hyperparams(xo.adamw)(learning_rate=1e-2)
    state = tx.init(params)
    g = _grads(params, 1)
    u1, _ = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
    u2, _ = tx.update(g, state, params)
    np.testing.assert_allclose(np.asarray(u2["w"]), 2 * np.asarray(u1["w"]), rtol=1e-6)


def test_inject_hyperparams_integer_switch_needs_static_args():
    params = _tree({"w": (5, 5)})
    tx = optax.inject_hyperparams(xo.deva_sinf)(learning_rate=1e-2, precondition_frequency=3)
    state = tx.init(params)  # concrete arrays: accepted
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(tx.update)(_grads(params, 1), state, params)
    tx = optax.inject_hyperparams(xo.deva_sinf, static_args=("precondition_frequency",))(
        learning_rate=1e-2, precondition_frequency=3
    )
    p, _, update = _run("deva_sinf", tx, params, n=5)
    assert update._cache_size() == 1


# ----------------------------------------------------------------------------------------------
# Combinators
# ----------------------------------------------------------------------------------------------


def test_chain_and_unknown_extra_args():
    params = _tree()
    tx = optax.chain(optax.clip_by_global_norm(1.0), xo.adamw(1e-2))
    state = tx.init(params)
    g = _grads(params, 1)
    u1, _ = tx.update(g, state, params, unknown_arg=jnp.ones(3), another=None)
    u2, _ = tx.update(g, state, params)
    for k in u1:
        np.testing.assert_array_equal(np.asarray(u1[k]), np.asarray(u2[k]))


def test_masked_leaves_pass_through():
    params = _tree()
    tx = optax.masked(xo.laprop(1e-2), {"w": True, "b": False})
    state = tx.init(params)
    g = _grads(params, 1)
    u, _ = jax.jit(tx.update)(g, state, params)
    np.testing.assert_array_equal(np.asarray(u["b"]), np.asarray(g["b"]))  # optax.masked: untouched
    ref, _ = xo.laprop(1e-2).update({"w": g["w"]}, xo.laprop(1e-2).init({"w": params["w"]}), {"w": params["w"]})
    np.testing.assert_allclose(np.asarray(u["w"]), np.asarray(ref["w"]), rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adam", "muon", "deva_sinf"])
def test_weight_decay_mask(name):
    params = _tree({"w": (5, 5), "b": (4,)})
    g = _grads(params, 1)
    masked = xo.create(name, lr=1e-2, weight_decay=0.5, mask={"w": True, "b": False})
    no_wd = xo.create(name, lr=1e-2, weight_decay=0.0)
    full = xo.create(name, lr=1e-2, weight_decay=0.5)
    um, u0, uf = (_second_update(tx, params, g) for tx in (masked, no_wd, full))
    np.testing.assert_allclose(np.asarray(um["b"]), np.asarray(u0["b"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(um["w"]), np.asarray(uf["w"]), rtol=1e-6)
    assert not np.allclose(np.asarray(um["w"]), np.asarray(u0["w"]))


def _second_update(tx, params, g):
    """The update of the second step (DeVA_Sinf's first call only seeds)."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(g, state, params)
    return update(g, state, params)[0]


def test_partition_with_masked_nodes():
    params = _tree()
    labels = {"w": "a", "b": "c"}
    tx = optax.partition({"a": xo.mvngrad(1e-2), "c": xo.sgd(1e-2, momentum=0.5)}, labels)
    p, state, update = _run("partition", tx, params, n=3)
    pa, _, _ = _run("mvngrad", xo.mvngrad(1e-2), {"w": params["w"]}, n=3)
    pc, _, _ = _run("sgd", xo.sgd(1e-2, momentum=0.5), {"b": params["b"]}, n=3)
    np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(pa["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p["b"]), np.asarray(pc["b"]), rtol=1e-6)
    inner = state.inner_states["a"].inner_state
    assert isinstance(inner[0].exp_avg["b"], optax.MaskedNode)


@pytest.mark.parametrize("name", ["adamw", "msvag", "muon"])
def test_multisteps(name, x64):
    """MultiSteps(every_k=2): two micro-batches equal one step on their mean gradient (float64)."""
    params = _tree(dtype=jnp.float64)
    ms = optax.MultiSteps(xo.create(name, lr=1e-2), every_k_schedule=2, accumulator_dtype=jnp.float64)
    plain = xo.create(name, lr=1e-2)
    s_ms, s_plain = ms.init(params), plain.init(params)
    ms_update, plain_update = jax.jit(ms.update), jax.jit(plain.update)
    p_ms, p_plain = params, params
    for t in range(1, 4):
        g1, g2 = _grads(p_ms, 2 * t), _grads(p_ms, 2 * t + 1)
        u, s_ms = ms_update(g1, s_ms, p_ms)
        assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
        u, s_ms = ms_update(g2, s_ms, p_ms)
        p_ms = optax.apply_updates(p_ms, u)
        gm = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
        u, s_plain = plain_update(gm, s_plain, p_plain)
        p_plain = optax.apply_updates(p_plain, u)
    for k in params:
        np.testing.assert_allclose(np.asarray(p_ms[k]), np.asarray(p_plain[k]), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes(name):
    params = {
        "w16": jnp.asarray(init_params({"a": (5, 5)})["a"], jnp.bfloat16),
        "w32": jnp.asarray(init_params({"a": (5, 5)}, 1)["a"], jnp.float32),
        "b16": jnp.asarray([0.5, -0.25, 1.0], jnp.bfloat16),
        "h16": jnp.asarray([0.5, -0.25], jnp.float16),
    }
    tx = xo.create(name, lr=1e-2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    dtypes0 = jax.tree.map(lambda x: x.dtype, state)
    for t in range(1, 4):
        g = _grads(params, t)
        u, state = update(g, state, params, **_extra(name, g))
        assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)
        params = optax.apply_updates(params, u)
        assert jax.tree.map(lambda x: x.dtype, state) == dtypes0
    assert update._cache_size() == 1
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}, "bf16/fp16 leaves keep float32 state by default"
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


def test_state_dtype_option():
    params = {"w": jnp.ones((4, 3), jnp.float32), "b": jnp.ones((3,), jnp.bfloat16)}
    state = xo.adamw(1e-3, state_dtype=jnp.bfloat16).init(params)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.bfloat16)}


def test_bf16_leaf_moves_like_float32_state(x64):
    """A bf16 parameter with float32 state: the update equals the float32 computation, rounded once."""
    p32 = {"w": jnp.asarray(init_params({"w": (8,)})["w"], jnp.float32)}
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    g = jax.tree.map(lambda x: jnp.asarray(leaf_grad("w", np.asarray(x, np.float64), 1), x.dtype), p16)
    tx = xo.adamw(1e-2)
    u16, s16 = tx.update(g, tx.init(p16), p16)
    u32, _ = tx.update(jax.tree.map(lambda x: x.astype(jnp.float32), g), tx.init(p32), jax.tree.map(lambda x: x.astype(jnp.float32), p16))
    assert u16["w"].dtype == jnp.bfloat16 and s16[0].count.dtype == jnp.int32
    assert s16[0].exp_avg["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(u16["w"]), np.asarray(u32["w"].astype(jnp.bfloat16)))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: xo.adam(1e-3, beta1=1.5), r"beta1=1\.5"),
        (lambda: xo.create("adamw", lr=-1.0), r"lr=-1\.0"),
        (lambda: xo.adamw(1e-3, eps=float("nan")), r"eps=nan"),
        (lambda: xo.sgd(1e-2, momentum=0.0, nesterov=True), r"nesterov"),
        (lambda: xo.msvag(1e-2, mu=0.0), r"mu=0\.0"),
        (lambda: xo.adam_star(1e-2, adaptation="tanh"), r"adaptation='tanh'"),
        (lambda: xo.muon(1e-2, ns_steps=0), r"ns_steps=0"),
        (lambda: xo.deva_sinf(1e-2, shampoo_beta=1.5), r"shampoo_beta=1\.5"),
        (lambda: xo.scale_by_mvngrad(beta2=1.0), r"beta2=1\.0"),
        (lambda: xo.create("nope"), r"optimizer='nope'"),
        (lambda: xo.muon(1e-2, fallback="muon"), r"fallback='muon'"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_hyperparameters_raise_type_error():
    with pytest.raises(TypeError, match="gamma"):
        xo.create("adamw", lr=1e-3, gamma=0.1)
    with pytest.raises(TypeError):
        xo.adamw(1e-3, gamma=0.1)


def test_inject_hyperparams_validates_at_init():
    with pytest.raises(ValueError, match="beta1"):
        optax.inject_hyperparams(xo.adam)(learning_rate=1e-3, beta1=1.5).init(_tree())


def test_non_matrix_leaf_in_scale_by_muon_is_a_clear_error():
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        xo.scale_by_muon().init(_tree())


def test_create_accepts_lr_or_learning_rate_and_betas():
    params = _tree()
    g = _grads(params, 1)
    outs = []
    for tx in (xo.create("adamw", lr=1e-2, betas=(0.8, 0.9)), xo.create("AdamW", learning_rate=1e-2, beta1=0.8, beta2=0.9)):
        u, _ = tx.update(g, tx.init(params), params)
        outs.append(np.asarray(u["w"]))
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(TypeError, match="not both"):
        xo.create("adamw", lr=1e-2, learning_rate=1e-2)


# ----------------------------------------------------------------------------------------------
# Mini-batch variance
# ----------------------------------------------------------------------------------------------


def test_missing_grad_variance_is_a_clear_error():
    params = _tree()
    tx = xo.msvag_mb(1e-2)
    with pytest.raises(ValueError, match="grad_variance"):
        tx.update(_grads(params, 1), tx.init(params), params)


def test_per_example_grad_variance_helper(x64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH + 3, 5))
    y = rng.standard_normal(BATCH + 3)
    params = {"w": jnp.asarray(rng.standard_normal(5)), "c": jnp.asarray(0.3)}

    def loss(p, ex):
        xi, yi = ex
        return 0.5 * (xi @ p["w"] + p["c"] - yi) ** 2

    mean_loss, mean_grad, var = xo.per_example_grad_variance(loss, params, (jnp.asarray(x), jnp.asarray(y)))
    r = x @ np.asarray(params["w"]) + float(params["c"]) - y  # closed-form per-example gradients
    pe_w, pe_c = r[:, None] * x, r
    b = len(y)
    np.testing.assert_allclose(float(mean_loss), np.mean(0.5 * r**2), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(mean_grad["w"]), pe_w.mean(0), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(var["w"]), pe_w.var(0, ddof=1) / b, rtol=1e-12)
    np.testing.assert_allclose(float(var["c"]), pe_c.var(ddof=1) / b, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Flat paths
# ----------------------------------------------------------------------------------------------


def test_ravel_by_dtype_round_trip():
    params = {"a": jnp.ones((3, 2), jnp.float32), "b": jnp.arange(4, dtype=jnp.bfloat16), "c": jnp.zeros((2,), jnp.float32)}
    flat, unravel = xo.ravel_by_dtype(params)
    assert set(flat) == {"float32", "bfloat16"} and flat["float32"].shape == (8,)
    back = unravel(flat)
    for k in params:
        assert back[k].dtype == params[k].dtype
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(params[k]))


@pytest.mark.parametrize("name", ["adamw", "mvngrad", "msvag_mb"])
def test_flatten_by_dtype_equals_per_leaf(name):
    params = {
        "a": _tree({"x": (6, 4)})["x"],
        "b": _tree({"x": (4,)}, seed=1)["x"],
        "h": _tree({"x": (3,)}, dtype=jnp.bfloat16, seed=2)["x"],
    }
    a, _, _ = _run(name, xo.create(name, lr=1e-2, weight_decay=0.1), params)
    b, state, update = _run(name, xo.flatten_by_dtype(xo.create(name, lr=1e-2, weight_decay=0.1)), params)
    assert update._cache_size() == 1
    for k in params:
        assert b[k].dtype == params[k].dtype
        np.testing.assert_allclose(np.asarray(b[k], np.float32), np.asarray(a[k], np.float32), rtol=1e-6)


def test_ravel_by_dtype_training_step_equals_per_leaf():
    """Differentiating through ``unravel`` gives flat gradients; one step equals the per-leaf step."""
    params = {"w": _tree({"x": (6, 4)})["x"], "b": _tree({"x": (4,)}, seed=1)["x"]}

    def loss(p):
        return jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum((p["b"] - 0.3) ** 2)

    tx = xo.mvngrad(1e-2, weight_decay=0.1)
    g = jax.grad(loss)(params)
    u, _ = tx.update(g, tx.init(params), params)
    per_leaf = optax.apply_updates(params, u)

    flat, unravel = xo.ravel_by_dtype(params)
    gf = jax.grad(lambda f: loss(unravel(f)))(flat)
    assert set(gf) == {"float32"} and gf["float32"].shape == (28,)
    uf, _ = jax.jit(tx.update)(gf, tx.init(flat), flat)
    flat_result = unravel(optax.apply_updates(flat, uf))
    for k in params:
        np.testing.assert_allclose(np.asarray(flat_result[k]), np.asarray(per_leaf[k]), rtol=1e-6)
