"""The baselines of MVN-Grad: Adam, AdamW, AdaBelief and LaProp (docs/algorithms.md section 1).

Each rule is ``direction(xp, g, *state, *scalars) -> (d, *new_state)``; the parameter moves by
``-lr * d`` (see ``core.spec``). Step-derived scalars are computed by the spec's ``scalars``.
"""

from __future__ import annotations

from typing import Any

from ._backend import HOST
from .moments import bias_correction, ema, residual_variance_update
from .spec import ElementwiseSpec, beta_hyper, eps_hyper, lr_hyper, wd_hyper
from .verification import Bound, Verification

__all__ = [
    "adam_direction",
    "adabelief_direction",
    "laprop_direction",
    "ADAM",
    "ADAMW",
    "ADABELIEF",
    "LAPROP",
]


def _adam_scalars(hp: dict, t: Any, ops: Any = HOST) -> tuple:
    b1, b2 = hp["beta1"], hp["beta2"]
    return (b1, b2, hp["eps"], bias_correction(b1, t), ops.sqrt(bias_correction(b2, t)))


def adam_direction(xp: Any, g: Any, m: Any, v: Any, beta1: Any, beta2: Any, eps: Any, bc1: Any, sqrt_bc2: Any) -> tuple:
    """Adam (Kingma & Ba), torch/optax convention: eps outside the sqrt of the bias-corrected v.

    ``m <- b1 m + (1-b1) g``; ``v <- b2 v + (1-b2) g^2``;
    ``d = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`` with ``bc_i = 1 - b_i^t``.

    Args:
        xp: array namespace.
        g: gradient.
        m, v: first and second moments.
        beta1, beta2, eps: hyperparameters.
        bc1, sqrt_bc2: ``1 - beta1^t`` and ``sqrt(1 - beta2^t)``.

    Returns:
        ``(d, m, v)``.

    References:
        Kingma & Ba, Adam (2015), Alg. 1; docs/algorithms.md section 1.1.
    """
    m = ema(xp, m, g, beta1)
    v = beta2 * v + (1 - beta2) * (g * g)
    d = (m / bc1) / (xp.sqrt(v) / sqrt_bc2 + eps)
    return d, m, v


_ADAM_HYPERS = (
    lr_hyper(1e-3),
    beta_hyper("beta1", 0.9, "decay of the first moment"),
    beta_hyper("beta2", 0.999, "decay of the second moment"),
    eps_hyper(1e-8, "added to sqrt(v_hat) (outside the sqrt)"),
)

ADAM = ElementwiseSpec(
    name="adam",
    title="Adam",
    hyperparams=(*_ADAM_HYPERS, wd_hyper(0.0, "coupled L2 decay: g <- g + wd p (torch.optim.Adam)")),
    state=("exp_avg", "exp_avg_sq"),
    scalars=_adam_scalars,
    direction=adam_direction,
    arguments={"exp_avg": "m", "exp_avg_sq": "v"},
    weight_decay="coupled",
    conventions="eps outside sqrt(v_hat); both moments bias-corrected; weight decay coupled (L2 added to g)",
    source="Kingma & Ba 2015; torch.optim.Adam / optax.adam convention",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        trajectory_float32=Bound(
            1e-5,
            "measured max 1.8e-6 over 10 seeds; division by sqrt(v_hat) + eps: ~1 ulp per step, accumulated over 30 "
            "steps",
        ),
    ),
)

ADAMW = ElementwiseSpec(
    name="adamw",
    title="AdamW",
    hyperparams=(*_ADAM_HYPERS, wd_hyper(1e-2)),
    state=("exp_avg", "exp_avg_sq"),
    scalars=_adam_scalars,
    direction=adam_direction,
    arguments={"exp_avg": "m", "exp_avg_sq": "v"},
    weight_decay="decoupled",
    conventions="eps outside sqrt(v_hat); both moments bias-corrected; decoupled decay p(1 - lr wd) before the step",
    source="Loshchilov & Hutter 2019; torch.optim.AdamW convention (default wd 1e-2; optax's default is 1e-4)",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        trajectory_float32=Bound(
            1e-5,
            "measured max 2.6e-6 over 10 seeds; as Adam, plus the decay p (1 - lr wd) rounding in float32 every step",
        ),
    ),
)


