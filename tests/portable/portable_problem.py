"""A small regression MLP with hand-written float gradients, the same for every framework.

Parameters are kept in torch's orientation as NumPy arrays: ``0.weight`` (4, 3), ``0.bias`` (4,), ``2.weight``
(2, 4), ``2.bias`` (2,) (``torch.nn.Sequential(Linear(3, 4), Tanh(), Linear(4, 2))``). The gradient oracle works
in the parameters' dtype, so every run that reaches the same parameters gets the same gradients, and any
difference between runs comes from the optimizers.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)}


def init(dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.5 * rng.standard_normal(s)).astype(dtype) for k, s in SHAPES.items()}


def _data(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    return rng.standard_normal((16, 3)).astype(dtype), rng.standard_normal((16, 2)).astype(dtype)


def loss_and_grads(params: dict[str, np.ndarray], t: int) -> tuple[float, dict[str, np.ndarray]]:
    """``0.5 mean ||W1 tanh(W0 x + b0) + b1 - y||^2`` on batch ``t`` (a different half of the data each step)."""
    dt = params["0.weight"].dtype
    x, y = _data(str(dt))
    rows = slice(0, 8) if t % 2 else slice(8, 16)
    x, y = x[rows], y[rows]
    w0, b0, w1, b1 = (params[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    h = np.tanh(x @ w0.T + b0)
    r = h @ w1.T + b1 - y
    n = dt.type(x.shape[0])
    dr = r / n
    gh = (dr @ w1) * (1 - h * h)
    grads = {"0.weight": gh.T @ x, "0.bias": gh.sum(0), "2.weight": dr.T @ h, "2.bias": dr.sum(0)}
    return float(0.5 * np.sum(r * r) / x.shape[0]), {k: v.astype(dt) for k, v in grads.items()}


def grad_variance(grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A made-up per-element mini-batch variance for the ``-mb`` rules (a function of the gradient)."""
    return {k: (g * g * g.dtype.type(0.1) + g.dtype.type(1e-3)).astype(g.dtype) for k, g in grads.items()}
