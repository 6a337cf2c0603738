"""MVN-Grad Theorem 3.1 (docs/algorithms.md section 2.5a): the one-step conditional update-variance gap.

From a frozen state with ``m_{t-1} = mu`` (the theorem's assumption) and a symmetric gradient ``g = mu + sigma xi``:
both rules share ``v_t``; ``w = 1/(sqrt(v_t/bc2) + eps)``; the momentum-then-normalise step is ``m_t w / bc1``
(AdaBelief without eps-in-state) and MVN-Grad's step is ``(b1 u_{t-1} + (1-b1) g w)/bc1``. Then

    Var(MtN) - Var(NtM) = b1 (2 - b1) mu^2 Var(w) / bc1^2.

The MVN-Grad step, ``m_t`` and ``v_t`` come from the core's direction kernel; the expectations are taken by
Gauss-Hermite quadrature (exact for the identity, since the nodes are symmetric) and by Monte Carlo.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xpoptim.core import MVNGRAD, make_direction_kernel, step_scalars

SETTINGS = [
    # (beta1, beta2, t, mu, sigma, v_prev, u_prev, eps)
    (0.9, 0.999, 5, 1.0, 0.3, 0.02, 0.4, 1e-8),
    (0.9, 0.999, 1, -0.5, 1.0, 0.0, 0.0, 1e-8),
    (0.5, 0.99, 50, 2.0, 0.7, 0.3, -1.0, 1e-3),
    (0.95, 0.9, 3, 0.2, 2.0, 1.5, 0.1, 1e-8),
]


def _steps(g, residual, beta1, beta2, t, mu, v_prev, u_prev, eps):
    """Both candidate steps for each gradient sample in ``g`` (a 1-D array), from the same frozen state."""
    hp = MVNGRAD.validate(beta1=beta1, beta2=beta2, eps=eps, residual=residual)
    kernel = make_direction_kernel(MVNGRAD, np, MVNGRAD.static(hp))
    scalars = step_scalars(MVNGRAD, hp, t)[2:]  # drop (lr, wd_term)
    full = np.ones_like(g)
    d_ntm, m_t, v_t, _ = kernel(g, mu * full, v_prev * full, u_prev * full, *scalars)
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    w = 1.0 / (np.sqrt(v_t / bc2) + eps)
    d_mtn = m_t * w / bc1
    # the kernel's MVN-Grad step must be the NtM form of the theorem
    np.testing.assert_allclose(d_ntm, (beta1 * u_prev + (1 - beta1) * g * w) / bc1, rtol=1e-13, atol=1e-300)
    return d_mtn, d_ntm, w, bc1


def _var(x, weights):
    mean = np.sum(weights * x)
    return np.sum(weights * (x - mean) ** 2)


@pytest.mark.parametrize("residual", ["m_t", "m_prev"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_variance_gap_by_gauss_hermite_quadrature(setting, residual):
    beta1, beta2, t, mu, sigma, v_prev, u_prev, eps = setting
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)  # probabilists': weight exp(-x^2/2)
    weights = weights / math.sqrt(2 * math.pi)
    d_mtn, d_ntm, w, bc1 = _steps(mu + sigma * nodes, residual, beta1, beta2, t, mu, v_prev, u_prev, eps)
    gap = _var(d_mtn, weights) - _var(d_ntm, weights)
    expected = beta1 * (2 - beta1) * mu**2 * _var(w, weights) / bc1**2
    assert expected > 0
    assert gap == pytest.approx(expected, rel=1e-9)


def test_quadrature_check_can_fail():
    """The identity needs w to be even in xi; a rule normalising by a non-centred proxy breaks it."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)
    weights = weights / math.sqrt(2 * math.pi)
    beta1, mu, sigma = 0.9, 1.0, 0.5
    g = mu + sigma * nodes
    w = 1.0 / (np.abs(g) + 1e-8)  # Adam-like (uncentred) normaliser: not even in xi
    mtn = (beta1 * mu + (1 - beta1) * g) * w
    ntm = (1 - beta1) * g * w
    gap = _var(mtn, weights) - _var(ntm, weights)
    assert gap != pytest.approx(beta1 * (2 - beta1) * mu**2 * _var(w, weights), rel=1e-3)


@pytest.mark.parametrize("residual", ["m_t", "m_prev"])
def test_variance_gap_by_monte_carlo(residual):
    """Spec 6.5's protocol with a Gaussian oracle: sample gap vs the formula (sampling error ~0.3% at 4e5)."""
    beta1, beta2, t, mu, sigma, v_prev, u_prev, eps = SETTINGS[0]
    rng = np.random.default_rng(3)
    xi = rng.standard_normal(200_000)
    xi = np.concatenate([xi, -xi])  # antithetic pairs: symmetric sample
    d_mtn, d_ntm, w, bc1 = _steps(mu + sigma * xi, residual, beta1, beta2, t, mu, v_prev, u_prev, eps)
    gap = np.var(d_mtn) - np.var(d_ntm)
    expected = beta1 * (2 - beta1) * mu**2 * np.var(w) / bc1**2
    assert gap == pytest.approx(expected, rel=1e-2)
    assert gap > 0
