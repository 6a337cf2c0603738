"""Finite inputs never become NaN: the overflow-safe forms of the core, on every backend, against float64.

Huge but finite float32 gradients used to give NaN parameters: Muon's Newton-Schulz pre-normalisation (``0 * inf``
when ``sum(X^2)`` overflows at entries of ~1e19), M-SVAG's ``m^3 / (m^2 + s)`` (``m^3`` overflows above
``|m| ~ 7e12``), and the Balles & Hennig moments once ``g^2`` overflows (``inf - inf`` in the lerp-form EMA and in
``v - m^2``). The core now computes the plain form and keeps it where it is finite (the same bits, checked below),
and a scaled form where it overflowed. The references are float64 closed forms and the float64 reference
optimizers of ``tests/references``, which share no code with the core.

Where a state buffer itself must hold a number beyond the float32 range (a second moment ``g^2`` above 3.4e38),
it becomes ``inf`` and that element's step is 0, as ``torch.optim.Adam``'s is when its ``exp_avg_sq`` overflows:
tested as a policy at the end.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from references import run_reference
from references.backends import to_numpy
from references.optimizers import ns_reference

import registry_cases

from xpoptim.core import ELEMENTWISE, SPECS, get_spec
from xpoptim.core import functional as F
from xpoptim.core.directions import newton_schulz
from xpoptim.core.factors import adam_factor, adam_star_direction, erf_factor, svag_direction, svag_factor
from xpoptim.core.moments import centered_variance, ema, minibatch_variance

F32_MAX = float(np.finfo(np.float32).max)

# ------------------------------------------------------------------------------------------------------------------
# The factor functions: float64 closed forms, and the same bits as the plain form where it is finite
# ------------------------------------------------------------------------------------------------------------------

#: (m, s) pairs whose plain float32 forms overflow (m^2, m^3, m^2 + s or 2 s beyond 3.4e38) or underflow, and
#: ordinary ones.
HUGE_PAIRS = [
    (1e13, 1e20), (-3e15, 4e30), (2e19, 1e30), (-1.5e19, 3e38), (1e19, 3e38), (3e38, 1.0), (-3e38, 3e38),
    (1e-3, 3e38), (1e10, 2e38), (0.0, 3e38), (1.0, 0.0), (-2.0, 5.0), (0.0, 0.0),
    # tiny: m^2, m^3 or m^2 + s in or near the float32 subnormal range
    (1e-20, 1e-40), (1e-15, 0.0), (-3e-14, 1e-28), (2e-22, 3e-44), (1e-30, 1e-20), (-1e-19, 1e-38),
]


def _f64_forms(m: np.ndarray, s: np.ndarray) -> dict:
    """The factors in float64, from their definitions (Balles & Hennig Eq. 6, 14, 15; Alg. 2, 4)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        eta2 = s / (m * m)
        gamma = np.where(m == 0, 0.0, 1.0 / (1.0 + eta2))
        adam = np.where(m == 0, 0.0, 1.0 / np.sqrt(1.0 + eta2))
        erf = np.vectorize(math.erf, otypes=[np.float64])  # the C library's float64 erf (no SciPy needed)
        erf_f = np.where(m == 0, 0.0, np.where(s == 0, 1.0, erf(np.abs(m) / np.sqrt(2.0 * s))))
    return {"svag_factor": gamma, "svag_direction": gamma * m, "adam_factor": adam,
            "adam_star_direction": adam * np.sign(m), "erf_factor": erf_f}


FACTORS = {"svag_factor": svag_factor, "svag_direction": svag_direction, "adam_factor": adam_factor,
           "adam_star_direction": adam_star_direction, "erf_factor": erf_factor}


def _flushes_subnormals(backend) -> bool:
    """Whether the backend's float32 arithmetic treats subnormal inputs as 0 (flush-to-zero / denormals-are-zero).

    XLA on CPU does, and GPU kernels compiled with flush-to-zero do; NumPy and torch on CPU keep subnormals. Measured
    by the backend itself: ``x * 1`` of the subnormal ``1e-40``.
    """
    x = backend.asarray(np.array([1e-40], np.float32), "float32")
    return bool(to_numpy(x * 1.0)[0] == 0)


