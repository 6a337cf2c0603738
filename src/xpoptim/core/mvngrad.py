"""MVN-Grad: momentum on variance-normalised gradients (Patitucci & Mokhtari, arXiv 2602.10204).

**Provenance, plainly.** The paper's algorithm box could not be consulted (only the abstract, the
TL;DR, the theorem list and the captions were readable). The equations below follow a third-party
catalogue entry (junaidaliop/zij ``canon/math/mvngrad.md``); they agree with everything the abstract
states: per-coordinate normalisation by an EMA of gradient uncertainty (AdaBelief's residual
proxy) and momentum applied *after* normalisation (LaProp's ordering). See docs/algorithms.md section 2, where the
open points (residual against ``m_t`` or ``m_{t-1}``, eps placement, defaults, weight decay) are
listed. Defaults are our inference.
"""

from __future__ import annotations

from typing import Any

from ._backend import HOST
from .moments import bias_correction, ema, residual_variance_update
from .spec import ElementwiseSpec, Hyper, HyperKind, beta_hyper, concrete, eps_hyper, lr_hyper, wd_hyper
from .verification import Bound, Verification

__all__ = ["mvngrad_direction", "MVNGRAD"]


def mvngrad_direction(
    xp: Any,
    g: Any,
    m: Any,
    v: Any,
    u: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    eps_s: Any,
    bc1: Any,
    sqrt_bc2: Any,
    *,
    residual: str = "m_t",
) -> tuple:
    """One MVN-Grad step (docs/algorithms.md section 2.3).

    1. ``m_t = b1 m_{t-1} + (1-b1) g``   (mean tracker)
    2. ``v_t = b2 v_{t-1} + (1-b2) (g - r)^2 + eps_s``, ``r = m_t`` (default) or ``m_{t-1}``
    3. ``z_t = g / (sqrt(v_t / (1 - b2^t)) + eps)``   (variance-normalised gradient)
    4. ``u_t = b1 u_{t-1} + (1-b1) z_t``   (momentum after normalisation, same b1)
    5. ``d = u_t / (1 - b1^t)``

    Args:
        xp: array namespace.
        g: gradient.
        m, v, u: mean tracker, residual variance proxy, momentum of normalised gradients.
        beta1, beta2, eps, eps_s: hyperparameters (``eps_s`` is the variance floor added to v).
        bc1, sqrt_bc2: ``1 - b1^t`` and ``sqrt(1 - b2^t)``.
        residual: ``"m_t"`` or ``"m_prev"``. Since ``g - m_t = b1 (g - m_{t-1})`` the two differ only
            by a factor ``b1^2`` in v (with ``eps_s = 0``: lr and eps scaled by b1).

    Returns:
        ``(d, m, v, u)``.

    References:
        Patitucci & Mokhtari, MVN-Grad, arXiv 2602.10204 (algorithm reconstructed, see module
        docstring); docs/algorithms.md section 2.3.
    """
    m_new = ema(xp, m, g, beta1)
    v = residual_variance_update(xp, v, g, m_new if residual == "m_t" else m, beta2, eps_s)
    z = g / (xp.sqrt(v) / sqrt_bc2 + eps)
    u = ema(xp, u, z, beta1)
    return u / bc1, m_new, v, u


def _mvngrad_scalars(hp: dict, t: Any, ops: Any = HOST) -> tuple:
    b1, b2 = hp["beta1"], hp["beta2"]
    return (b1, b2, hp["eps"], hp["eps_s"], bias_correction(b1, t), ops.sqrt(bias_correction(b2, t)))


def _mvngrad_check(hp: dict) -> None:
    if concrete(hp["beta1"]) == 0.0 and concrete(hp["eps_s"]) == 0.0 and hp["residual"] == "m_t":
        raise ValueError(
            "MVNGrad: beta1=0.0 is invalid with residual='m_t' and eps_s=0: the residual g - m_t is then "
            "identically 0, v stays 0 and the step g/eps explodes (docs/algorithms.md section 2.4). Use 0 < beta1 < 1, eps_s > 0, "
            "or residual='m_prev'"
        )


MVNGRAD = ElementwiseSpec(
    name="mvngrad",
    title="MVNGrad",
    hyperparams=(
        lr_hyper(1e-3),
        beta_hyper("beta1", 0.9, "decay of the mean tracker and of the momentum (one beta1, docs/algorithms.md section 2.3)"),
        beta_hyper("beta2", 0.999, "decay of the residual variance proxy"),
        eps_hyper(1e-8, "added to sqrt(v_hat) (outside the sqrt); a real hyperparameter in low noise"),
        Hyper("eps_s", 0.0, HyperKind.NONNEG, "variance floor added to v every step (AdaBelief-style)"),
        wd_hyper(0.0),
        Hyper("residual", "m_t", HyperKind.CHOICE, "residual taken against m_t (default) or m_{t-1}", ("m_t", "m_prev")),
    ),
    state=("exp_avg", "exp_avg_var", "momentum"),
    scalars=_mvngrad_scalars,
    direction=mvngrad_direction,
    arguments={"exp_avg": "m", "exp_avg_var": "v", "momentum": "u"},
    conventions="normalise (by EMA of (g - m_t)^2 + eps_s, bias-corrected) then momentum; eps outside the sqrt; momentum bias-corrected; decoupled decay before [I]",
    source="arXiv 2602.10204 (algorithm box not read; equations from a third-party catalogue, docs/algorithms.md section 2)",
    check=_mvngrad_check,
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        variants=(("m_prev", {"lr": 1e-2, "weight_decay": 1e-2, "residual": "m_prev", "eps_s": 1e-12}),),
        trajectory_float32=Bound(
            1e-5,
            "measured max 1.9e-6 over 10 seeds; as AdaBelief (residual proxy), normalised before the momentum",
        ),
    ),
)
