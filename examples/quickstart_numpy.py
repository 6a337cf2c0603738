"""Quickstart, NumPy (and CuPy: the same code with ``xpoptim.adapters.cupy`` and ``cupy`` arrays).

M-SVAG fits a least-squares model; ``opt.step(grads)`` updates the arrays in place.
"""

import numpy as np

from xpoptim.adapters.numpy import MSVAG

rng = np.random.default_rng(0)
x = rng.standard_normal((512, 10)).astype(np.float32)
y = x @ rng.standard_normal(10).astype(np.float32) + 0.1 * rng.standard_normal(512).astype(np.float32)
params = {"w": np.zeros(10, np.float32)}
opt = MSVAG(params, lr=0.05)
for step in range(1, 201):
    batch = rng.integers(0, 512, 32)
    residual = x[batch] @ params["w"] - y[batch]
    opt.step({"w": x[batch].T @ residual / 32})
    if step % 50 == 0:
        print(f"step {step:3d}  loss {0.5 * np.mean((x @ params['w'] - y) ** 2):.4f}")