@pytest.mark.parametrize("fn", list(FACTORS))
def test_factors_of_huge_moments_match_float64(fn, backend_f32):
    if fn == "erf_factor" and backend_f32.name.startswith("array_api_strict"):
        pytest.skip("erf goes through NumPy for array-api-strict arrays: covered by the numpy backend")
    m64 = np.array([p[0] for p in HUGE_PAIRS])
    s64 = np.array([p[1] for p in HUGE_PAIRS])
    m32, s32 = m64.astype(np.float32), s64.astype(np.float32)
    if _flushes_subnormals(backend_f32):  # the backend's arithmetic reads float32 subnormals as 0: so does the truth
        tiny = np.finfo(np.float32).tiny
        m32, s32 = (np.where(np.abs(a) < tiny, np.float32(0), a) for a in (m32, s32))
    want = _f64_forms(m32.astype(np.float64), s32.astype(np.float64))[fn]
    xp = backend_f32.xp
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # the plain forms overflow, deliberately
        got = to_numpy(FACTORS[fn](xp, backend_f32.asarray(m32, "float32"), backend_f32.asarray(s32, "float32")))
    assert np.all(np.isfinite(got)), (fn, got)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-6, atol=1e-37, err_msg=fn)


@pytest.mark.parametrize("fn", list(FACTORS))
def test_factors_keep_the_plain_bits_where_finite(fn):
    """Where the plain form is finite (and m^2 + s not tiny) the result is that form, bit for bit."""
    rng = np.random.default_rng(0)
    m = (rng.standard_normal(4000) * 10.0 ** rng.integers(-6, 8, 4000)).astype(np.float32)
    s = (rng.random(4000) * 10.0 ** rng.integers(-16, 16, 4000)).astype(np.float32)
    m[:50] = 0.0
    s[:25] = 0.0
    s[50:100] = 0.0
    with np.errstate(all="ignore"):
        m2 = m * m
        plain = {
            "svag_factor": np.where(m2 + s != 0, m2 / np.where(m2 + s != 0, m2 + s, 1), 0),
            "svag_direction": np.where(m2 + s != 0, m2 * m / np.where(m2 + s != 0, m2 + s, 1), 0),
            "adam_factor": np.where(m2 + s != 0, np.abs(m) / np.sqrt(np.where(m2 + s != 0, m2 + s, 1)), 0),
            "adam_star_direction": np.where(m2 + s != 0, m / np.sqrt(np.where(m2 + s != 0, m2 + s, 1)), 0),
        }
    if fn not in plain:
        pytest.skip("erf_factor's plain form is checked against float64 above (erf is not bit-reproducible)")
    want = plain[fn].astype(np.float32)
    with np.errstate(all="ignore"):
        got = FACTORS[fn](np, m, s)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_centered_variance_of_an_overflowed_moment_is_infinite_not_nan(backend_f32):
    xp = backend_f32.xp
    m = backend_f32.asarray(np.array([np.inf, 1e20, 1.0, 2.0], np.float32), "float32")
    v = backend_f32.asarray(np.array([np.inf, np.inf, np.inf, 5.0], np.float32), "float32")
    with np.errstate(over="ignore", invalid="ignore"):
        got = to_numpy(centered_variance(xp, m, v))
    np.testing.assert_array_equal(got, np.array([np.inf, np.inf, np.inf, 1.0], np.float32))


def test_ema_of_an_infinite_state_stays_infinite(backend_f32):
    xp = backend_f32.xp
    s = backend_f32.asarray(np.array([np.inf, np.inf, -3e38, 1.0], np.float32), "float32")
    x = backend_f32.asarray(np.array([np.inf, 1.0, 3e38, 2.0], np.float32), "float32")
    with np.errstate(over="ignore", invalid="ignore"):
        got = to_numpy(ema(xp, s, x, 0.9))
    want = 0.9 * np.array([np.inf, np.inf, -3e38, 1.0]) + 0.1 * np.array([np.inf, 1.0, 3e38, 2.0])
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-6)
    assert got[3] == np.float32(1.0) + np.float32(0.1) * (np.float32(2.0) - np.float32(1.0))  # the lerp bits


# ------------------------------------------------------------------------------------------------------------------
# Newton-Schulz: the pre-normalisation of a huge matrix
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prenorm", ["frobenius", "frobenius_add", "schatten8"])
@pytest.mark.parametrize("scale", [1e20, 3e38 / 8])
def test_newton_schulz_of_a_huge_matrix_matches_float64(prenorm, scale, backend_f32):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 6))
    x /= np.abs(x).max()
    x32 = (x * scale).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        got = to_numpy(newton_schulz(backend_f32.xp, backend_f32.asarray(x32, "float32"), prenorm=prenorm))
    assert np.all(np.isfinite(got))
    want = np.stack([ns_reference(x32[i].astype(np.float64) / scale, prenorm=prenorm, eps=1e-7 / scale) for i in range(2)])
    np.testing.assert_allclose(got, want, atol=3e-5)