def adabelief_direction(xp: Any, g: Any, m: Any, s: Any, beta1: Any, beta2: Any, eps: Any, bc1: Any, sqrt_bc2: Any) -> tuple:
    """AdaBelief as released (adabelief_pytorch 0.2.1, ``rectify=False``).

    ``m <- b1 m + (1-b1) g``; ``s <- b2 s + (1-b2)(g - m)^2 + eps`` (residual against the updated m,
    eps added into the state every step); ``d = (m / bc1) / (sqrt(s) / sqrt(bc2) + eps)``.

    References:
        Zhuang et al., AdaBelief (2020); juntang-zhuang/Adabelief-Optimizer; docs/algorithms.md section 1.2.
    """
    m = ema(xp, m, g, beta1)
    s = residual_variance_update(xp, s, g, m, beta2, eps)
    d = (m / bc1) / (xp.sqrt(s) / sqrt_bc2 + eps)
    return d, m, s


ADABELIEF = ElementwiseSpec(
    name="adabelief",
    title="AdaBelief",
    hyperparams=(
        lr_hyper(1e-3),
        beta_hyper("beta1", 0.9, "decay of the first moment"),
        beta_hyper("beta2", 0.999, "decay of the belief (residual) moment"),
        eps_hyper(1e-16, "added into s every step and to sqrt(s_hat) (package default 1e-16)"),
        wd_hyper(0.0),
    ),
    state=("exp_avg", "exp_avg_var"),
    scalars=_adam_scalars,
    direction=adabelief_direction,
    arguments={"exp_avg": "m", "exp_avg_var": "s"},
    conventions="eps added into s every step and outside sqrt(s_hat); bias-corrected; decoupled decay before; rectify=False",
    source="Zhuang et al. 2020; adabelief_pytorch 0.2.1 code",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        trajectory_float32=Bound(
            1e-5,
            "measured max 3.7e-6 over 10 seeds; as Adam; the residual (g - m)^2 cancels when g ~ m",
        ),
    ),
)


def laprop_direction(xp: Any, g: Any, v: Any, m: Any, beta1: Any, beta2: Any, eps: Any, bc1: Any, sqrt_bc2: Any) -> tuple:
    """LaProp: normalise first, then momentum.

    ``v <- b2 v + (1-b2) g^2``; ``n = g / (sqrt(v)/sqrt(bc2) + eps)``; ``m <- b1 m + (1-b1) n``;
    ``d = m / bc1``. With a constant lr this equals the repo's update; the repo folds lr into the
    momentum so that schedules only affect new contributions (we use the simple form, docs/algorithms.md section 1.3).

    References:
        Ziyin et al., LaProp (2020); Z-T-WANG/LaProp-Optimizer; docs/algorithms.md section 1.3.
    """
    v = beta2 * v + (1 - beta2) * (g * g)
    n = g / (xp.sqrt(v) / sqrt_bc2 + eps)
    m = ema(xp, m, n, beta1)
    return m / bc1, v, m


LAPROP = ElementwiseSpec(
    name="laprop",
    title="LaProp",
    hyperparams=(
        lr_hyper(4e-4),
        beta_hyper("beta1", 0.9, "momentum of the normalised gradient"),
        beta_hyper("beta2", 0.999, "decay of the second moment"),
        eps_hyper(1e-15, "added to sqrt(v_hat) (outside the sqrt)"),
        wd_hyper(0.0, "decoupled decay p(1 - lr wd) before the step (the repo's is not lr-scaled)"),
    ),
    state=("exp_avg_sq", "exp_avg"),
    scalars=_adam_scalars,
    direction=laprop_direction,
    arguments={"exp_avg_sq": "v", "exp_avg": "m"},
    conventions="normalise then momentum; eps outside sqrt(v_hat); momentum bias-corrected; lr not folded into the momentum; decoupled lr-scaled decay before",
    source="Ziyin et al. 2020; Z-T-WANG/LaProp-Optimizer (simple form)",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        trajectory_float32=Bound(1e-5, "measured max 1.8e-6 over 10 seeds; as Adam"),
    ),
)
