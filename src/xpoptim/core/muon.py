"""Muon: Newton-Schulz orthogonalised momentum for matrix parameters (docs/algorithms.md section 5).

Convention (torch.optim.Muon, which follows KellerJordan/Muon): EMA momentum without bias correction
``B <- mu B + (1 - mu) g``; Nesterov input ``N = (1 - mu) g + mu B`` (default on); ``O = NS5(N)``;
``p <- p (1 - lr wd) - lr * scale * O`` with the decay using the *unadjusted* lr and the shape scale
``sqrt(max(1, fan_out/fan_in))`` by default. Non-matrix parameters (biases, norms, embeddings, the
output head: the adapters' routing helpers decide) go to an elementwise fallback rule, AdamW by
default with KellerJordan/Muon's auxiliary-Adam settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._backend import HOST
from .directions import NS_COEFFICIENTS, NS_PRENORMS, SHAPE_SCALES, newton_schulz, resolve_ns_coefficients
from .moments import ema
from .spec import Hyper, HyperKind, MatrixSpec, beta_hyper, lr_hyper, wd_hyper
from .verification import Bound, Verification

__all__ = [
    "muon_momentum",
    "muon_direction",
    "muon_options",
    "muon_ns_options",
    "muon_apply",
    "muon_init",
    "muon_state_shapes",
    "muon_elementwise_stage",
    "muon_matrix_stage",
    "muon_rule",
    "MUON",
    "NS_HYPERS",
    "ns_check",
]


def muon_momentum(xp: Any, g: Any, buf: Any, momentum: Any, *, nesterov: bool = True) -> tuple:
    """Muon's momentum and Newton-Schulz input (elementwise; docs/algorithms.md section 5.2).

    ``B <- B + (1 - mu)(g - B)`` (torch ``lerp``); ``N = g + mu (B - g)`` if Nesterov else ``B``.

    Args:
        xp: array namespace.
        g: gradient.
        buf: momentum buffer ``B``.
        momentum: ``mu``.
        nesterov: use the Nesterov input.

    Returns:
        ``(N, B)``.

    References:
        K. Jordan et al., Muon (2024), KellerJordan/Muon; torch.optim.Muon; docs/algorithms.md section 5.2.
    """
    buf = ema(xp, buf, g, momentum)
    n = g + momentum * (buf - g) if nesterov else buf  # torch: grad.lerp(buf, momentum)
    return n, buf


def muon_direction(
    xp: Any,
    g: Any,
    buf: Any,
    momentum: Any,
    *,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: Any = "quintic",
    ns_prenorm: str = "frobenius",
    ns_eps: float = 1e-7,
    ns_dtype: Any = None,
) -> tuple:
    """Muon's orthogonalised momentum for one matrix or a stack ``(..., n, m)``.

    ``(N, B) = muon_momentum(g, B)``; returns ``(NS(N), B)``.

    Args:
        xp: array namespace.
        g: gradient, shape ``(..., n, m)``.
        buf: momentum buffer ``B``.
        momentum: ``mu``.
        nesterov: use the Nesterov input.
        ns_steps, ns_coefficients, ns_prenorm, ns_eps, ns_dtype: Newton-Schulz options
            (see ``core.directions.newton_schulz``).

    Returns:
        ``(O, B)``.

    References:
        K. Jordan et al., Muon (2024), KellerJordan/Muon; torch.optim.Muon; docs/algorithms.md sections 5.1-5.2.
    """
    n, buf = muon_momentum(xp, g, buf, momentum, nesterov=nesterov)
    o = newton_schulz(
        xp, n, steps=ns_steps, coefficients=ns_coefficients, prenorm=ns_prenorm, eps=ns_eps, compute_dtype=ns_dtype
    )
    return o, buf


def muon_options(hp: dict) -> dict:
    """Keyword options of ``muon_direction`` from validated hyperparameters (one place for every caller)."""
    return {k: hp[k] for k in ("nesterov", "ns_steps", "ns_coefficients", "ns_prenorm", "ns_eps", "ns_dtype")}


def muon_ns_options(hp: dict) -> dict:
    """Keyword options of ``newton_schulz`` for Muon, from validated hyperparameters."""
    return {
        "steps": hp["ns_steps"],
        "coefficients": hp["ns_coefficients"],
        "prenorm": hp["ns_prenorm"],
        "eps": hp["ns_eps"],
        "compute_dtype": hp["ns_dtype"],
    }


def muon_apply(xp: Any, p: Any, o: Any, lr: Any, weight_decay: Any, scale: float) -> Any:
    """``p (1 - lr wd) - lr * scale * O``: decoupled decay with the unadjusted lr, then the step."""
    return p * (1 - lr * weight_decay) - (lr * scale) * o


def muon_init(xp: Any, like: Any, hp: Mapping[str, Any]) -> dict:
    """Muon's state at ``t = 0``: ``{"momentum_buffer": 0}`` shaped and typed like ``like``."""
    return {"momentum_buffer": xp.zeros_like(like)}


def muon_state_shapes(shape: tuple, hp: Mapping[str, Any]) -> dict:
    """Muon's state layout for an ``(n, m)`` matrix: the momentum buffer has the matrix's shape."""
    return {"momentum_buffer": tuple(shape)}


def muon_elementwise_stage(xp: Any, g: Any, state: Mapping[str, Any], hp: Mapping[str, Any]) -> tuple:
    """The elementwise part of Muon's step: ``(N, {"momentum_buffer": B})`` (see :func:`muon_momentum`)."""
    n, buf = muon_momentum(xp, g, state["momentum_buffer"], hp["momentum"], nesterov=hp["nesterov"])
    return n, {"momentum_buffer": buf}


