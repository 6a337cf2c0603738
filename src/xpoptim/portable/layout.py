"""Orientation of the portable layout: turning ``(in, out)`` arrays into torch's ``(out, in)`` and back.

A weight is described by an axis permutation ``perm`` (the stored array is ``transpose(leaf, perm)``) and the
number of batch and output axes in front (the rest are the reduction, or fan-in, axes). Matrix-rule state is kept
by the adapters either in the parameter's own shape (Muon in JAX) or as the matrix the rule acts on: torch's
``(out, prod(in))``, or ``(fan_in, fan_out)`` in JAX and the NumPy adapter's ``layout="in_out"``, whose Kronecker
factors then sit on the other sides. :func:`swap_sides` converts between the two matrix orientations; which
arrays are matrices and which are factors comes from the core (:func:`~xpoptim.portable.state.matrix_roles`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .state import matrix_roles

__all__ = ["Orientation", "swap_sides", "matrix_from_leaf", "leaf_from_matrix"]


class Orientation(NamedTuple):
    """How a framework's array maps to the portable one.

    Attributes:
        perm: ``portable = transpose(array, perm)``.
        n_batch: leading batch axes of the portable array (each entry its own matrix).
        n_out: output (fan-out) axes after the batch axes; the remaining axes are fan-in.
    """

    perm: tuple[int, ...]
    n_batch: int = 0
    n_out: int = 1

    @property
    def inverse(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.argsort(self.perm))

    def to_portable(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(x, self.perm))

    def from_portable(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(x, self.inverse))

    def portable_shape(self, shape: tuple) -> tuple[int, ...]:
        return tuple(int(shape[i]) for i in self.perm)

    def matrix_shape(self, portable_shape: tuple) -> tuple[int, ...]:
        """``(prod(batch), prod(out), prod(in))`` (no batch entry without batch axes) of a portable shape."""
        b, o = self.n_batch, self.n_out
        rows = (math.prod(portable_shape[b : b + o]), math.prod(portable_shape[b + o :]))
        return ((math.prod(portable_shape[:b]),) if b else ()) + rows


def swap_sides(rule: str, state: dict[str, Any]) -> dict[str, Any]:
    """Matrix-rule state of ``W`` as the state of ``W^T`` (and back: the map is its own inverse).

    Arrays of role ``"matrix"`` swap their last two axes; the row-side factors (``L``, ``QL``) and column-side
    factors (``R``, ``QR``) trade places, paired in the order the core lists them.
    """
    roles = matrix_roles(rule)
    left = [k for k, r in roles.items() if r == "left"]
    right = [k for k, r in roles.items() if r == "right"]
    partner = {**dict(zip(left, right)), **dict(zip(right, left))}
    out = {}
    for k, v in state.items():
        if roles[k] == "matrix":
            out[k] = None if v is None else np.ascontiguousarray(np.swapaxes(v, -1, -2))
        else:
            out[partner[k]] = v
    return out


def matrix_from_leaf(x: np.ndarray, orient: Orientation) -> np.ndarray:
    """A parameter-shaped array as the portable matrix ``(batch?, out, in)``."""
    p = orient.to_portable(x)
    return p.reshape(orient.matrix_shape(p.shape))


def leaf_from_matrix(m: np.ndarray, orient: Orientation, leaf_shape: tuple) -> np.ndarray:
    """The inverse of :func:`matrix_from_leaf` for a leaf of ``leaf_shape``."""
    return orient.from_portable(np.reshape(m, orient.portable_shape(leaf_shape)))
