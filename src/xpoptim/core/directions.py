"""Direction maps: identity, elementwise sign and spectral orthogonalisation (Newton-Schulz).

Also the shape scales that the matrix rules multiply their orthogonalised direction by. Spec
references are to ``docs/algorithms.md`` sections 0, 5 and 7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._backend import matmul, matmul_add
from .moments import finite

__all__ = [
    "sign",
    "newton_schulz",
    "NS_COEFFICIENTS",
    "NS_PRENORMS",
    "SHAPE_SCALES",
    "shape_scale",
    "resolve_ns_coefficients",
]


def sign(xp: Any, x: Any) -> Any:
    """Elementwise sign with ``sign(0) = 0`` (docs/algorithms.md section 0; Balles & Hennig footnote 3)."""
    return xp.sign(x)


#: Named Newton-Schulz coefficient presets. ``"quintic"`` is Keller Jordan's (a, b, c), used by
#: KellerJordan/Muon, torch.optim.Muon, optax.contrib.muon (default) and the DeVA repo.
NS_COEFFICIENTS: dict[str, tuple[float, float, float]] = {
    "quintic": (3.4445, -4.7750, 2.0315),
    # The classical cubic Newton-Schulz iteration X <- 1.5 X - 0.5 X X^T X (converges to the polar
    # factor, slowly from small singular values).
    "cubic": (1.5, -0.5, 0.0),
}

#: Pre-normalisations: ``"frobenius"`` divides by ``max(||X||_F, eps)`` (torch.optim.Muon);
#: ``"frobenius_add"`` by ``||X||_F + eps`` (KellerJordan/Muon, optax); ``"schatten8"`` by
#: ``sqrt(||X||_F^2 + eps)`` and, in the first iteration, by the Schatten-8 norm
#: ``||(X X^T)^2||_F^(1/4)`` (DeVA repo ``msign``).
NS_PRENORMS = ("frobenius", "frobenius_add", "schatten8")


def resolve_ns_coefficients(
    coefficients: str | Sequence[float] | Sequence[Sequence[float]], steps: int
) -> tuple[tuple[float, float, float], ...]:
    """Expand a preset name, a single (a, b, c) triple or a per-step table into ``steps`` triples.

    Args:
        coefficients: a key of ``NS_COEFFICIENTS``, one triple, or a table of ``steps`` triples.
        steps: number of iterations (>= 1).

    Returns:
        A tuple of ``steps`` (a, b, c) triples.

    Raises:
        ValueError: for an unknown preset, a malformed triple or a table of the wrong length.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"ns_steps={steps!r} is invalid: expected an integer >= 1")
    if isinstance(coefficients, str):
        if coefficients not in NS_COEFFICIENTS:
            raise ValueError(
                f"ns_coefficients={coefficients!r} is invalid: expected one of {sorted(NS_COEFFICIENTS)}, "
                "an (a, b, c) triple or a per-step table of triples"
            )
        return (NS_COEFFICIENTS[coefficients],) * steps
    coeffs: tuple[Any, ...] = tuple(coefficients)
    if len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        return (tuple(float(c) for c in coeffs),) * steps  # type: ignore[return-value]
    table = tuple(tuple(float(c) for c in row) for row in coeffs)
    if any(len(row) != 3 for row in table) or len(table) != steps:
        raise ValueError(
            f"ns_coefficients={coefficients!r} is invalid: a per-step table needs exactly ns_steps={steps} "
            "rows of three numbers (a, b, c)"
        )
    return table  # type: ignore[return-value]


def _sum_sq(xp: Any, x: Any) -> Any:
    return xp.sum(x * x, axis=(-2, -1), keepdims=True)


def _prenorm_scaled(xp: Any, x: Any) -> Any:
    """``X / ||X||_F`` computed as ``(X / max|X|) / ||X / max|X| ||_F``: no square of a large entry is formed.

    The pre-normalisation uses it where ``sum(X^2)`` overflows (float32 entries above ``~1e19``, float16 above
    ``~256``): the plain forms would give ``inf / inf`` or ``0 * inf`` (NaN). There ``||X||_F`` is far above any
    ``eps`` guard, so every pre-normalisation reduces to the Frobenius one. A matrix holding an infinity or a NaN
    still gives NaN.
    """
    amax = xp.max(xp.abs(x), axis=(-2, -1), keepdims=True)
    unit = x / xp.where(amax > 0, amax, 1 + 0 * amax)
    sq = _sum_sq(xp, unit)
    return unit / xp.sqrt(xp.where(sq > 0, sq, 1 + 0 * sq))


