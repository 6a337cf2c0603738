"""A functional driver over any spec: ``init`` and ``step`` on one array (or a stack of matrices).

This is the reference way to run a core rule on any array namespace; the adapters add layout
(flat buckets, routing, compiled kernels) and framework conventions on top, and must give the same
numbers. State is a dict of named arrays; the step count ``t`` (the step being taken, ``t >= 1``) is
passed in by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._backend import HOST, array_namespace
from .directions import shape_scale
from .spec import ElementwiseSpec, MatrixSpec, make_step_kernel, step_scalars

__all__ = ["init", "step", "matrix_scale"]


def init(spec: ElementwiseSpec | MatrixSpec, param: Any, hp: Mapping[str, Any] | None = None, *, state_dtype: Any = None) -> dict:
    """Zero state for ``param`` under ``spec``.

    Args:
        spec: the optimizer spec.
        param: the parameter array (a matrix or stack of matrices for matrix specs).
        hp: validated hyperparameters (defaults when omitted).
        state_dtype: dtype of floating state (default: the parameter's dtype).

    Returns:
        A dict of named state arrays.
    """
    xp = array_namespace(param)
    hp = spec.validate(**(hp or {}))
    like = param if state_dtype is None or state_dtype == param.dtype else xp.astype(param, state_dtype)
    if isinstance(spec, MatrixSpec):
        return spec.init(xp, like, hp)
    return {name: xp.zeros_like(like) for name in spec.state}


def matrix_scale(spec: MatrixSpec, hp: Mapping[str, Any], shape: tuple, layout: str = "out_in") -> float:
    """The shape scale of a matrix rule for a parameter of ``shape`` (last two axes).

    Args:
        spec: Muon or DeVA_Sinf.
        hp: hyperparameters (``shape_scale``).
        shape: the matrix shape.
        layout: ``"out_in"`` (torch ``Linear.weight``: rows are fan_out) or ``"in_out"`` (flax kernel).
    """
    rows, cols = shape[-2], shape[-1]
    fan_out, fan_in = (rows, cols) if layout == "out_in" else (cols, rows)
    return shape_scale(hp["shape_scale"], fan_in, fan_out)


def step(
    spec: ElementwiseSpec | MatrixSpec,
    param: Any,
    grad: Any,
    state: Mapping[str, Any],
    hp: Mapping[str, Any],
    t: int,
    *,
    extras: tuple = (),
    maximize: bool = False,
    layout: str = "out_in",
) -> tuple[Any, dict]:
    """Take step ``t`` (``t >= 1``) and return ``(new_param, new_state)``; inputs are not modified.

    Args:
        spec: the optimizer spec.
        param: parameter array.
        grad: gradient (same shape).
        state: from ``init`` or the previous ``step``.
        hp: validated hyperparameters (``spec.validate(...)``).
        t: the step being taken, a Python int (host scalars are computed in float64).
        extras: extra per-element inputs (``grad_variance`` for the ``-mb`` rules).
        maximize: ascend.
        layout: matrix layout for the shape scale of matrix rules.

    Returns:
        ``(new_param, new_state)``.
    """
    xp = array_namespace(param, grad)
    if maximize:
        grad = -grad
    if isinstance(spec, ElementwiseSpec):
        if len(extras) != len(spec.extras):
            raise ValueError(f"{spec.title} needs the extra input(s) {spec.extras}, got {len(extras)} array(s)")
        kernel = make_step_kernel(spec, xp, spec.static(hp))
        names = spec.state
        dtype = state[names[0]].dtype if names else param.dtype  # a rule without state computes in the parameter's dtype
        p32 = xp.astype(param, dtype) if param.dtype != dtype else param
        g32 = xp.astype(grad, dtype) if grad.dtype != dtype else grad
        out = kernel(p32, g32, *extras, *(state[n] for n in names), *step_scalars(spec, hp, t, HOST))
        new_p = out[0] if out[0].dtype == param.dtype else xp.astype(out[0], param.dtype)
        return new_p, dict(zip(names, out[1:]))
    # The spec's own step (its phases decide, e.g. DeVA_Sinf's first call seeds and leaves the parameter as it is).
    return spec.step(xp, param, grad, state, hp, t, matrix_scale(spec, hp, tuple(param.shape), layout))
