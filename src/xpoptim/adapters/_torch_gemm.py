"""Matrix products of torch tensors for the matrix rules (Newton-Schulz, DeVA's factors), injected into the core.

Private module of the torch adapter. :func:`install` registers :func:`matmul` and :func:`matmul_add` with
``xpoptim.core._backend.register_gemm``; both decline (return ``None``) anything that is not a torch tensor, so
the core computes other arrays with their own namespace.

* float32 CPU products go through oneDNN (``torch.ops.mkldnn._linear_pointwise``) instead of torch's default BLAS
  (``TORCH_CPU_ONEDNN``). Measured on an AMD EPYC (2 cores, torch 2.13 with MKL): a 1024x1024 float32 product takes
  10.9 ms through ``torch.matmul`` (MKL takes a slow path on this CPU) and 4.6 ms through oneDNN, with the same
  float32 accuracy; Newton-Schulz on 4096x1024 drops from 485 ms to 264 ms. The path is skipped when oneDNN is
  unavailable or disabled, when a product needs autograd, and after its first failure.
* ``beta C + alpha A B`` uses ``addmm`` / ``baddbmm`` (the accumulation inside the GEMM, as torch.optim.Muon does).
* Large stacks on CPU are multiplied one matrix at a time (``CPU_LOOP_MIN_MACS``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from xpoptim.core._backend import register_gemm

__all__ = ["install", "matmul", "matmul_add", "TORCH_CPU_ONEDNN", "CPU_LOOP_MIN_MACS"]

#: Route float32 matrix products of CPU tensors through oneDNN (see the module docstring). ``False``: always
#: ``torch.matmul``.
TORCH_CPU_ONEDNN = True

#: On CPU a stack of matrices this large (``n * k * m`` multiply-adds each) is multiplied one matrix at a time:
#: measured with torch 2.13 on 2 cores, a batched bfloat16 ``baddbmm`` over ``(1, 1024, 4096)`` is 1.4x slower than
#: ``addmm`` on the matrix, and 4 x (1024 x 1024) is 1.1x slower than a loop; small matrices keep the batched call.
CPU_LOOP_MIN_MACS = 1 << 22

_ONEDNN_BROKEN: list[str] = []
_ONEDNN_OP: list[bool] = []  # whether this torch build has the op, looked up once


def _use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not TORCH_CPU_ONEDNN or _ONEDNN_BROKEN:
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.ndim < 2 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2] or 0 in a.shape or 0 in b.shape:
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if not _ONEDNN_OP:
        _ONEDNN_OP.append(hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    return _ONEDNN_OP[0]


def _onednn_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` through oneDNN's inner-product primitive: ``linear(x, w) = x @ w^T`` with ``w = b^T``."""
    lin = torch.ops.mkldnn._linear_pointwise
    if a.ndim == 2:  # a strided weight is reordered inside oneDNN, faster than a .contiguous() transpose here
        return lin(a.contiguous(), b.mT, None, "none", [], "")
    lead = a.shape[:-2]
    a3 = a.reshape(-1, *a.shape[-2:])
    w3 = b.reshape(-1, *b.shape[-2:]).mT
    outs = [lin(a3[i].contiguous(), w3[i], None, "none", [], "") for i in range(a3.shape[0])]
    out = outs[0][None] if len(outs) == 1 else torch.stack(outs)
    return out.reshape(*lead, *out.shape[-2:])


def _try_onednn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    if not _use_onednn(a, b):
        return None
    try:
        return _onednn_matmul(a, b)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # an op this torch build lacks: never again
        _ONEDNN_BROKEN.append(repr(exc))
        warnings.warn(f"xpoptim: oneDNN float32 matmul failed ({exc!r}); using torch.matmul from now on", UserWarning, stacklevel=3)
        return None


def _cpu_loop(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device.type == "cpu" and a.ndim == 3 and a.shape[-2] * a.shape[-1] * b.shape[-1] >= CPU_LOOP_MIN_MACS


def matmul(a: Any, b: Any) -> torch.Tensor | None:
    """``a @ b`` for torch tensors (oneDNN for float32 CPU, one matrix at a time for large CPU stacks); ``None``
    for other arrays."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    out = _try_onednn(a, b)
    if out is not None:
        return out
    if b.ndim == 3 and _cpu_loop(a, b):
        if a.shape[0] == 1:
            return torch.matmul(a[0], b[0])[None]
        return torch.stack([torch.matmul(a[i], b[i]) for i in range(a.shape[0])])
    return torch.matmul(a, b)


def matmul_add(c: Any, a: Any, b: Any, alpha: float, beta: float) -> torch.Tensor | None:
    """``beta * c + alpha * (a @ b)`` for torch tensors (``addmm`` / ``baddbmm``, oneDNN for float32 CPU);
    ``None`` for other arrays."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or not isinstance(c, torch.Tensor):
        return None
    out = _try_onednn(a, b)
    if out is not None:
        if alpha != 1.0:
            out.mul_(alpha)
        return out.add_(c, alpha=beta)
    if a.ndim == 2 and b.ndim == 2 and c.ndim == 2:
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    if a.ndim == 3 and b.ndim == 3 and c.ndim == 3:
        if not _cpu_loop(a, b):
            return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
        if c.shape[0] == 1:
            return torch.addmm(c[0], a[0], b[0], beta=beta, alpha=alpha)[None]
        return torch.stack([torch.addmm(c[i], a[i], b[i], beta=beta, alpha=alpha) for i in range(c.shape[0])])
    return None


def install() -> None:
    """Register the torch GEMM routing with the core (idempotent)."""
    register_gemm(matmul, matmul_add)


install()
