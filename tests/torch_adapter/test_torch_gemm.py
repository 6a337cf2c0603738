"""The torch adapter's GEMM routing (``xpoptim.adapters._torch_gemm``, registered with the core's ``register_gemm``):
``addmm``/``baddbmm``, a per-matrix loop for large CPU stacks, and oneDNN for float32 CPU tensors, against NumPy
float64 products."""

from __future__ import annotations

import numpy as np
import pytest

from xpoptim.adapters import _torch_gemm as _gemm
from xpoptim.core._backend import matmul, matmul_add

RNG = np.random.default_rng(17)
SHAPES = [((5, 7), (7, 3)), ((2, 5, 7), (2, 7, 3)), ((1, 6, 4), (1, 4, 6)), ((3, 4, 4), (3, 4, 4))]


def _operands(sa, sb):
    a, b = RNG.standard_normal(sa), RNG.standard_normal(sb)
    c = RNG.standard_normal((*sa[:-1], sb[-1]))
    return a, b, c


def _torch():
    return pytest.importorskip("torch", reason="the torch GEMM paths need torch installed")


@pytest.mark.parametrize("sa,sb", SHAPES[1:])
def test_torch_cpu_per_matrix_loop_equals_the_product(sa, sb, monkeypatch):
    """Large CPU stacks are multiplied one matrix at a time: force that path on small matrices (float64)."""
    torch = _torch()
    import array_api_compat.torch as txp

    monkeypatch.setattr(_gemm, "CPU_LOOP_MIN_MACS", 0)
    a, b, c = _operands(sa, sb)
    ta, tb, tc = (torch.from_numpy(x) for x in (a, b, c))
    np.testing.assert_allclose(matmul(txp, ta, tb).numpy(), a @ b, rtol=1e-13, atol=1e-14)
    got = matmul_add(txp, tc, ta, tb, alpha=3.0, beta=-1.5).numpy()
    np.testing.assert_allclose(got, -1.5 * c + 3.0 * (a @ b), rtol=1e-13, atol=1e-14)


def _float32_bound(a, b, c=None, alpha=1.0, beta=0.0):
    """Standard GEMM rounding bound: |fl(ab) - ab| <= gamma_k |a||b| with gamma_k = k u / (1 - k u), u = 2^-24,
    plus one rounding per scale and add of ``beta c``."""
    u = 2.0**-24
    k = a.shape[-1] + 3
    bound = k * u / (1 - k * u) * abs(alpha) * (np.abs(a) @ np.abs(b))
    if c is not None:
        bound = bound + 3 * u * (abs(beta) * np.abs(c) + abs(alpha) * np.abs(a @ b))
    return bound


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "default-blas"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rowmajor", "strided"])
@pytest.mark.parametrize("sa,sb", [((33, 70), (70, 20)), ((2, 16, 48), (2, 48, 16)), ((1, 64, 9), (1, 9, 64))])
def test_torch_float32_products_within_the_gemm_rounding_bound(sa, sb, transposed, onednn, monkeypatch):
    torch = _torch()
    import array_api_compat.torch as txp

    monkeypatch.setattr(_gemm, "TORCH_CPU_ONEDNN", onednn)
    a, b, c = (x.astype(np.float32).astype(np.float64) for x in _operands(sa, sb))
    ta, tb, tc = (torch.from_numpy(x).float() for x in (a, b, c))
    if transposed:  # operands as transposed views (as Newton-Schulz passes X^T), same values
        ta, tb = ta.mT.contiguous().mT, tb.mT.contiguous().mT
    got = matmul(txp, ta, tb)
    assert got.dtype == torch.float32
    assert np.all(np.abs(got.double().numpy() - a @ b) <= _float32_bound(a, b))
    got = matmul_add(txp, tc, ta, tb, alpha=0.5, beta=-2.0).double().numpy()
    assert np.all(np.abs(got - (-2.0 * c + 0.5 * (a @ b))) <= _float32_bound(a, b, c, alpha=0.5, beta=-2.0))


def test_onednn_path_is_taken_for_float32_cpu_torch_where_available():
    """Where this torch build has oneDNN the float32 CPU product goes through it (the reason the path exists: MKL's
    float32 GEMM took 2.4x longer on the AMD EPYC these numbers come from); otherwise the default BLAS is used."""
    torch = _torch()
    a = torch.ones(4, 4)
    has = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert _gemm._use_onednn(a, a) == (has and _gemm.TORCH_CPU_ONEDNN)
    assert not _gemm._use_onednn(a.double(), a.double())  # float64 keeps torch.matmul
    assert not _gemm._use_onednn(a.requires_grad_(), a)  # autograd keeps torch.matmul
    assert _gemm._ONEDNN_BROKEN == []  # no oneDNN call has failed in this process