def muon_matrix_stage(xp: Any, n: Any, hp: Mapping[str, Any]) -> Any:
    """The whole-matrix part of Muon's step: ``O = NS(N)`` (Newton-Schulz, ``core.directions.newton_schulz``)."""
    return newton_schulz(xp, n, **muon_ns_options(dict(hp)))


def muon_rule(xp: Any, phase: str, g: Any, state: Mapping[str, Any], hp: Mapping[str, Any], t: Any, scale: float, ops: Any = HOST) -> tuple:
    """Muon's direction ``(O, new_state)`` for ``MatrixSpec.direction`` (one phase; ``t`` and ``ops`` unused).

    ``(N, B) = muon_momentum(g, B)``; ``O = NS(N)``; the update ``p (1 - lr wd) - lr * scale * O`` is
    :func:`muon_apply`.
    """
    n, new_state = muon_elementwise_stage(xp, g, state, hp)
    return muon_matrix_stage(xp, n, hp), new_state


def ns_check(title: str, hp: dict) -> None:
    """Validate ``ns_coefficients`` against ``ns_steps`` when the hyperparameters are validated (not at the
    first step), with a message naming the argument and its value."""
    try:
        table = resolve_ns_coefficients(hp["ns_coefficients"], hp["ns_steps"])
        raw = hp["ns_coefficients"]
        rows = [] if isinstance(raw, str) else [row if isinstance(row, (tuple, list)) else [row] for row in raw]
        flat = [c for row in rows for c in row]
        if any(isinstance(c, bool) for c in flat) or not all(math.isfinite(c) for row in table for c in row):
            raise ValueError("coefficients must be finite real numbers")
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{title}: ns_coefficients={hp['ns_coefficients']!r} is invalid with ns_steps={hp['ns_steps']!r}: "
            f"expected one of {sorted(NS_COEFFICIENTS)}, an (a, b, c) triple of numbers or a table of ns_steps "
            f"such triples ({exc})"
        ) from None


#: Newton-Schulz hyperparameters shared by the matrix rules.
NS_HYPERS = (
    Hyper("ns_steps", 5, HyperKind.INT_POS, "Newton-Schulz iterations"),
    Hyper("ns_coefficients", "quintic", HyperKind.ANY, "'quintic', 'cubic', an (a, b, c) triple or a per-step table"),
    Hyper("ns_dtype", None, HyperKind.DTYPE, "dtype the iteration runs in (e.g. torch.bfloat16 or 'bfloat16'); None keeps the parameter dtype"),
)

#: The verifier's settings: a non-default row with the RMS-matching scale and plain momentum.
MUON_VERIFICATION = Verification(
    hp={"lr": 2e-2, "weight_decay": 0.1},
    variants=(
        (
            "rms,plain",
            {"lr": 2e-2, "weight_decay": 0.1, "nesterov": False, "shape_scale": "match_rms_adamw", "ns_prenorm": "frobenius_add"},
        ),
    ),
    float32=Bound(
        3e-4,
        "float32 Newton-Schulz: 5 quintic iterations amplify the rounding of small singular values (phi'(0) = 3.4 "
        "per iteration); matmul precision pinned (no TF32).",
    ),
    trajectory_float32=Bound(
        3e-5,
        "measured max 8.8e-6 over 10 seeds; Newton-Schulz: 5 iterations of a degree-5 polynomial (slope up to 3.4) "
        "amplify matmul round-off",
    ),
)

MUON = MatrixSpec(
    name="muon",
    title="Muon",
    hyperparams=(
        lr_hyper(1e-3),
        wd_hyper(0.1, "decoupled decay p(1 - lr wd) before the step, unadjusted lr (torch.optim.Muon default 0.1)"),
        beta_hyper("momentum", 0.95, "EMA momentum (no bias correction)"),
        Hyper("nesterov", True, HyperKind.BOOL, "Nesterov input (1 - mu) g + mu B"),
        *NS_HYPERS,
        Hyper("ns_prenorm", "frobenius", HyperKind.CHOICE, "pre-normalisation of Newton-Schulz", NS_PRENORMS),
        Hyper("ns_eps", 1e-7, HyperKind.NONNEG, "guard of the pre-normalisation (max(||X||_F, eps) for 'frobenius')"),
        Hyper("shape_scale", "original", HyperKind.CHOICE, "scale of the orthogonalised update, in fan terms", SHAPE_SCALES),
    ),
    fallback="adamw",
    fallback_defaults={"beta1": 0.9, "beta2": 0.95, "eps": 1e-10, "weight_decay": 0.0},
    state=("momentum_buffer",),
    init=muon_init,
    state_shapes=muon_state_shapes,
    direction=muon_rule,
    apply=muon_apply,
    decay="before",
    sharding="elementwise",
    elementwise_stage=muon_elementwise_stage,
    matrix_stage=muon_matrix_stage,
    check=lambda hp: ns_check("Muon", hp),
    conventions="EMA momentum, no bias correction, Nesterov on; NS5 quintic, X/max(||X||_F, 1e-7); scale sqrt(max(1, fan_out/fan_in)); decoupled decay before with the unadjusted lr (torch.optim.Muon)",
    source="KellerJordan/Muon; torch.optim.Muon",
    verification=MUON_VERIFICATION,
)
