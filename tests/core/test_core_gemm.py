"""The core's GEMM primitives (``_backend.matmul``, ``_backend.matmul_add``) against NumPy float64 products.

They stand in for ``xp.matmul`` in Newton-Schulz and DeVA; adapters inject backend routing through
``_backend.register_gemm`` (the torch adapter's is tested in ``tests/torch_adapter/test_torch_gemm.py``). Every path
must give the product the standard defines.
"""

from __future__ import annotations

import numpy as np
import pytest

from xpoptim.core import _backend
from xpoptim.core._backend import matmul, matmul_add

RNG = np.random.default_rng(17)
SHAPES = [((5, 7), (7, 3)), ((2, 5, 7), (2, 7, 3)), ((1, 6, 4), (1, 4, 6)), ((3, 4, 4), (3, 4, 4))]


def _operands(sa, sb):
    a, b = RNG.standard_normal(sa), RNG.standard_normal(sb)
    c = RNG.standard_normal((*sa[:-1], sb[-1]))
    return a, b, c


@pytest.mark.parametrize("sa,sb", SHAPES)
def test_matmul_and_matmul_add_equal_the_float64_product(sa, sb, backend):
    a, b, c = _operands(sa, sb)
    xa, xb, xc = backend.asarray(a), backend.asarray(b), backend.asarray(c)
    np.testing.assert_allclose(backend.to_numpy(matmul(backend.xp, xa, xb)), a @ b, rtol=1e-13, atol=1e-14)
    got = backend.to_numpy(matmul_add(backend.xp, xc, xa, xb, alpha=-0.75, beta=2.5))
    np.testing.assert_allclose(got, 2.5 * c - 0.75 * (a @ b), rtol=1e-13, atol=1e-14)
    got = backend.to_numpy(matmul_add(backend.xp, xc, xa, xb, beta=0.5))
    np.testing.assert_allclose(got, 0.5 * c + a @ b, rtol=1e-13, atol=1e-14)


def test_registered_gemm_overrides_are_tried_first_and_may_decline():
    """``register_gemm``: an override that returns ``None`` declines (the namespace computes the product); one that
    returns a value is used as is."""
    calls = []

    def mm(a, b):
        calls.append("matmul")
        return None if a.shape[0] == 5 else np.full((a.shape[0], b.shape[1]), 7.0)

    def mma(c, a, b, alpha, beta):
        calls.append("matmul_add")
        return None

    a, b, c = _operands((5, 7), (7, 3))
    saved = list(_backend._GEMM_OVERRIDES)
    try:
        _backend._GEMM_OVERRIDES.insert(0, (mm, mma))
        np.testing.assert_allclose(matmul(np, a, b), a @ b, rtol=1e-13)
        np.testing.assert_allclose(matmul_add(np, c, a, b, beta=0.5), 0.5 * c + a @ b, rtol=1e-13)
        assert np.all(matmul(np, a[:4], b) == 7.0)
    finally:
        _backend._GEMM_OVERRIDES[:] = saved
    assert calls == ["matmul", "matmul_add", "matmul"]
