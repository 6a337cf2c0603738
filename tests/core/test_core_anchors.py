"""Closed-form anchors from the spec: kappa, first steps, 0/0 edge cases, the erf factor, mini-batch variance.

Every expected value here is a number printed in ``docs/algorithms.md`` or a closed form derived there,
evaluated independently of the core (``math``/NumPy, ``references``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from references import kappa_reference, ns_reference
from references.optimizers import shape_scale_reference

from xpoptim.core import (
    ELEMENTWISE,
    MATRIX,
    SPECS,
    adam_factor,
    erf_factor,
    functional,
    kappa,
    minibatch_variance,
    minibatch_variance_from_moments,
    svag_factor,
)

RNG = np.random.default_rng(20261122)


# ----------------------------------------------------------------------------------------------
# kappa (Eq. 19, docs/algorithms.md section 3.1)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "expected"), [(2, 0.5014), (5, 0.2044), (10, 0.1090), (50, 0.0532)])
def test_kappa_anchors(t, expected):
    assert round(kappa(0.9, t), 4) == expected


def test_kappa_limit_and_first_step():
    assert round(kappa(0.9, 5000), 5) == 0.05263
    assert kappa(0.9, 5000) == pytest.approx((1 - 0.9) / (1 + 0.9), rel=1e-12)
    for mu in (0.1, 0.5, 0.9, 0.99, 0.999):
        assert kappa(mu, 1) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("mu", [0.3, 0.9, 0.99])
def test_kappa_is_the_sum_of_squared_ema_weights(mu):
    for t in (1, 2, 3, 7, 30, 200):
        assert kappa(mu, t) == pytest.approx(kappa_reference(mu, t), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# First steps (t = 1 from zero state), through functional.step on every backend
# ----------------------------------------------------------------------------------------------


def _first_step(name, backend, g, dtype="float64", p=None, **hp):
    spec = SPECS[name]
    hp = spec.validate(**hp)
    p0 = np.zeros_like(g) if p is None else p
    P = backend.asarray(p0, dtype)
    state = functional.init(spec, P, hp)
    P1, _ = functional.step(spec, P, backend.asarray(g, dtype), state, hp, 1)
    return backend.to_numpy(P1) - p0


G = np.array([[3.0, -2.0, 0.5], [-0.01, 1e-3, 40.0]])


def test_adam_first_step_is_g_over_abs_g_plus_eps(backend):
    step = _first_step("adam", backend, G, lr=0.1, eps=1e-8)
    np.testing.assert_allclose(step, -0.1 * G / (np.abs(G) + 1e-8), rtol=1e-13)
    np.testing.assert_allclose(step, -0.1 * np.sign(G), rtol=1e-4)  # eps/|g| <= 1e-5


def test_adabelief_and_laprop_first_steps(backend):
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = _first_step("adabelief", backend, G, lr=0.1, eps=eps)
    # m = (1-b1) g, s = (1-b2) b1^2 g^2 + eps, step = lr g / (sqrt(b1^2 g^2 + eps/(1-b2)) + eps) ~ sign(g)/b1
    np.testing.assert_allclose(step, -0.1 * G / (np.sqrt(b1**2 * G**2 + eps / (1 - b2)) + eps), rtol=1e-12)
    step = _first_step("laprop", backend, G, lr=0.1, eps=eps)
    np.testing.assert_allclose(step, -0.1 * G / (np.abs(G) + eps), rtol=1e-13)


@pytest.mark.parametrize("unbiasing", [True, False])
@pytest.mark.parametrize("name", ["msvag", "svag"])
def test_msvag_and_svag_first_step_is_alpha_g(name, unbiasing, backend):
    """Spec 3.4: kappa = 1 and v - m^2 = 0 at t = 1, so gamma = 1 and the step is alpha g. With the published
    weighting the round-off in v - m^2 is multiplied by rho/(1-rho) ~ 1e4 (rtol 1e-10 instead of 1e-15)."""
    step = _first_step(name, backend, G, lr=0.1, variance_unbiasing=unbiasing)
    np.testing.assert_allclose(step, -0.1 * G, rtol=1e-10 if unbiasing else 1e-14)


@pytest.mark.parametrize("adaptation", ["adam", "erf"])
def test_adam_star_first_step_is_alpha_sign_g(adaptation, backend):
    step = _first_step("adam_star", backend, G, lr=0.1, adaptation=adaptation)
    np.testing.assert_allclose(step, -0.1 * np.sign(G), rtol=1e-14)


@pytest.mark.parametrize("residual", ["m_t", "m_prev"])
def test_mvngrad_first_step_is_sign_over_beta1(residual, backend):
    """Spec 2.4: v_1 = (1-b2) b1^2 g^2, so z_1 = g/(b1 |g| + eps) ~ sign(g)/b1 (m_prev residual: sign(g))."""
    b1, eps = 0.8, 1e-8
    step = _first_step("mvngrad", backend, G, lr=0.1, beta1=b1, eps=eps, residual=residual)
    scale = b1 if residual == "m_t" else 1.0
    np.testing.assert_allclose(step, -0.1 * G / (scale * np.abs(G) + eps), rtol=1e-12)
    np.testing.assert_allclose(step, -0.1 * np.sign(G) / scale, rtol=1e-4)  # eps/|g| <= 1.3e-5


@pytest.mark.parametrize("b2", [0.999, 0.99])
def test_deva_linf_first_gamma_is_one_over_sqrt_one_minus_beta2(b2, backend):
    """Spec 4.1: v_1 = (1-b2) m^2, Gamma ~ 1/sqrt(1-b2) (31.6 / 10) whenever m^2 >> 1e-5."""
    g = np.array([[50.0, -20.0], [100.0, -300.0]])  # m = 0.1 g, m^2 >= 4 >> 1e-5
    step = _first_step("deva_linf", backend, g, lr=0.01, beta2=b2)
    m = 0.1 * g
    np.testing.assert_allclose(step, -0.01 * np.abs(m) / np.sqrt((1 - b2) * m**2 + 1e-5) * np.sign(g), rtol=1e-13)
    np.testing.assert_allclose(np.abs(step) / 0.01, 1 / math.sqrt(1 - b2), rtol=3e-3)


def test_muon_first_step_is_scaled_ns_of_g(backend):
    """B = (1-mu) g, N = (1-mu^2) g; the Frobenius pre-normalisation removes the scale: step = lr s NS(g)."""
    g = RNG.standard_normal((6, 4))
    step = _first_step("muon", backend, g, lr=0.1, weight_decay=0.0)
    np.testing.assert_allclose(step, -0.1 * math.sqrt(6 / 4) * ns_reference(g), rtol=1e-12, atol=1e-14)


def test_deva_sinf_first_call_does_not_move(backend):
    g = RNG.standard_normal((4, 4))
    p = RNG.standard_normal((4, 4))
    assert np.array_equal(_first_step("deva_sinf", backend, g, p=p, weight_decay=0.1), np.zeros_like(p))


# ----------------------------------------------------------------------------------------------
# Zero updates, no NaN (0/0 := 0)
# ----------------------------------------------------------------------------------------------

ZERO_M_SETTINGS = [
    ("svag", dict(variance_unbiasing=True)),
    ("svag", dict(variance_unbiasing=False)),
    ("msvag", dict(variance_unbiasing=True)),
    ("msvag", dict(variance_unbiasing=False)),
    ("adam_star", dict(adaptation="adam")),
    ("adam_star", dict(adaptation="erf")),
    ("msvag_mb", {}),
    ("adam_star_mb", dict(adaptation="adam")),
    ("adam_star_mb", dict(adaptation="erf")),
]


_ZERO_IDS = [f"{n}-{'-'.join(map(str, h.values())) or 'default'}" for n, h in ZERO_M_SETTINGS]


@pytest.mark.parametrize(("name", "extra_hp"), ZERO_M_SETTINGS, ids=_ZERO_IDS)
@pytest.mark.parametrize("v_zero", [True, False], ids=["v=0", "v>0"])
def test_zero_momentum_gives_zero_update_and_no_nan_float64(name, extra_hp, v_zero, backend):
    """Spec 3.4 note: m = 0 gives update 0, also when v = 0 (0/0 := 0). The new m is made exactly 0 by the state
    (mu = 0.5: EMA state -g, or sum-form state -2g); v is 0 or positive."""
    _check_zero_momentum(name, extra_hp, v_zero, "float64", backend)


@pytest.mark.parametrize(("name", "extra_hp"), ZERO_M_SETTINGS, ids=_ZERO_IDS)
@pytest.mark.parametrize("v_zero", [True, False], ids=["v=0", "v>0"])
def test_zero_momentum_gives_zero_update_and_no_nan_float32(name, extra_hp, v_zero, backend_f32):
    _check_zero_momentum(name, extra_hp, v_zero, "float32", backend_f32)


def _check_zero_momentum(name, extra_hp, v_zero, dtype, backend_f32):
    spec = SPECS[name]
    hp = spec.validate(lr=0.1, mu=0.5, **extra_hp)
    g = np.array([[1.5, -0.25], [0.0, 2.0]]) * (0.0 if v_zero else 1.0)
    mb = name.endswith("_mb")
    m_state = -2.0 * g if mb else -g
    v_state = np.zeros_like(g) if v_zero else np.full_like(g, 0.7)
    p = RNG.standard_normal(g.shape)
    a = backend_f32.asarray
    state = {spec.state[0]: a(m_state, dtype), spec.state[1]: a(v_state, dtype)}
    extras = (a(np.zeros_like(g) if v_zero else np.full_like(g, 0.3), dtype),) if mb else ()
    for t in (1, 4):
        P1, new_state = functional.step(spec, a(p, dtype), a(g, dtype), state, hp, t, extras=extras)
        out = backend_f32.to_numpy(P1)
        assert np.all(np.isfinite(out))
        assert np.array_equal(out, p.astype(dtype)), f"t={t}: moved by {np.max(np.abs(out - p.astype(dtype)))}"
        assert np.array_equal(backend_f32.to_numpy(new_state[spec.state[0]]), np.zeros_like(g))
        for arr in new_state.values():
            assert np.all(np.isfinite(backend_f32.to_numpy(arr)))


@pytest.mark.parametrize("name", ELEMENTWISE + MATRIX)
def test_zero_gradient_and_no_decay_leave_the_parameter_unchanged(name, backend):
    """g = 0 for 3 steps from zero state: no move and no NaN (Adam 0/eps, AdaBelief eps in state, DeVA Gamma 0,
    msign(0) = 0, the 0/0 branches)."""
    spec = SPECS[name]
    extra = {"mu": 0.5} if "mu" in spec.defaults else {}
    hp = spec.validate(weight_decay=0.0, **extra)
    p = RNG.standard_normal((2, 3, 3) if name in MATRIX else (5,))
    P = backend.asarray(p)
    state = functional.init(spec, P, hp)
    zero = backend.asarray(np.zeros_like(p))
    extras = (zero,) if getattr(spec, "extras", ()) else ()
    for t in (1, 2, 3):
        P, state = functional.step(spec, P, zero, state, hp, t, extras=extras)
    assert np.array_equal(backend.to_numpy(P), p)
    for v in state.values():
        if v is not None:
            assert np.all(np.isfinite(backend.to_numpy(v)))


def test_factor_functions_at_zero():
    z, one = np.zeros(3), np.ones(3)
    for f in (svag_factor, adam_factor, erf_factor):
        np.testing.assert_array_equal(f(np, z, z), z)  # m = 0, s = 0
        np.testing.assert_array_equal(f(np, z, one), z)  # m = 0, s > 0
        np.testing.assert_array_equal(f(np, one, z), one)  # s = 0: gamma = 1


# ----------------------------------------------------------------------------------------------
# The erf factor (docs/algorithms.md section 3.1, 3.7, 6.2)
# ----------------------------------------------------------------------------------------------


def test_erf_vs_adam_factor_gap_peaks_at_0_0644_near_eta_1_91():
    eta = np.logspace(-2, 2, 40001)
    m, s = np.ones_like(eta), eta**2
    e, a = erf_factor(np, m, s), adam_factor(np, m, s)
    np.testing.assert_allclose(a, 1 / np.sqrt(1 + eta**2), rtol=1e-14)
    gap = np.abs(e - a)
    i = int(np.argmax(gap))
    assert round(gap[i], 4) == 0.0644
    assert eta[i] == pytest.approx(1.91, abs=0.01)
    assert round(a[i], 3) == 0.463 and round(e[i], 3) == 0.399
    assert e[-1] * eta[-1] == pytest.approx(math.sqrt(2 / math.pi), rel=1e-3)  # erf ~ 0.798/eta for large eta


def test_erf_factor_matches_math_erf_on_every_backend(backend):
    m = RNG.standard_normal(50)
    s = RNG.uniform(0.0, 4.0, 50)
    s[:5] = 0.0
    m[5:8] = 0.0
    got = backend.to_numpy(erf_factor(backend.xp, backend.asarray(m), backend.asarray(s)))
    with np.errstate(divide="ignore"):
        arg = np.abs(m) / np.sqrt(2 * s)
    want = np.where(m == 0, 0.0, np.array([math.erf(x) for x in arg]))
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-16)


# ----------------------------------------------------------------------------------------------
# Mini-batch variance (Eq. 44, unbiased form, docs/algorithms.md section 3.6)
# ----------------------------------------------------------------------------------------------


def test_minibatch_variance_is_the_unbiased_variance_of_the_mean(backend):
    B = 7
    pe = RNG.standard_normal((B, 3, 4)) * 2.0 + 1.0
    want = np.var(pe, axis=0, ddof=1) / B
    got = backend.to_numpy(minibatch_variance(backend.xp, backend.asarray(pe), axis=0))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    got = backend.to_numpy(minibatch_variance(backend.xp, backend.asarray(np.moveaxis(pe, 0, 2)), axis=2))
    np.testing.assert_allclose(got, want, rtol=1e-13)
    mean, mean_sq = pe.mean(axis=0), (pe**2).mean(axis=0)
    a = backend.asarray
    got = backend.to_numpy(minibatch_variance_from_moments(backend.xp, a(mean), a(mean_sq), B))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_minibatch_variance_is_unbiased_by_monte_carlo():
    """E[s_hat] = Var(batch mean) = sigma^2/B (the printed Eq. 44 is biased; the unbiased form is implemented)."""
    B, n, sigma = 4, 200_000, 1.7
    pe = RNG.normal(0.3, sigma, size=(B, n))
    s_hat = minibatch_variance(np, pe, axis=0)
    se = np.std(s_hat) / math.sqrt(n)
    assert abs(np.mean(s_hat) - sigma**2 / B) < 5 * se


def test_minibatch_variance_from_moments_rejects_batch_of_one():
    with pytest.raises(ValueError, match="batch_size=1"):
        minibatch_variance_from_moments(np, np.zeros(2), np.zeros(2), 1)


# ----------------------------------------------------------------------------------------------
# Shape scales (docs/algorithms.md section 5.3)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["original", "match_rms_adamw", "deva_muon", "none"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4), (2, 8, 3)])
def test_matrix_scale(kind, layout, shape):
    for name in ("muon", "deva_sinf"):
        hp = SPECS[name].validate(shape_scale=kind)
        got = functional.matrix_scale(SPECS[name], hp, shape, layout)
        assert got == pytest.approx(shape_scale_reference(kind, shape, layout), rel=1e-15)