def newton_schulz(
    xp: Any,
    x: Any,
    *,
    steps: int = 5,
    coefficients: str | Sequence[float] | Sequence[Sequence[float]] = "quintic",
    prenorm: str = "frobenius",
    eps: float = 1e-7,
    compute_dtype: Any = None,
    transpose_if_tall: bool = True,
) -> Any:
    """Approximate the orthogonal polar factor ``msign(X) = U V^T`` by Newton-Schulz iteration.

    With ``A = X X^T`` each step is ``X <- a X + (b A + c A^2) X``; on singular values it applies
    ``phi(s) = a s + b s^3 + c s^5``. The pre-normalisation is overflow-safe: where ``sum(X^2)`` overflows it is
    taken on ``X / max|X|`` (the same result, see ``_prenorm_scaled``). With the quintic coefficients and 5 steps, normalised singular
    values >= 0.01 land in [0.68, 1.13] rather than exactly 1 (docs/algorithms.md section 5.1). ``NS(X^T) = NS(X)^T`` and
    ``NS(0) = 0``. Works on one matrix or a stack (leading axes are batch axes). Each step is three
    GEMMs: ``A = X X^T``, ``b A + c A A`` and ``a X + (.) X``, the last two accumulating in the GEMM
    (``_backend.matmul_add``: ``addmm`` on torch, as torch.optim.Muon does).

    Args:
        xp: array namespace.
        x: array of shape ``(..., n, m)``.
        steps: number of iterations.
        coefficients: preset name, one (a, b, c) triple, or a table with one triple per step.
        prenorm: ``"frobenius"``, ``"frobenius_add"`` or ``"schatten8"`` (see ``NS_PRENORMS``).
        eps: the guard of the pre-normalisation.
        compute_dtype: dtype to iterate in (e.g. bfloat16 on torch/JAX), a dtype object or its name;
            ``None`` keeps ``x.dtype``.
            The result is cast back to ``x.dtype``.
        transpose_if_tall: iterate on ``X^T`` when ``n > m`` so the Gram matrix is the smaller one.

    Returns:
        The orthogonalised array, same shape and dtype as ``x``.

    References:
        K. Jordan et al., Muon (KellerJordan/Muon); torch.optim.Muon; DeVA repo ``msign`` (docs/algorithms.md sections 5.1-5.3).
    """
    if prenorm not in NS_PRENORMS:
        raise ValueError(f"ns_prenorm={prenorm!r} is invalid: expected one of {NS_PRENORMS}")
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs an array with at least 2 dimensions, got shape {tuple(x.shape)}")
    table = resolve_ns_coefficients(coefficients, steps)
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        return x  # an empty matrix (a zero-size layer): nothing to orthogonalise
    out_dtype = x.dtype
    if isinstance(compute_dtype, str):  # a dtype by name ("bfloat16"): the namespace's own
        if not hasattr(xp, compute_dtype):
            raise ValueError(f"ns_dtype={compute_dtype!r} is invalid here: the array namespace {getattr(xp, '__name__', xp)} has no such dtype")
        compute_dtype = getattr(xp, compute_dtype)
    if compute_dtype is not None and compute_dtype != x.dtype:
        x = xp.astype(x, compute_dtype)
    tall = transpose_if_tall and x.shape[-2] > x.shape[-1]
    if tall:
        x = xp.matrix_transpose(x)

    sq = _sum_sq(xp, x)
    if prenorm == "frobenius":
        norm = xp.sqrt(sq)
        normed = x / xp.maximum(norm, eps + 0 * norm)
    elif prenorm == "frobenius_add":
        normed = x / (xp.sqrt(sq) + eps)
    else:  # schatten8
        normed = x / xp.sqrt(sq + eps)
    x = xp.where(finite(xp, sq), normed, _prenorm_scaled(xp, x))

    for i, (a, b, c) in enumerate(table):
        gram = matmul(xp, x, xp.matrix_transpose(x))
        if i == 0 and prenorm == "schatten8":
            # Schatten-8 norm ||X||_S8 = ||(X X^T)^2||_F^(1/4); rescale X, A and A^2 consistently.
            gram2 = matmul(xp, gram, gram)
            s8 = xp.sqrt(xp.sqrt(xp.sqrt(_sum_sq(xp, gram2))))
            s8 = xp.where(s8 > 0, s8, 1 + 0 * s8)
            x = x / s8
            gram = gram / (s8 * s8)
            gram2 = gram2 / (s8 * s8 * s8 * s8)
            poly = b * gram + c * gram2
        else:
            poly = matmul_add(xp, gram, gram, gram, alpha=c, beta=b)  # b A + c A^2, one GEMM
        x = matmul_add(xp, x, poly, x, alpha=1.0, beta=a)  # a X + (b A + c A^2) X, one GEMM

    if tall:
        x = xp.matrix_transpose(x)
    if x.dtype != out_dtype:
        x = xp.astype(x, out_dtype)
    return x


#: Shape scales for the matrix rules, in fan terms (docs/algorithms.md section 5.3). ``fan_out`` is the output dimension
#: (rows of a torch ``Linear.weight``, columns of a flax kernel), ``fan_in`` the reduction dimension.
SHAPE_SCALES = ("original", "match_rms_adamw", "deva_muon", "none")


def shape_scale(kind: str, fan_in: int, fan_out: int) -> float:
    """Scale a matrix rule multiplies its orthogonalised direction by.

    * ``"original"``: ``sqrt(max(1, fan_out / fan_in))`` (KellerJordan/Muon, torch.optim.Muon default,
      optax width scaling);
    * ``"match_rms_adamw"``: ``0.2 sqrt(max(fan_in, fan_out))`` (Moonshot; torch ``match_rms_adamw``,
      optax ``consistent_rms=0.2``, DeVA_Sinf's ``rms_align_factor``);
    * ``"deva_muon"``: ``sqrt(max(fan_in, fan_out))`` (the DeVA repo's Muon);
    * ``"none"``: 1.

    Args:
        kind: one of ``SHAPE_SCALES``.
        fan_in: size of the reduction (input) axis.
        fan_out: size of the output axis.

    Returns:
        The scale as a Python float.
    """
    if kind == "original":
        return math.sqrt(max(1.0, fan_out / fan_in)) if fan_in > 0 else 1.0  # a zero-size matrix: nothing to scale
    if kind == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    if kind == "deva_muon":
        return math.sqrt(max(fan_in, fan_out))
    if kind == "none":
        return 1.0
    raise ValueError(f"shape_scale={kind!r} is invalid: expected one of {SHAPE_SCALES}")
