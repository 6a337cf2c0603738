"""Variance-adaptation factors (Balles & Hennig, "Dissecting Adam") and their step scalars.

Elementwise factor functions take the mean estimate ``m`` and a (non-negative) variance estimate
``s`` of the *direction*, i.e. already multiplied by the momentum correction (kappa or the
unbiasing weight). The relative variance is ``eta^2 = s / m^2``. Divisions are guarded with
``where`` on a safe denominator *before* dividing, so ``m = 0`` gives a zero factor and never NaN.
"""

from __future__ import annotations

import math
from typing import Any

from ._backend import HOST, erf
from .moments import finite

__all__ = [
    "kappa",
    "unbiasing_weight",
    "safe_divide",
    "svag_factor",
    "svag_direction",
    "adam_factor",
    "adam_star_direction",
    "erf_factor",
    "RHO_CAP",
    "PLAIN_FLOOR",
]

#: The cap on rho in the authors' M-SVAG code (lballes/msvag): avoids 1/(1-rho) = inf at t = 1.
RHO_CAP = 0.9999


def kappa(mu: Any, t: Any) -> Any:
    """Momentum correction of the relative variance, Balles & Hennig Eq. 19.

    ``kappa(mu, t) = (1 - mu^(2t)) (1 - mu)^2 / ((1 - mu^2) (1 - mu^t)^2)``, the sum of the
    squared weights of a bias-corrected EMA, i.e. ``Var(m_t)/sigma^2`` for iid gradients.
    ``kappa(mu, 1) = 1`` and ``kappa -> (1-mu)/(1+mu)``. Step-derived scalar (host or traced).

    Args:
        mu: EMA constant in [0, 1).
        t: step count (>= 1).

    Returns:
        ``kappa(mu, t)``.

    References:
        Balles & Hennig, Dissecting Adam, Eq. 19 (docs/algorithms.md section 3.1).
    """
    return (1 - mu ** (2 * t)) * (1 - mu) ** 2 / ((1 - mu**2) * (1 - mu**t) ** 2)


def unbiasing_weight(mu: Any, t: Any, ops: Any = HOST, rho_cap: float = RHO_CAP) -> Any:
    """The published/repo variance weight ``rho/(1-rho)``, ``rho = min(kappa(mu, t), rho_cap)``.

    The authors' code unbiases ``v - m^2`` by ``1/(1-rho)`` and the M-SVAG factor multiplies the
    result by ``rho``, so the relative variance is ``rho/(1-rho) (v - m^2)/m^2`` (docs/algorithms.md section 3.9).

    Args:
        mu: EMA constant.
        t: step count.
        ops: ``HOST`` for Python floats, or an array namespace for 0-D arrays.
        rho_cap: cap on rho (0.9999 as released).

    Returns:
        ``rho / (1 - rho)``.

    References:
        lballes/msvag msvag.py; arXiv 1705.07774 (published M-SVAG).
    """
    rho = ops.minimum(kappa(mu, t), rho_cap)
    return rho / (1 - rho)


def safe_divide(xp: Any, num: Any, den: Any) -> Any:
    """``num / den`` where ``den != 0``, else 0; the denominator is made safe before dividing."""
    nonzero = den != 0
    return xp.where(nonzero, num / xp.where(nonzero, den, 1 + 0 * den), 0 * num)


#: The plain forms are used where their denominator (or ``m^2``) lies in ``[PLAIN_FLOOR, inf)``; below ``2^-60``
#: (~8.7e-19) float32 squares and cubes of the moments come near or into the subnormal range and lose digits, so
#: tiny gradients take the scaled form too (it is scale-free: the same factor at 1e-20 as at 1).
PLAIN_FLOOR = 2.0**-60


def _plain_ok(xp: Any, x: Any) -> Any:
    """Where the plain form is kept: ``PLAIN_FLOOR <= x < inf`` (False for NaN)."""
    return finite(xp, x) & (x >= PLAIN_FLOOR)


def _ratio_forms(xp: Any, m: Any, s: Any) -> tuple:
    """Overflow-safe pieces of ``eta^2 = s / m^2``: ``(q, m_wins)``.

    With ``a = |m|`` and ``r = sqrt(s)`` (which never overflows), ``q = min(a, r) / max(a, r)`` lies in [0, 1],
    so no square of a large or tiny number is formed; ``m_wins`` is ``a > r`` (then ``eta = q``, else
    ``eta = 1/q``; ``a = r = 0`` falls on the ``s`` side, where every factor is 0, the rules' ``0/0 := 0``).
    An infinite variance estimate (an overflowed second moment) with a finite ``m`` gives ``q = 0`` on the
    ``s`` side, i.e. a factor of 0, the limit as ``s -> inf``; a finite ``s`` with an infinite ``m`` gives 1.
    """
    a = xp.abs(m)
    r = xp.sqrt(s)
    big = xp.maximum(a, r)
    q = xp.minimum(a, r) / xp.where(big > 0, big, 1 + 0 * big)
    return q, a > r


