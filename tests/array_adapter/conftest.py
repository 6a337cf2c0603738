"""Backend fixture for the plain-array adapter tests: NumPy, array-api-strict, torch (CPU), CuPy."""

from __future__ import annotations

from typing import Any

import pytest
from array_helpers import CUPY_SKIP, Backend, cupy_available


BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("strict", id="strict"),
    pytest.param("torch", id="torch"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(not cupy_available(), reason=CUPY_SKIP)),
]


@pytest.fixture(params=BACKENDS)
def backend(request: Any) -> Backend:
    if request.param in ("strict", "torch"):
        pytest.importorskip("array_api_strict" if request.param == "strict" else "torch")
    return Backend(request.param)
