"""Long-run stability: 100,000 float32 steps of every optimizer with zero, tiny (~1e-30) and huge (~1e18)
gradients, and no NaN or infinity anywhere, in the parameters or the state (NumPy adapter; marked slow).

Each gradient regime is its own parameter array (the elementwise rules treat elements independently; the matrix
rules get one matrix per regime plus a vector for their elementwise fallback), so one optimizer runs all three
regimes at once. Gradients cycle through 1,000 pre-drawn Gaussian patterns (signs and sizes change every step).
"Huge" is the largest scale at which every rule's float32 state holds its exact value range (a second moment holds
g^2, DeVA_Sinf's Kronecker factors a sum of n of them); beyond it see the overflow policy in docs/reliability.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from reliability._cases import MATRIX, MINIBATCH, OPTIMIZERS
from xpoptim.adapters import numpy as xn

STEPS = 100_000
PATTERNS = 1000
REGIMES = {"zero": 0.0, "tiny": 1e-30, "huge": 1e18}


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_hundred_thousand_float32_steps_stay_finite(name):
    matrix = name in MATRIX
    shapes = {}
    for regime in REGIMES:
        shapes[f"{regime}_m" if matrix else regime] = (8, 8) if matrix else (64,)
        if matrix:
            shapes[f"{regime}_v"] = (8,)
    params = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
    opt = xn.create(name, params, threads=1)
    rng = np.random.default_rng(0)
    patterns = {k: rng.standard_normal((PATTERNS, *s)).astype(np.float32) for k, s in shapes.items()}
    scale = {k: np.float32(REGIMES[k.split("_")[0]]) for k in shapes}
    grads = {k: patterns[k] * scale[k] for k in shapes}  # (PATTERNS, *shape) each, float32
    variance = {k: np.full(s, 0.25 * float(scale[k]) ** 2, np.float32) for k, s in shapes.items()}
    extras = {"grad_variance": variance} if name in MINIBATCH else {}
    for t in range(STEPS):
        i = t % PATTERNS
        opt.step({k: g[i] for k, g in grads.items()}, **extras)
        if (t + 1) % 20_000 == 0 or t + 1 == STEPS:
            _assert_finite(name, t + 1, params, opt.state_dict())


def _assert_finite(name: str, step: int, params: dict, sd: dict) -> None:
    for k, p in params.items():
        assert np.isfinite(p).all(), f"{name}: parameter {k} not finite after {step} steps"
    for k, entry in sd["state"].items():
        for s, v in entry.items():
            assert v is None or np.isfinite(v).all(), f"{name}: state {k}.{s} not finite after {step} steps"
