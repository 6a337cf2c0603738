"""xpoptim.core: every update rule, written once against the Python Array API.

Pure functions over arrays (no torch, jax or cupy import, ever) and one frozen spec per optimizer.
Adapters (``xpoptim.adapters``) own memory layout, state and framework conventions.

Registry: ``SPECS`` maps a name to its spec; ``get_spec(name)`` looks one up with a clear error.
"""

from __future__ import annotations

from . import adam_family, balles_hennig, deva, directions, factors, functional, moments, muon, mvngrad, spec
from ._backend import HOST, array_namespace, erf
from .adam_family import ADABELIEF, ADAM, ADAMW, LAPROP
from .balles_hennig import ADAM_STAR, ADAM_STAR_MB, MSSD, MSVAG, MSVAG_MB, SGD, SVAG
from .deva import DEVA_LINF, DEVA_SINF
from .directions import newton_schulz, shape_scale, sign
from .factors import adam_factor, erf_factor, kappa, svag_factor, unbiasing_weight
from .moments import bias_correction, ema, minibatch_variance, minibatch_variance_from_moments
from .muon import MUON
from .mvngrad import MVNGRAD
from .spec import STATE_VERSION, ElementwiseSpec, Hyper, MatrixSpec, make_direction_kernel, make_step_kernel, step_scalars

#: Every optimizer, by registry name, in the order of the README's conventions table.
SPECS: dict[str, ElementwiseSpec | MatrixSpec] = {
    s.name: s
    for s in (
        ADAM,
        ADAMW,
        ADABELIEF,
        LAPROP,
        MVNGRAD,
        SGD,
        MSSD,
        SVAG,
        MSVAG,
        ADAM_STAR,
        MSVAG_MB,
        ADAM_STAR_MB,
        DEVA_LINF,
        DEVA_SINF,
        MUON,
    )
}

ELEMENTWISE = tuple(n for n, s in SPECS.items() if s.kind == "elementwise")
MATRIX = tuple(n for n, s in SPECS.items() if s.kind == "matrix")


def get_spec(name: str) -> ElementwiseSpec | MatrixSpec:
    """Look up an optimizer spec by registry name (``"adamw"``) or title (``"AdamW"``)."""
    if not isinstance(name, str):
        raise TypeError(
            f"optimizer={type(name).__name__} is invalid: expected an optimizer name (a str, one of {sorted(SPECS)}); "
            "were the parameters and the name passed in swapped order?"
        )
    if name in SPECS:
        return SPECS[name]
    for s in SPECS.values():
        if s.title == name:
            return s
    raise ValueError(f"optimizer={name!r} is unknown: expected one of {sorted(SPECS)}")


__all__ = [
    "SPECS",
    "ELEMENTWISE",
    "MATRIX",
    "get_spec",
    "STATE_VERSION",
    "ElementwiseSpec",
    "MatrixSpec",
    "Hyper",
    "make_step_kernel",
    "make_direction_kernel",
    "step_scalars",
    "HOST",
    "array_namespace",
    "erf",
    "ema",
    "bias_correction",
    "minibatch_variance",
    "minibatch_variance_from_moments",
    "kappa",
    "unbiasing_weight",
    "svag_factor",
    "adam_factor",
    "erf_factor",
    "sign",
    "newton_schulz",
    "shape_scale",
    "adam_family",
    "balles_hennig",
    "deva",
    "directions",
    "factors",
    "functional",
    "moments",
    "muon",
    "mvngrad",
    "spec",
]
