"""A small deterministic problem shared by the optax tests (no xpoptim code: references must not share code).

``grad(name, theta, t, k=None)``: a noisy quadratic gradient ``a * theta - b + noise(t)`` per leaf, where the noise is
drawn from a generator seeded by ``(leaf, t[, k])``; for the mini-batch rules ``per_example`` stacks ``B`` examples.
"""

from __future__ import annotations

import zlib

import numpy as np

BATCH = 4


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def leaf_grad(leaf: str, theta: np.ndarray, t: int, k: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(_seed(leaf, t, k))
    a = 0.5 + np.arange(theta.size, dtype=np.float64).reshape(theta.shape) % 3
    return a * theta - 0.3 + 0.5 * rng.standard_normal(theta.shape)


def per_example(leaf: str, theta: np.ndarray, t: int) -> np.ndarray:
    return np.stack([leaf_grad(leaf, theta, t, k) for k in range(BATCH)])


def init_params(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in shapes.items()}
