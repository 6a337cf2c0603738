"""Balles & Hennig, "Dissecting Adam": momentum SGD, M-SSD, SVAG, M-SVAG, ADAM* and the mini-batch
variants M-SVAG-mb and ADAM*-mb (docs/algorithms.md section 3).

All EMAs share one constant ``mu`` and are bias-corrected by ``1 - mu^t`` (docs/algorithms.md section 3.3: "we do not use
different moving average constants"). The relative variance of the momentum is estimated as
``w * max(v - m^2, 0) / m^2`` with ``w = kappa(mu, t)`` (Eq. 19, the seed's Alg. 2 and 4) or, for
(M-)SVAG with ``variance_unbiasing=True`` (default), the published/authors' ``rho/(1-rho)``
(docs/algorithms.md section 3.9). Divisions use closed forms that never divide by m. A variance estimate below
its rounding level (``16 ulp(v)``, ``core.moments.centered_variance``) counts as 0: at t = 1, where the released
weight is ``1e4``, the estimate is pure round-off (docs/algorithms.md sections 3.4 and 3.9).
"""

from __future__ import annotations

from typing import Any

from ._backend import HOST
from .directions import sign
from .factors import adam_star_direction, erf_factor, kappa, svag_direction, svag_factor, unbiasing_weight
from .moments import bias_correction, centered_variance, ema, ema_sum
from .spec import ElementwiseSpec, Hyper, HyperKind, beta_hyper, concrete, lr_hyper, wd_hyper
from .verification import SIGN_FLOAT32, Bound, Verification

__all__ = [
    "sgd_direction",
    "mssd_direction",
    "M_SSD_FLUSH",
    "svag_rule_direction",
    "msvag_direction",
    "adam_star_rule_direction",
    "msvag_mb_direction",
    "adam_star_mb_direction",
    "SGD",
    "MSSD",
    "SVAG",
    "MSVAG",
    "ADAM_STAR",
    "MSVAG_MB",
    "ADAM_STAR_MB",
]

_MU = beta_hyper("mu", 0.9, "momentum / EMA constant shared by both moments (paper default 0.9)")
_LR_TUNED = lr_hyper(1e-3)  # the papers tune alpha; 1e-3 is our placeholder default [I]
_WD = wd_hyper(0.0, "decoupled decay p(1 - lr wd) before the step (not in the paper; 0 by default) [I]")


# ----------------------------------------------------------------------------------------------
# Momentum SGD (torch.optim.SGD convention) and M-SSD
# ----------------------------------------------------------------------------------------------


def sgd_direction(xp: Any, g: Any, buf: Any, momentum: Any, gscale: Any, *, nesterov: bool = False) -> tuple:
    """Heavy-ball momentum SGD, torch.optim.SGD convention.

    ``buf <- momentum buf + gscale g`` with ``gscale = 1`` at t = 1 (torch seeds the buffer with the
    gradient) and ``1 - dampening`` after; ``d = g + momentum buf`` (Nesterov) or ``buf``. With
    ``dampening = 0`` this is Balles & Hennig's M-SGD ``r_t = mu r_{t-1} + g_t``.

    References:
        Polyak 1964; Sutskever et al. 2013; torch.optim.SGD; docs/algorithms.md section 3.4 (M-SGD).
    """
    buf = momentum * buf + gscale * g
    d = g + momentum * buf if nesterov else buf
    return d, buf


def _sgd_scalars(hp: dict, t: Any, ops: Any = HOST) -> tuple:
    # torch.optim.SGD keeps no buffer without momentum, so dampening has no effect there.
    gscale = ops.where(t == 1, 1.0, 1.0 - hp["dampening"])
    return (hp["momentum"], ops.where(hp["momentum"] == 0, 1.0, gscale))


def _sgd_check(hp: dict) -> None:
    if hp["nesterov"]:
        momentum, dampening = concrete(hp["momentum"]), concrete(hp["dampening"])
        if momentum is None or dampening is None:
            return  # traced: checked when concrete
        if momentum <= 0 or dampening != 0:
            raise ValueError(
                f"SGD: nesterov=True is invalid with momentum={hp['momentum']!r}, dampening={hp['dampening']!r}: "
                "Nesterov momentum needs momentum > 0 and dampening = 0"
            )