def test_newton_schulz_float16_entries_above_256_stay_finite():
    x = np.random.default_rng(2).standard_normal((5, 3)) * 1000.0
    with np.errstate(over="ignore", invalid="ignore"):
        got = newton_schulz(np, x.astype(np.float16))
    want = ns_reference(x)
    assert got.dtype == np.float16 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got.astype(np.float64), want, atol=1e-2)


@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (2, 0, 4)])
def test_newton_schulz_of_an_empty_matrix_is_empty(shape):
    got = newton_schulz(np, np.zeros(shape, np.float32))
    assert got.shape == shape and got.dtype == np.float32


# ------------------------------------------------------------------------------------------------------------------
# Whole rules: huge gradients in float32 against the float64 reference optimizers
# ------------------------------------------------------------------------------------------------------------------

STEPS = 20

def _shape(name: str) -> tuple:
    return (4, 4) if get_spec(name).kind == "matrix" else (3, 4)  # square: full-rank Kronecker factors


def _mb(name: str) -> bool:
    return bool(getattr(get_spec(name), "extras", ()))


def _gradients(name: str, scale: float) -> np.ndarray:
    """A fixed gradient sequence around ``scale``: signs and sizes vary per element, magnitudes within 1.5x."""
    rng = np.random.default_rng(7)
    shape = _shape(name)
    base = np.where(rng.random(shape) < 0.5, -1.0, 1.0) * rng.uniform(0.5, 1.0, shape)
    lead = (STEPS, 6) if _mb(name) else (STEPS,)
    noise = rng.uniform(-0.5, 0.5, (*lead, *shape))
    return scale * ((base[None, None] if _mb(name) else base[None]) + noise)


def _run_core(name: str, grads: np.ndarray, backend, hp: dict) -> np.ndarray:
    spec = get_spec(name)
    hp = spec.validate(**hp)
    xp = backend.xp
    theta0 = np.zeros(grads.shape[-2:])
    p = backend.asarray(theta0, "float32")
    state = F.init(spec, p, hp)
    traj = [to_numpy(p).astype(np.float64)]
    for t in range(1, STEPS + 1):
        extras = ()
        if _mb(name):
            pe = backend.asarray(grads[t - 1], "float32")
            g = xp.mean(pe, axis=0)
            extras = (minibatch_variance(xp, pe, axis=0),)
        else:
            g = backend.asarray(grads[t - 1], "float32")
        p, state = F.step(spec, p, g, state, hp, t, extras=extras)
        traj.append(to_numpy(p).astype(np.float64))
    return np.stack(traj)


def _hp(name: str) -> dict:
    # eps-free or eps-scaled settings, so that the rule is exactly scale-equivariant and the float64 reference at
    # the same scale is the truth (Adam's eps = 1e-8 would be nothing next to 1e18 anyway).
    return {"lr": 1e-3, "weight_decay": 0.0} if get_spec(name).kind == "matrix" else {"lr": 1e-3}


#: Per rule, the largest gradient scale at which every float32 *state* buffer still holds its exact value range
#: (a second moment holds g^2, so about sqrt(3.4e38) / 1.5 / sqrt(rank) for the Kronecker factors of DeVA_Sinf).
HUGE_SCALE = {name: 1e18 for name in SPECS}
HUGE_SCALE.update({"msvag": 1e16, "msvag_mb": 1e16, "sgd": 1e30, "mssd": 1e30, "muon": 1e30, "deva_sinf": 1e18})


@pytest.mark.parametrize("name", list(SPECS))
def test_huge_float32_gradients_follow_the_float64_reference(name, backend_f32):
    if name == "deva_sinf" and backend_f32.name.startswith("array_api_strict"):
        pytest.skip("DeVA_Sinf's host eigh/QR path is covered by the numpy, torch and jax backends")
    reference = registry_cases.reference(name)
    if reference is None:
        pytest.skip(registry_cases.NO_REFERENCE)
    hp = _hp(name)
    for scale in (1e13, HUGE_SCALE[name]):
        grads = _gradients(name, scale)
        with np.errstate(over="ignore", invalid="ignore"):
            core = _run_core(name, grads, backend_f32, hp)
        assert np.all(np.isfinite(core)), (name, scale)
        ref = reference(np.zeros(grads.shape[-2:]), lambda theta, t: grads[t - 1], STEPS, hp, rule_dtype="float32")
        err = float(np.max(np.abs(core - ref)) / np.max(np.abs(ref)))
        bound = registry_cases.float32_bound(name).bound
        assert err <= bound, f"{name} at gradient scale {scale:g}: relative error {err:.2e} > {bound:.0e}"