def svag_factor(xp: Any, m: Any, s: Any) -> Any:
    """SVAG factor ``gamma = (1 + eta^2)^-1 = m^2 / (m^2 + s)`` (Lemma 1, Eq. 14).

    Computed as written while ``m^2 + s`` is finite and not tiny (the same bits as the naive form; see
    ``PLAIN_FLOOR``), and otherwise from the ratio ``q`` of :func:`_ratio_forms`: ``1 / (1 + q^2)`` where ``|m| >= sqrt(s)``, ``q^2 / (q^2 + 1)`` elsewhere,
    0 where ``s`` is infinite. So float32 moments above ``~1.8e19`` give the right factor instead of NaN, and
    moments below ``~1e-19`` the right factor instead of one rounded in the subnormal range.

    Args:
        xp: array namespace.
        m: mean estimate of the direction.
        s: its variance estimate (>= 0).

    Returns:
        ``gamma`` in [0, 1]; 0 where ``m = 0`` (also when ``s = 0``) and where ``s = inf``.

    References:
        Balles & Hennig, Dissecting Adam, Eq. 14 and Alg. 2 (docs/algorithms.md sections 3.3-3.4).
    """
    m2 = m * m
    den = m2 + s
    naive = safe_divide(xp, m2, den)
    q, m_wins = _ratio_forms(xp, m, s)
    q2 = q * q
    safe = xp.where(m_wins, 1 / (1 + q2), q2 / (q2 + 1))
    return xp.where(_plain_ok(xp, den), naive, safe)


def svag_direction(xp: Any, m: Any, s: Any) -> Any:
    """M-SVAG direction in the closed form that never divides by m: ``m^3 / (m^2 + s)``.

    Equal to ``svag_factor(m, s) * m``; zero where ``m = 0`` (Alg. 2 note), also when ``s = 0``. Computed as
    written while ``m^3 / (m^2 + s)`` is finite and ``m^2 >= PLAIN_FLOOR`` (same bits), and as
    ``m * svag_factor(m, s)`` where ``m^3`` or ``m^2 + s`` overflows (float32 ``|m|`` above ``~7e12``) or ``m^3``
    would be subnormal, so a finite momentum never gives NaN and a tiny one still moves.

    References:
        Balles & Hennig, Dissecting Adam, Alg. 2 (docs/algorithms.md section 3.4).
    """
    m2 = m * m
    naive = safe_divide(xp, m2 * m, m2 + s)
    return xp.where(finite(xp, naive) & (m2 >= PLAIN_FLOOR), naive, m * svag_factor(xp, m, s))


def adam_factor(xp: Any, m: Any, s: Any) -> Any:
    """Adam's implicit factor ``(1 + eta^2)^(-1/2) = |m| / sqrt(m^2 + s)`` (Eq. 6).

    Computed as written while ``PLAIN_FLOOR <= m^2 + s < inf`` (same bits), from the ratio ``q`` of :func:`_ratio_forms`
    otherwise (``1/sqrt(1 + q^2)`` or ``q/sqrt(q^2 + 1)``; 0 where ``s = inf`` and ``m`` is finite).

    Returns:
        The factor in [0, 1]; 0 where ``m = 0``.

    References:
        Balles & Hennig, Dissecting Adam, Eq. 6 (docs/algorithms.md section 1.1, 3.5).
    """
    den = m * m + s
    naive = safe_divide(xp, xp.abs(m), xp.sqrt(den))
    q, m_wins = _ratio_forms(xp, m, s)
    root = xp.sqrt(1 + q * q)
    safe = xp.where(m_wins, 1 / root, q / root)
    return xp.where(_plain_ok(xp, den), naive, safe)


def adam_star_direction(xp: Any, m: Any, s: Any) -> Any:
    """ADAM* direction in closed form: ``sign(m) (1+eta^2)^(-1/2) = m / sqrt(m^2 + s)``.

    As written while ``PLAIN_FLOOR <= m^2 + s < inf`` (same bits); ``sign(m) adam_factor(m, s)`` elsewhere.

    References:
        Balles & Hennig, Dissecting Adam, Alg. 4 and 5 (docs/algorithms.md sections 3.5-3.6).
    """
    den = m * m + s
    naive = safe_divide(xp, m, xp.sqrt(den))
    return xp.where(_plain_ok(xp, den), naive, xp.sign(m) * adam_factor(xp, m, s))


def erf_factor(xp: Any, m: Any, s: Any) -> Any:
    """Sign-optimal factor ``gamma = 2 rho - 1 = erf(1/(sqrt(2) eta)) = erf(|m| / sqrt(2 s))``.

    Under a Gaussian model this is the optimal factor for a sign direction (Lemma 1, Eq. 15/23).
    ``s = 0`` gives 1 (erf(inf)), ``m = 0`` gives 0. Its largest gap to ``adam_factor`` is 0.0644
    near ``eta = 1.91``.

    Args:
        xp: array namespace.
        m: mean estimate.
        s: variance estimate (>= 0).

    Returns:
        The factor in [0, 1].

    References:
        Balles & Hennig, Dissecting Adam, Eq. 8, 15, 23; App. B.3 (docs/algorithms.md section 3.7).
    """
    den = xp.sqrt(2 * s)
    # sqrt(2) sqrt(s) where 2 s overflows (s above ~1.7e38 in float32): the same ratio without the overflow.
    den = xp.where(finite(xp, 2 * s), den, math.sqrt(2.0) * xp.sqrt(s))
    positive = den > 0
    ratio = xp.abs(m) / xp.where(positive, den, 1 + 0 * den)
    return xp.where(positive, erf(xp, ratio), xp.where(m != 0, 1 + 0 * m, 0 * m))