SGD = ElementwiseSpec(
    name="sgd",
    title="SGD",
    hyperparams=(
        lr_hyper(1e-3),
        beta_hyper("momentum", 0.9, "heavy-ball momentum (sum form, no (1 - mu))"),
        Hyper("dampening", 0.0, HyperKind.BETA, "dampening of the gradient after the first step (torch)"),
        wd_hyper(0.0, "coupled L2 decay: g <- g + wd p (torch.optim.SGD)"),
        Hyper("nesterov", False, HyperKind.BOOL, "Nesterov momentum d = g + momentum buf"),
    ),
    state=("momentum_buffer",),
    scalars=_sgd_scalars,
    direction=sgd_direction,
    arguments={"momentum_buffer": "buf"},
    weight_decay="coupled",
    conventions="sum-form momentum seeded with g at t = 1; no bias correction; coupled L2 decay (torch.optim.SGD)",
    source="torch.optim.SGD; Balles & Hennig M-SGD (dampening 0)",
    check=_sgd_check,
    verification=Verification(
        hp={"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2},
        variants=(("nesterov", {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": True}),),
        train_lr=0.1,
        trajectory_float32=Bound(1e-6, "measured max 2.5e-7 over 10 seeds; no division: only accumulation round-off"),
    ),
)


#: M-SSD's momentum is set to 0 where its magnitude falls below ``2^-126`` (the smallest normal float32, ~1.2e-38).
M_SSD_FLUSH = 2.0**-126


def mssd_direction(xp: Any, g: Any, m: Any, mu: Any) -> tuple:
    """M-SSD, momentum stochastic sign descent (Alg. 1): ``m <- mu m + g``; ``d = sign(m)``.

    ``sign(0) = 0``, so a zero momentum does not move. A nonzero momentum moves by the full step however small
    it is: after the gradients become 0, ``m = mu^k m_0`` decays but its sign stays, so the parameter keeps moving
    by ``lr`` per step (the rule's own behaviour) until ``m`` reaches 0. Where that happens depended on the backend
    (NumPy and torch keep subnormal numbers, XLA flushes them to 0), so the momentum is flushed to 0 below
    :data:`M_SSD_FLUSH` on every backend: with float32 or float64 state, ``m_0 = 1`` and ``mu = 0.9`` the
    parameter moves for 828 more steps everywhere (``mu^k >= 2^-126`` for ``k <= 828``).

    References:
        Balles & Hennig, Dissecting Adam, Alg. 1; docs/algorithms.md section 3.2.
    """
    m = ema_sum(xp, m, g, mu)
    m = xp.where(xp.abs(m) < M_SSD_FLUSH, 0 * m, m)
    return sign(xp, m), m


MSSD = ElementwiseSpec(
    name="mssd",
    title="MSSD",
    hyperparams=(_LR_TUNED, _MU, _WD),
    state=("momentum",),
    scalars=lambda hp, t, ops=HOST: (hp["mu"],),
    direction=mssd_direction,
    arguments={"momentum": "m"},
    conventions="sum-form momentum m = mu m + g; sign(0) = 0; no eps",
    source="Balles & Hennig, Alg. 1",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2}, float32=SIGN_FLOAT32,
        trajectory_float32=Bound(
            1e-5,
            "measured max 1.8e-6 over 10 seeds; sign(m): a coordinate whose momentum is within round-off of 0 can "
            "flip sign",
        ),
    ),
)


# ----------------------------------------------------------------------------------------------
# SVAG, M-SVAG, ADAM* (EMA variants)
# ----------------------------------------------------------------------------------------------


def _moments(xp: Any, g: Any, m: Any, v: Any, mu: Any, bc: Any) -> tuple:
    m = ema(xp, m, g, mu)
    v = ema(xp, v, g * g, mu)
    m_hat = m / bc
    return m, v, m_hat, centered_variance(xp, m_hat, v / bc)


def svag_rule_direction(xp: Any, g: Any, m: Any, v: Any, mu: Any, bc: Any, weight: Any) -> tuple:
    """SVAG: ``d = gamma g``, ``gamma = m^2 / (m^2 + w max(v - m^2, 0))`` on bias-corrected EMAs.

    ``w = 1/(1 - rho)`` (authors' code, the unbiased variance of one gradient) or 1 (the seed's
    ``eta^2 = (v - m^2)/m^2``). ``gamma`` lies in [0, 1] and is 0 where ``m = 0``.

    References:
        Balles & Hennig, Dissecting Adam, section 3.2; lballes/msvag ``SVAGOptimizer``; docs/algorithms.md section 3.3.
    """
    m, v, m_hat, var = _moments(xp, g, m, v, mu, bc)
    return svag_factor(xp, m_hat, weight * var) * g, m, v


def msvag_direction(xp: Any, g: Any, m: Any, v: Any, mu: Any, bc: Any, weight: Any) -> tuple:
    """M-SVAG (Alg. 2): ``d = m^3 / (m^2 + w max(v - m^2, 0))`` on bias-corrected EMAs.

    ``w = kappa(mu, t)`` (seed Alg. 2) or ``rho/(1 - rho)`` (published; default). ``m = 0`` gives 0,
    also when ``v = 0`` (0/0 := 0). At t = 1 the step is ``g``.

    References:
        Balles & Hennig, Dissecting Adam, Alg. 2; arXiv 1705.07774; lballes/msvag; docs/algorithms.md section 3.4, 3.9.
    """
    m, v, m_hat, var = _moments(xp, g, m, v, mu, bc)
    return svag_direction(xp, m_hat, weight * var), m, v


def adam_star_rule_direction(xp: Any, g: Any, m: Any, v: Any, mu: Any, bc: Any, weight: Any, *, adaptation: str = "adam") -> tuple:
    """ADAM* (Alg. 4): ``d = gamma sign(m)`` with ``eta^2 = kappa (v - m^2)/m^2``.

    ``adaptation="adam"``: ``gamma = (1 + eta^2)^(-1/2)``, i.e. ``d = m / sqrt(m^2 + kappa (v - m^2))``;
    ``adaptation="erf"``: ``gamma = erf(|m| / sqrt(2 kappa (v - m^2)))`` (sign-optimal, docs/algorithms.md section 3.7).
    "ADAM with beta1 = beta2 = mu, eps = 0, except for kappa."

    References:
        Balles & Hennig, Dissecting Adam, Alg. 4, Eq. 8, 15; docs/algorithms.md section 3.5, 3.7.
    """
    m, v, m_hat, var = _moments(xp, g, m, v, mu, bc)
    s = weight * var
    if adaptation == "erf":
        return erf_factor(xp, m_hat, s) * sign(xp, m_hat), m, v
    return adam_star_direction(xp, m_hat, s), m, v


def _svag_scalars(hp: dict, t: Any, ops: Any = HOST) -> tuple:
    mu = hp["mu"]
    if hp.get("variance_unbiasing", False):
        weight = 1 / (1 - ops.minimum(kappa(mu, t), 0.9999))
    else:
        weight = 1.0 + 0 * mu
    return (mu, bias_correction(mu, t), weight)


def _msvag_scalars(hp: dict, t: Any, ops: Any = HOST) -> tuple:
    mu = hp["mu"]
    weight = unbiasing_weight(mu, t, ops) if hp.get("variance_unbiasing", False) else kappa(mu, t)
    return (mu, bias_correction(mu, t), weight)


def _mu_check(title: str):
    def check(hp: dict) -> None:
        if concrete(hp["mu"]) == 0.0:
            raise ValueError(
                f"{title}: mu=0.0 is invalid: with mu = 0 the moment estimates equal g and g^2, the variance "
                "estimate v - m^2 is identically 0 and kappa is undefined (0/0 at t >= 2); expected 0 < mu < 1"
            )

    return check


_UNBIAS = Hyper(
    "variance_unbiasing",
    True,
    HyperKind.BOOL,
    "True: published/authors' rho/(1-rho) weighting (lballes/msvag); False: the seed's literal Alg. 2 (kappa)",
)

SVAG = ElementwiseSpec(
    name="svag",
    title="SVAG",
    hyperparams=(_LR_TUNED, _MU, _WD, _UNBIAS),
    state=("exp_avg", "exp_avg_sq"),
    scalars=_svag_scalars,
    direction=svag_rule_direction,
    arguments={"exp_avg": "m", "exp_avg_sq": "v"},
    conventions="gamma = m^2/(m^2 + s), s = (v - m^2)/(1 - rho) (code) or v - m^2 (paper); bias-corrected EMAs; no eps; 0/0 := 0",
    source="Balles & Hennig section 3.2; lballes/msvag SVAGOptimizer",
    check=_mu_check("SVAG"),
    verification=Verification(
        hp={"lr": 2e-2, "weight_decay": 1e-2}, train_lr=0.2,
        trajectory_float32=Bound(
            2e-6,
            "measured max 5.0e-7 over 10 seeds; bias-corrected EMAs and v - m^2; at t = 1 the estimate is round-off "
            "(<= 4 eps v), which counts as 0, so the 1e4 weight of the rho cap multiplies nothing",
        ),
    ),
)

MSVAG = ElementwiseSpec(
    name="msvag",
    title="MSVAG",
    hyperparams=(_LR_TUNED, _MU, _WD, _UNBIAS),
    state=("exp_avg", "exp_avg_sq"),
    scalars=_msvag_scalars,
    direction=msvag_direction,
    arguments={"exp_avg": "m", "exp_avg_sq": "v"},
    conventions="d = m^3/(m^2 + w (v - m^2)), w = rho/(1-rho) (published, default) or kappa (seed Alg. 2); bias-corrected EMAs; no eps; 0/0 := 0",
    source="Balles & Hennig Alg. 2; arXiv 1705.07774; lballes/msvag",
    check=_mu_check("MSVAG"),
    verification=Verification(
        hp={"lr": 2e-2, "weight_decay": 1e-2},
        variants=(("kappa", {"lr": 2e-2, "weight_decay": 1e-2, "variance_unbiasing": False}),),
        train_lr=0.2,
        trajectory_float32=Bound(2e-6, "measured max 4.6e-7 over 10 seeds; as SVAG"),
    ),
)

_ADAPT = Hyper(
    "adaptation",
    "adam",
    HyperKind.CHOICE,
    "variance factor on sign(m): 'adam' (1+eta^2)^-1/2 or 'erf' erf(1/(sqrt(2) eta))",
    ("adam", "erf"),
)

ADAM_STAR = ElementwiseSpec(
    name="adam_star",
    title="AdamStar",
    hyperparams=(_LR_TUNED, _MU, _WD, _ADAPT),
    state=("exp_avg", "exp_avg_sq"),
    scalars=lambda hp, t, ops=HOST: (hp["mu"], bias_correction(hp["mu"], t), kappa(hp["mu"], t)),
    direction=adam_star_rule_direction,
    arguments={"exp_avg": "m", "exp_avg_sq": "v"},
    conventions="d = m/sqrt(m^2 + kappa (v - m^2)) (Adam with beta1 = beta2 = mu, eps = 0, plus kappa); erf option; 0/0 := 0",
    source="Balles & Hennig Alg. 4, section 3.1",
    check=_mu_check("AdamStar"),
    fusable=lambda hp: hp["adaptation"] != "erf",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        variants=(("erf", {"lr": 1e-2, "weight_decay": 1e-2, "adaptation": "erf"}),),
        trajectory_float32=Bound(
            1e-5,
            "measured max 1.4e-6 over 10 seeds; kappa(mu, 1) = 1 (no amplification); sign(m) near m = 0",
        ),
    ),
)


# ----------------------------------------------------------------------------------------------
# Mini-batch variance variants (Algs 3 and 5)
# ----------------------------------------------------------------------------------------------


def _variance_domain(xp: Any, s_hat: Any) -> Any:
    """``s_hat`` where it is a variance (``>= 0``), NaN where it is negative (``sqrt`` of a negative number).

    A negative per-example variance would make ``m^2 + s_bar`` small or negative and the factor exceed 1
    silently; NaN marks the element instead (a NaN ``s_hat`` stays NaN). The eager adapters refuse such input
    before the step; a traced one (``jax.jit``) gets NaN updates there, which ``optax.apply_if_finite`` skips.
    """
    return xp.where(s_hat >= 0, s_hat, xp.sqrt(s_hat))


def msvag_mb_direction(xp: Any, g: Any, s_hat: Any, m: Any, s_bar: Any, mu: Any) -> tuple:
    """M-SVAG-mb (Alg. 3): ``m <- mu m + g``, ``s_bar <- mu^2 s_bar + s_hat`` (Eq. 48),
    ``d = m^3 / (m^2 + s_bar)``.

    Args:
        xp: array namespace.
        g: mini-batch mean gradient.
        s_hat: its per-example variance estimate (Eq. 44, unbiased; see
            ``core.moments.minibatch_variance``).
        m, s_bar: sum-form momentum and the aggregated variance of m.
        mu: momentum constant.

    References:
        Balles & Hennig, Dissecting Adam, App. C.2/D, Alg. 3, Eq. 44, 48; docs/algorithms.md section 3.6.
    """
    m = ema_sum(xp, m, g, mu)
    s_bar = ema_sum(xp, s_bar, _variance_domain(xp, s_hat), mu * mu)
    return svag_direction(xp, m, s_bar), m, s_bar


def adam_star_mb_direction(xp: Any, g: Any, s_hat: Any, m: Any, s_bar: Any, mu: Any, *, adaptation: str = "adam") -> tuple:
    """ADAM*-mb (Alg. 5): as M-SVAG-mb with ``d = m / sqrt(m^2 + s_bar)`` (or the erf factor).

    References:
        Balles & Hennig, Dissecting Adam, Alg. 5, Eq. 48; docs/algorithms.md section 3.6.
    """
    m = ema_sum(xp, m, g, mu)
    s_bar = ema_sum(xp, s_bar, _variance_domain(xp, s_hat), mu * mu)
    if adaptation == "erf":
        return erf_factor(xp, m, s_bar) * sign(xp, m), m, s_bar
    return adam_star_direction(xp, m, s_bar), m, s_bar


MSVAG_MB = ElementwiseSpec(
    name="msvag_mb",
    title="MSVAGMB",
    hyperparams=(_LR_TUNED, _MU, _WD),
    state=("momentum", "momentum_var"),
    extras=("grad_variance",),
    scalars=lambda hp, t, ops=HOST: (hp["mu"],),
    direction=msvag_mb_direction,
    arguments={"grad_variance": "s_hat", "momentum": "m", "momentum_var": "s_bar"},
    conventions="sum-form m = mu m + g; s_bar = mu^2 s_bar + s_hat (unbiased Eq. 44); d = m^3/(m^2 + s_bar); no bias correction; 0/0 := 0",
    source="Balles & Hennig Alg. 3 (Eq. 44 in its unbiased form, Eq. 48)",
    verification=Verification(
        hp={"lr": 2e-3, "weight_decay": 1e-2}, train_lr=0.05,
        trajectory_float32=Bound(
            1e-5,
            "measured max 9.5e-7 over 10 seeds; sum-form moments, closed form m^3/(m^2 + s_bar)",
        ),
    ),
)

ADAM_STAR_MB = ElementwiseSpec(
    name="adam_star_mb",
    title="AdamStarMB",
    hyperparams=(_LR_TUNED, _MU, _WD, _ADAPT),
    state=("momentum", "momentum_var"),
    extras=("grad_variance",),
    scalars=lambda hp, t, ops=HOST: (hp["mu"],),
    direction=adam_star_mb_direction,
    arguments={"grad_variance": "s_hat", "momentum": "m", "momentum_var": "s_bar"},
    conventions="sum-form m = mu m + g; s_bar = mu^2 s_bar + s_hat; d = m/sqrt(m^2 + s_bar); erf option; 0/0 := 0",
    source="Balles & Hennig Alg. 5 (Eq. 44 in its unbiased form, Eq. 48)",
    fusable=lambda hp: hp["adaptation"] != "erf",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        variants=(("erf", {"lr": 1e-2, "weight_decay": 1e-2, "adaptation": "erf"}),),
        trajectory_float32=Bound(1e-5, "measured max 9.5e-7 over 10 seeds; sum-form moments; sign(m) near m = 0"),
    ),
)