def test_msvag_above_7e12_was_the_overflow_regime():
    """Without the scaled form M-SVAG's m^3 overflows here (the case the test above must cover)."""
    m = np.float32(1e13)
    with np.errstate(over="ignore"):
        assert not np.isfinite(m * m * m)


def test_muon_1e20_float32_gradients_stay_finite_like_torch_optim_muon():
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32) * np.float32(1e20)
    spec = get_spec("muon")
    hp = spec.validate(lr=1e-2)
    p = np.ones((4, 6), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        new, _ = F.step(spec, p, g, F.init(spec, p, hp), hp, 1)
    assert np.all(np.isfinite(new))
    tp = torch.nn.Parameter(torch.ones(4, 6))
    tp.grad = torch.from_numpy(g)
    torch.optim.Muon([tp], lr=1e-2, weight_decay=0.1, adjust_lr_fn="original").step()
    assert torch.isfinite(tp).all()
    # torch.optim.Muon's norm overflows to inf, so its update is 0 (X / inf); ours is the orthogonalised direction.
    ref = run_reference("muon", p.astype(np.float64), lambda theta, t: g.astype(np.float64), 1, {"lr": 1e-2})[-1]
    np.testing.assert_allclose(new, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Policy: a second moment beyond the float32 range
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if "exp_avg_sq" in get_spec(n).state or "exp_avg_var" in get_spec(n).state])
def test_an_overflowed_second_moment_stops_that_element_without_nan(name, backend_f32):
    """g = 1e20 in float32: g^2 = inf in the state (as in torch.optim.Adam); the parameter stays finite and the
    element does not move any more, while the other elements keep following the rule."""
    spec = get_spec(name)
    hp = spec.validate(lr=1e-2, weight_decay=0.0)
    xp = backend_f32.xp
    p = backend_f32.asarray(np.ones(3, np.float32), "float32")
    state = F.init(spec, p, hp)
    for t in range(1, 6):
        g = backend_f32.asarray(np.array([1e20 if t == 1 else 1.0, 1.0, -1.0], np.float32), "float32")
        with np.errstate(over="ignore", invalid="ignore"):
            p, state = F.step(spec, p, g, state, hp, t)
        out = to_numpy(p)
        assert np.all(np.isfinite(out)), (name, t, out)
        assert not any(np.isnan(to_numpy(v)).any() for v in state.values() if v is not None)
    assert out[1] < 1.0 and out[2] > 1.0  # the other elements moved
    assert math.isfinite(float(out[0]))


# ------------------------------------------------------------------------------------------------------------------
# Policy: M-SSD after the gradients become zero
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mssd_moves_the_same_number_of_steps_after_zero_gradients_on_every_backend(dtype, backend_f32):
    """sign(mu^k m_0) keeps M-SSD moving after the gradients vanish; the momentum is flushed to 0 below 2^-126 on
    every backend (XLA would flush subnormals, NumPy and torch would keep them), so it moves for exactly
    floor(log(2^-126) / log(mu)) = 828 more steps with m_0 = 1, mu = 0.9, in float32 and float64 alike."""
    if dtype == "float64" and backend_f32.name == "array_api_strict_no_float64":
        pytest.skip("that device has no float64")
    spec = get_spec("mssd")
    hp = spec.validate(lr=1.0, mu=0.9)
    p = backend_f32.asarray(np.zeros(2), dtype)
    state = F.init(spec, p, hp)
    zero = backend_f32.asarray(np.zeros(2), dtype)
    p, state = F.step(spec, p, backend_f32.asarray(np.array([1.0, -1.0]), dtype), state, hp, 1)
    moves = 0
    for t in range(2, 1000):
        before = to_numpy(p).copy()
        p, state = F.step(spec, p, zero, state, hp, t)
        if np.any(to_numpy(p) != before):
            moves += 1
    assert moves == math.floor(math.log(2.0**-126) / math.log(0.9)) == 828
    np.testing.assert_array_equal(to_numpy(state["momentum"]), np.zeros(2))


@pytest.mark.parametrize("kind", ["original", "match_rms_adamw", "deva_muon", "none"])
@pytest.mark.parametrize(("fan_in", "fan_out"), [(0, 3), (3, 0), (0, 0)])
def test_shape_scale_of_a_zero_size_matrix_is_finite(kind, fan_in, fan_out):
    from xpoptim.core.directions import shape_scale

    assert math.isfinite(shape_scale(kind, fan_in, fan_out))
