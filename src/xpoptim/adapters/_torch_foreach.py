"""The multi-tensor eager path: the core step kernel run on lists of tensors through ``torch._foreach_*`` ops.

Private module of the torch adapter. :class:`TensorList` is an "array" for the core kernel whose every operation
applies to a whole list of tensors at once: ``torch._foreach_add`` / ``_mul`` / ``_div`` / ``_sqrt`` / ... where
torch has one (one launch per operation for every tensor of the list on CUDA, torch's multi-tensor apply), and one
ordinary torch operation per tensor otherwise (comparisons, ``where``, powers). Each ``_foreach_*`` operation
computes what the per-tensor operation computes, so this path gives the per-tensor eager path's numbers; the
adapter's tests compare them bit for bit. Parameters and state stay where they are: the outputs are written back
with ``torch._foreach_copy_``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["TensorList", "NAMESPACE", "run_lists", "exact_sqrt", "ExactTorchNamespace"]

_SCALAR = (int, float)


class TensorList:
    """A list of same-dtype tensors acting as one array of the core kernel."""

    __slots__ = ("ts",)
    __array_priority__ = 1000.0

    def __init__(self, ts: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        self.ts = ts

    # -- arithmetic: _foreach_* with a list or a Python number --------------------------------------------------

    def _binary(self, other: Any, foreach: Callable, op: Callable) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(foreach(self.ts, other.ts))
        if type(other) in _SCALAR:
            return TensorList(foreach(self.ts, other))
        raise TypeError(f"TensorList operand of type {type(other).__name__}")

    def __add__(self, o: Any) -> TensorList:
        return self._binary(o, torch._foreach_add, torch.add)

    __radd__ = __add__

    def __sub__(self, o: Any) -> TensorList:
        return self._binary(o, torch._foreach_sub, torch.sub)

    def __rsub__(self, o: Any) -> TensorList:
        if type(o) in _SCALAR:  # s - x, rounded once, per tensor (no foreach form of a reflected subtraction)
            return TensorList([o - t for t in self.ts])
        return NotImplemented

    def __mul__(self, o: Any) -> TensorList:
        return self._binary(o, torch._foreach_mul, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, o: Any) -> TensorList:
        return self._binary(o, torch._foreach_div, torch.div)

    def __rtruediv__(self, o: Any) -> TensorList:
        if type(o) in _SCALAR:
            return TensorList([o / t for t in self.ts])
        return NotImplemented

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.ts))

    def __pos__(self) -> TensorList:
        return self

    def __abs__(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.ts))

    def __pow__(self, o: Any) -> TensorList:
        return TensorList([t**o for t in self.ts])

    def __rpow__(self, o: Any) -> TensorList:
        return TensorList([o**t for t in self.ts])

    # -- comparisons and logic: per tensor ------------------------------------------------------------------------

    def _each(self, o: Any, fn: Callable) -> TensorList:
        if isinstance(o, TensorList):
            return TensorList([fn(a, b) for a, b in zip(self.ts, o.ts)])
        return TensorList([fn(a, o) for a in self.ts])

    def __lt__(self, o: Any) -> TensorList:
        return self._each(o, torch.lt)

    def __le__(self, o: Any) -> TensorList:
        return self._each(o, torch.le)

    def __gt__(self, o: Any) -> TensorList:
        return self._each(o, torch.gt)

    def __ge__(self, o: Any) -> TensorList:
        return self._each(o, torch.ge)

    def __eq__(self, o: Any) -> TensorList:  # type: ignore[override]
        return self._each(o, torch.eq)

    def __ne__(self, o: Any) -> TensorList:  # type: ignore[override]
        return self._each(o, torch.ne)

    __hash__ = None  # type: ignore[assignment]

    def __and__(self, o: Any) -> TensorList:
        return self._each(o, torch.logical_and)

    __rand__ = __and__

    def __or__(self, o: Any) -> TensorList:
        return self._each(o, torch.logical_or)

    __ror__ = __or__

    def __invert__(self) -> TensorList:
        return TensorList([torch.logical_not(t) for t in self.ts])

    def __bool__(self) -> bool:
        raise TypeError("the kernel branches on an array value")


def _lists(*xs: Any) -> int:
    for x in xs:
        if isinstance(x, TensorList):
            return len(x.ts)
    raise TypeError("a namespace function called on host numbers only")


def _at(x: Any, i: int) -> Any:
    return x.ts[i] if isinstance(x, TensorList) else x


class _Namespace:
    """The array-API subset an elementwise core rule calls, on :class:`TensorList` arrays."""

    name = "xpoptim-torch-foreach"

    @staticmethod
    def sqrt(x: TensorList) -> TensorList:
        if x.ts and x.ts[0].device.type == "cpu":
            return TensorList([exact_sqrt(t) for t in x.ts])
        return TensorList(torch._foreach_sqrt(x.ts))

    @staticmethod
    def abs(x: TensorList) -> TensorList:  # noqa: A003
        return TensorList(torch._foreach_abs(x.ts))

    @staticmethod
    def sign(x: TensorList) -> TensorList:
        return TensorList(torch._foreach_sign(x.ts))

    @staticmethod
    def square(x: TensorList) -> TensorList:
        return TensorList(torch._foreach_mul(x.ts, x.ts))

    @staticmethod
    def negative(x: TensorList) -> TensorList:
        return -x

    @staticmethod
    def maximum(a: Any, b: Any) -> TensorList:
        n = _lists(a, b)
        return TensorList([torch.maximum(*_tensors(_at(a, i), _at(b, i))) for i in range(n)])

    @staticmethod
    def minimum(a: Any, b: Any) -> TensorList:
        n = _lists(a, b)
        return TensorList([torch.minimum(*_tensors(_at(a, i), _at(b, i))) for i in range(n)])

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> TensorList:
        n = _lists(c, a, b)
        return TensorList([torch.where(_at(c, i), _at(a, i), _at(b, i)) for i in range(n)])

    @staticmethod
    def zeros_like(x: TensorList) -> TensorList:
        return TensorList([torch.zeros_like(t) for t in x.ts])

    @staticmethod
    def ones_like(x: TensorList) -> TensorList:
        return TensorList([torch.ones_like(t) for t in x.ts])

    def __getattr__(self, name: str) -> Any:
        raise TypeError(f"xp.{name} has no multi-tensor form here")


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """IEEE ``sqrt`` (correctly rounded) of a CPU tensor.

    torch's vectorized CPU ``sqrt`` is not correctly rounded (measured with torch 2.13 on AVX-512: 0.65% of random
    float32 values and 0.75% of float64 values one ulp off NumPy's), so the CPU paths take the square root from
    NumPy (the hardware instruction) on a zero-copy view; 16-bit floats go through float32 (exact after rounding).
    CUDA's ``sqrt`` is correctly rounded and is used as it is.
    """
    if x.device.type != "cpu":
        return torch.sqrt(x)
    if x.dtype in (torch.float32, torch.float64):
        a = x.detach().numpy()
        return torch.from_numpy(np.sqrt(a, out=np.empty(a.shape, a.dtype)))
    return exact_sqrt(x.float()).to(x.dtype)


class ExactTorchNamespace:
    """The array-API torch namespace with :func:`exact_sqrt` as ``sqrt``: the op-by-op path's namespace, so that its
    numbers are the IEEE ones the compiled C loop computes."""

    name = "xpoptim-torch-exact"

    def __init__(self, xp: Any) -> None:
        self._xp = xp

    @staticmethod
    def sqrt(x: torch.Tensor) -> torch.Tensor:
        return exact_sqrt(x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._xp, name)


def _tensors(a: Any, b: Any) -> tuple:
    """``torch.maximum`` takes tensors only: a Python number becomes a 0-D tensor of the other's dtype (what the
    array-API wrapper does for the per-tensor path)."""
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=b.dtype, device=b.device)
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(b, dtype=a.dtype, device=a.device)
    return a, b


NAMESPACE = _Namespace()


def run_lists(
    kernel: Callable,
    compute_dtype: torch.dtype,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    extras: Sequence[Sequence[torch.Tensor]],
    states: Sequence[Sequence[torch.Tensor]],
    scalars: Sequence[float],
) -> None:
    """Run ``kernel`` (built on :data:`NAMESPACE`) on the lists and write parameters and state in place.

    ``params``/``grads``/``extras`` are cast to ``compute_dtype`` (the state dtype) first; the new parameters are
    cast back by the copy. Raises before any write if the kernel cannot run on lists.
    """

    def cast(ts: Sequence[torch.Tensor]) -> TensorList:
        return TensorList([t if t.dtype == compute_dtype else t.to(compute_dtype) for t in ts])

    out = kernel(cast(params), cast(grads), *(cast(x) for x in extras), *(TensorList(list(s)) for s in states), *scalars)
    torch._foreach_copy_(list(params), out[0].ts)
    for s, o in zip(states, out[1:]):
        torch._foreach_copy_(list(s), o.ts)
