"""Moment estimators: EMAs, bias corrections and variance estimates.

Every function here is elementwise (fusable): arrays in, arrays out, hyperparameters as Python floats
or 0-D arrays, no array creation and no branching on array values. Spec references are to
``docs/algorithms.md``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "finite",
    "ema",
    "ema_sum",
    "bias_correction",
    "centered_variance",
    "VARIANCE_ULPS",
    "residual_variance_update",
    "minibatch_variance",
    "minibatch_variance_from_moments",
]


def finite(xp: Any, x: Any) -> Any:
    """``|x| < inf`` elementwise: False for NaN and +-inf (a comparison, fusable by every compiler the adapters use).

    The overflow-safe forms of the core compute the plain formula and keep it where it is finite (the same bits),
    switching to a scaled form only where it overflowed: ``where(finite(xp, naive), naive, safe)``.
    """
    return xp.abs(x) < math.inf


def ema(xp: Any, state: Any, x: Any, beta: Any) -> Any:
    """Exponential moving average ``s <- beta * s + (1 - beta) * x`` (docs/algorithms.md section 0).

    Written as ``s + (1 - beta) * (x - s)``, the form of ``torch.lerp`` for weights below 0.5,
    so that Adam's first moment rounds like torch.optim's. Where that form is not finite (an infinite state,
    e.g. an overflowed second moment, gives ``inf - inf``; ``x - s`` may overflow) the product form
    ``beta s + (1 - beta) x`` is used: an infinite average stays infinite instead of becoming NaN.

    Args:
        xp: array namespace.
        state: the previous average ``s``.
        x: the new observation.
        beta: decay in [0, 1).

    Returns:
        The updated average.
    """
    lerp = state + (1 - beta) * (x - state)
    return xp.where(finite(xp, lerp), lerp, beta * state + (1 - beta) * x)


def ema_sum(xp: Any, state: Any, x: Any, beta: Any) -> Any:
    """Sum-form momentum ``m <- beta * m + x`` (M-SSD, Alg. 1; the mini-batch aggregators, Eq. 48).

    Args:
        xp: array namespace.
        state: the previous accumulator.
        x: the new term.
        beta: decay.

    Returns:
        The updated accumulator.
    """
    return beta * state + x


def bias_correction(beta: Any, t: Any) -> Any:
    """Bias-correction denominator ``1 - beta**t`` (docs/algorithms.md section 0).

    Step-derived scalar: call it on the host with Python numbers (float64) or inside a traced graph
    with 0-D float arrays, never in bf16/fp16 (``bf16(0.999) == 1``).

    Args:
        beta: decay of the average.
        t: step count, ``t >= 1``.

    Returns:
        ``1 - beta**t``.
    """
    return 1 - beta**t


#: A variance estimate ``v - m^2`` at or below ``VARIANCE_ULPS`` units in the last place of ``v`` is round-off and
#: counts as 0 (:func:`centered_variance`). 16 ulp(v) lies in ``(8 eps v, 16 eps v]``, at least twice the round-off
#: bound ``4 eps v`` of the estimate where the exact variance is 0.
VARIANCE_ULPS = 16


def centered_variance(xp: Any, m: Any, v: Any) -> Any:
    """Variance estimate ``max(v - m**2, 0)`` from first and second moments, 0 where it is round-off
    (docs/algorithms.md section 3.4, 3.9).

    The clamp removes negative round-off, which would otherwise push the SVAG factor above 1. An infinite
    second moment (``g^2`` overflowed: float32 gradients above ``~1.8e19``) gives an infinite variance estimate,
    also where ``m^2`` overflowed too (``inf - inf`` would be NaN): the variance factors are then 0, the step of
    that element is 0, as ``torch.optim.Adam``'s is when its ``exp_avg_sq`` overflows.

    **Rounding level.** ``d = v - m^2`` is set to 0 where adding ``d / (2 VARIANCE_ULPS)`` to ``v`` does not change
    ``v`` in the working precision:

        ``s = where(v + d / 32 > v, d, 0)``,  ``d = max(v - m^2, 0)``,

    that is, ``d`` is kept where ``d > 16 ulp(v)`` and is 0 where ``d < 16 ulp(v)``; at exactly ``16 ulp(v)`` IEEE
    round-half-to-even decides (``d`` is kept where the last significand bit of ``v`` is 1), the same on every
    backend. (For subnormal ``v`` the division ``d / 32`` itself rounds; there the estimate carries no digits.)

    Derivation. With unit round-off ``u = eps / 2`` and the bias-corrected estimates of one step,
    ``m = fl(fl(c g) / c)`` and ``v = fl(fl(c fl(g g)) / c)`` (``c = 1 - mu``; at ``t = 1`` the exact variance is 0),
    ``m^2`` carries ``(1 + d1)^2 (1 + d2)^2 (1 + d3)`` and ``v`` carries ``(1 + d4)(1 + d5)(1 + d6)`` with
    ``|d_i| <= u``; the subtraction is exact (Sterbenz), so the computed ``d`` is at most ``(5 + 3) u v = 4 eps v``
    of pure round-off. ``ulp(v)`` lies in ``(eps v / 2, eps v]``, so the threshold ``16 ulp(v)`` lies in
    ``(8 eps v, 16 eps v]``: at least twice that bound. It matters at ``t = 1``, where the released rules weight the
    estimate by ``1 / (1 - rho) = 1e4`` (the rho cap): float32 round-off of ``4 eps v`` became a relative variance of
    ``4.8e-3`` and the first SVAG / M-SVAG step was up to 0.5 % short, by an amount that depended on the backend's
    rounding. For ``t >= 2`` the weights are ``<= 2`` (``kappa(mu, 2) ~ 0.5``), so dropping a variance below
    ``16 eps v`` moves a factor by ``<= 32 eps``. Where ``d`` lies above the threshold the result is ``d`` bit for bit
    (the plain ``max(v - m^2, 0)``). One product, one sum, one comparison and a ``where``: elementwise and fusable
    on every backend (the factor ``1/32`` is a power of two, so the product is exact and an FMA gives the same
    comparison).

    Args:
        xp: array namespace.
        m: (bias-corrected) mean estimate.
        v: (bias-corrected) second-moment estimate.

    Returns:
        The clamped variance estimate, 0 where it is below the rounding level of ``v``.
    """
    d = xp.maximum(v - m * m, 0 * v)
    resolved = v + d * (0.5 / VARIANCE_ULPS) > v
    return xp.where(v == math.inf, v, xp.where(resolved, d, 0 * d))


def residual_variance_update(xp: Any, s: Any, g: Any, mean: Any, beta: Any, eps_s: Any) -> Any:
    """AdaBelief / MVN-Grad variance proxy ``s <- beta s + (1-beta) (g - mean)^2 + eps_s``.

    Spec 1.2 (AdaBelief, ``mean = m_t``, ``eps_s = eps``) and 2.3 step 3 (MVN-Grad, ``mean`` is
    ``m_t`` by default or ``m_{t-1}`` with ``residual="m_prev"``).

    Args:
        xp: array namespace.
        s: previous variance proxy.
        g: gradient.
        mean: the mean the residual is taken against.
        beta: decay.
        eps_s: variance floor added every step (>= 0).

    Returns:
        The updated proxy.
    """
    r = g - mean
    return beta * s + (1 - beta) * (r * r) + eps_s


def minibatch_variance(xp: Any, per_example_grads: Any, axis: int = 0) -> Any:
    """Unbiased variance of the mini-batch mean gradient (Balles & Hennig Eq. 44, unbiased form).

    ``s_hat = 1/|B| * 1/(|B|-1) * sum_k (grad_k - g)^2`` with ``g`` the batch mean. The formula
    printed in the paper, ``1/|B| [1/(|B|-1) sum_k grad_k^2 - g^2]``, is not unbiased although the
    text says so; we implement the unbiased form (docs/algorithms.md section 3.6).

    Args:
        xp: array namespace.
        per_example_grads: per-example gradients stacked along ``axis``.
        axis: the batch axis.

    Returns:
        ``s_hat`` with the batch axis removed.

    References:
        Balles & Hennig, Dissecting Adam, App. C.2, Eq. 44.
    """
    b = per_example_grads.shape[axis]
    mean = xp.mean(per_example_grads, axis=axis, keepdims=True)
    dev = per_example_grads - mean
    return xp.sum(dev * dev, axis=axis) / (b * (b - 1))


def minibatch_variance_from_moments(xp: Any, mean_grad: Any, mean_sq_grad: Any, batch_size: int) -> Any:
    """Eq. 44 (unbiased) from the batch mean ``g`` and the mean of squared per-example gradients.

    ``sum_k (grad_k - g)^2 = |B| (mean_sq - g^2)``, so ``s_hat = max(mean_sq - g^2, 0)/(|B| - 1)``.

    Args:
        xp: array namespace.
        mean_grad: ``g = 1/|B| sum_k grad_k``.
        mean_sq_grad: ``1/|B| sum_k grad_k^2``.
        batch_size: ``|B| >= 2``.

    Returns:
        ``s_hat``.
    """
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size!r} is invalid: the unbiased mini-batch variance needs batch_size >= 2")
    return centered_variance(xp, mean_grad, mean_sq_grad) / (batch_size - 1)
