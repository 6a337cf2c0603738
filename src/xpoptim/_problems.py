"""Fixed test problems for the cross-backend verifier, written in Array API operations only.

Every problem computes its loss, its mini-batch mean gradient and the per-element variance of that
mean (Balles & Hennig Eq. 44, the ``grad_variance`` extra of the ``-mb`` rules) by hand, with
``xp.matmul``/``xp.tanh``/broadcasting, so the same code runs on NumPy, array-api-strict, PyTorch, JAX
and CuPy. Data are drawn once in float64 NumPy from fixed seeds and converted to each backend's dtype,
so every backend sees the same numbers (rounded to its dtype).

Matrices follow torch ``Linear.weight``'s ``(out, in)`` layout (rows are fan_out); the verifier
transposes them for adapters that use the flax ``(in, out)`` layout.

Two kinds of problem:

* closed loop (``quadratic``, ``mlp``, ``matrix``): every backend computes its gradients on its own trajectory;
* replayed gradients (``structured``, ``digits``): a fixed gradient sequence with the structure real models
  produce, computed once in float64 NumPy and fed identically to every backend (the gradients do not depend on
  the parameters), so a difference is the optimizer's alone. ``structured``: low-rank matrices with
  exactly-zero rows and columns (dead inputs, unused embedding rows), heavy-tailed entries, and parameters
  whose gradients live at scales 1e-8 and 1e4. ``digits``: the gradients of a 64-32-10 tanh MLP trained on
  scikit-learn's ``load_digits`` (inputs active in few images make the Kronecker factors' spectra nearly
  degenerate). ``digits`` needs scikit-learn (in the ``test`` extra); without it, building the problem raises
  an ``ImportError`` that says so.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .core.moments import minibatch_variance

__all__ = [
    "Problem",
    "PROBLEMS",
    "DEFAULT_PROBLEMS",
    "CLOSED_LOOP_PROBLEMS",
    "REPLAYED_PROBLEMS",
    "get_problem",
    "noisy_quadratic",
    "small_mlp",
    "matrix_regression",
    "structured_gradients",
    "digits_mlp",
    "digits_gradients",
]

@dataclasses.dataclass(frozen=True)
class Problem:
    """A deterministic stochastic-optimisation problem.

    Attributes:
        name: short key (``"quadratic"``, ``"mlp"``, ``"matrix"``).
        description: one line for reports.
        init_np: float64 NumPy initial parameters, by name (insertion order is the parameter order).
        batch_np: ``batch_np(step)`` returns the float64 NumPy data of step ``step`` (``step >= 1``).
        grad_fn: ``grad_fn(xp, params, data) -> (loss, grads, grad_variance)`` over backend arrays.
    """

    name: str
    description: str
    init_np: dict
    batch_np: Callable[[int], dict]
    grad_fn: Callable[[Any, dict, dict], tuple]

    def rounded(self, dtype: str) -> Problem:
        """The same problem with every number rounded to ``dtype`` (kept in float64).

        The float64 reference for a float32 candidate runs on these inputs, so a comparison measures
        the arithmetic of the candidate, not the rounding of its starting point and data.
        """
        if dtype == "float64":
            return self
        np_dtype = np.dtype(dtype)

        def rnd(d: dict) -> dict:
            return {k: np.asarray(v).astype(np_dtype).astype(np.float64) for k, v in d.items()}

        batch_np = self.batch_np
        return dataclasses.replace(self, init_np=rnd(self.init_np), batch_np=lambda step: rnd(batch_np(step)))

    def init(self, xp: Any, dtype: Any, device: Any = None) -> dict:
        """The initial parameters as ``xp`` arrays of ``dtype`` on ``device``."""
        return {k: _asarray(xp, v, dtype, device) for k, v in self.init_np.items()}

    def gradients(self, xp: Any, params: dict, step: int, dtype: Any, device: Any = None) -> tuple:
        """Loss, mean gradient and its per-element variance at ``params`` for step ``step``.

        Args:
            xp: array namespace of ``params``.
            params: parameter arrays by name.
            step: the step about to be taken (``>= 1``); selects the mini-batch.
            dtype: floating dtype of the data (the parameters' dtype).
            device: device of the data.

        Returns:
            ``(loss, grads, grad_variance)``: a 0-D array and two dicts keyed like ``params``.
        """
        data = {k: _asarray(xp, v, dtype, device) for k, v in self.batch_np(step).items()}
        return self.grad_fn(xp, params, data)


def _asarray(xp: Any, value: np.ndarray, dtype: Any, device: Any) -> Any:
    if device is None:
        return xp.asarray(value, dtype=dtype)
    return xp.asarray(value, dtype=dtype, device=device)


def _per_example(xp: Any, per_example: dict) -> tuple:
    """Mean over the batch axis and Eq. 44's unbiased variance of that mean."""
    grads = {k: xp.mean(v, axis=0) for k, v in per_example.items()}
    variance = {k: minibatch_variance(xp, v, axis=0) for k, v in per_example.items()}
    return grads, variance


# ----------------------------------------------------------------------------------------------
# 1. Noisy quadratic: f(X) = 0.5 sum h (X - C)^2, per-example gradients h (X - C) + sigma z_k
# ----------------------------------------------------------------------------------------------


def noisy_quadratic(seed: int = 0, batch: int = 8, sigma: float = 0.5) -> Problem:
    """An ill-conditioned diagonal quadratic with additive per-example gradient noise.

    ``f(X) = 0.5 * sum(h * (X - C)^2)`` with curvatures ``h`` log-spaced in [0.1, 10]; example ``k``
    of step ``t`` has gradient ``h (X - C) + sigma z_{t,k}``. The parameters are a (6, 5) matrix (so
    the spectral rules see a matrix) and a (7,) vector (the matrix rules' elementwise fallback).
    """
    rng = np.random.default_rng(seed)
    shapes = {"weight": (6, 5), "bias": (7,)}
    h = {k: np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=s)) for k, s in shapes.items()}
    c = {k: rng.normal(size=s) for k, s in shapes.items()}
    init = {k: rng.normal(size=s) + 2.0 for k, s in shapes.items()}

    def batch_np(step: int) -> dict:
        r = np.random.default_rng([seed, 1, step])
        out = {}
        for k, s in shapes.items():
            out[f"h_{k}"] = h[k]
            out[f"c_{k}"] = c[k]
            out[f"z_{k}"] = sigma * r.normal(size=(batch, *s))
        return out

    def grad_fn(xp: Any, params: dict, data: dict) -> tuple:
        loss = 0.0
        per_example = {}
        for k, x in params.items():
            diff = x - data[f"c_{k}"]
            hd = data[f"h_{k}"] * diff
            loss = loss + 0.5 * xp.sum(hd * diff)
            per_example[k] = hd + data[f"z_{k}"]
        grads, var = _per_example(xp, per_example)
        return loss, grads, var

    return Problem("quadratic", f"noisy diagonal quadratic, h in [0.1, 10], sigma={sigma}, batch {batch}", init, batch_np, grad_fn)


# ----------------------------------------------------------------------------------------------
# 2. A small MLP on fixed data, backpropagation by hand
# ----------------------------------------------------------------------------------------------


def small_mlp(seed: int = 1, n_in: int = 8, hidden: int = 16, n_out: int = 3, n_data: int = 128, batch: int = 16) -> Problem:
    """A one-hidden-layer tanh MLP regressing a fixed random teacher, squared loss.

    ``y_hat = W2 tanh(W1 x + b1) + b2`` with ``W1`` of shape (hidden, in) and ``W2`` (out, hidden)
    (torch ``Linear`` layout). The loss is ``0.5 * mean_k ||y_hat_k - y_k||^2`` over a mini-batch of
    ``batch`` examples drawn (with a fixed seed per step) from ``n_data`` fixed examples. Per-example
    gradients are formed by broadcasting (outer products), then averaged.
    """
    rng = np.random.default_rng(seed)
    x_all = rng.normal(size=(n_data, n_in))
    teacher = rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)
    y_all = np.tanh(x_all @ teacher.T * 2.0) + 0.1 * rng.normal(size=(n_data, n_out))
    init = {
        "w1": rng.normal(size=(hidden, n_in)) / np.sqrt(n_in),
        "b1": 0.1 * rng.normal(size=(hidden,)),
        "w2": rng.normal(size=(n_out, hidden)) / np.sqrt(hidden),
        "b2": 0.1 * rng.normal(size=(n_out,)),
    }

    def batch_np(step: int) -> dict:
        idx = np.random.default_rng([seed, 2, step]).choice(n_data, size=batch, replace=False)
        return {"x": x_all[idx], "y": y_all[idx]}

    def grad_fn(xp: Any, params: dict, data: dict) -> tuple:
        x, y = data["x"], data["y"]
        w1, b1, w2, b2 = params["w1"], params["b1"], params["w2"], params["b2"]
        a = xp.tanh(xp.matmul(x, xp.matrix_transpose(w1)) + b1)  # (B, hidden)
        out = xp.matmul(a, xp.matrix_transpose(w2)) + b2  # (B, out)
        err = out - y
        loss = 0.5 * xp.mean(xp.sum(err * err, axis=-1))
        d1 = xp.matmul(err, w2) * (1 - a * a)  # (B, hidden)
        per_example = {
            "w1": d1[:, :, None] * x[:, None, :],
            "b1": d1,
            "w2": err[:, :, None] * a[:, None, :],
            "b2": err,
        }
        grads, var = _per_example(xp, per_example)
        return loss, grads, var

    return Problem("mlp", f"tanh MLP {n_in}-{hidden}-{n_out} on {n_data} fixed examples, batch {batch}", init, batch_np, grad_fn)


# ----------------------------------------------------------------------------------------------
# 3. Matrix regression: the spectral rules' problem
# ----------------------------------------------------------------------------------------------


def matrix_regression(seed: int = 2, n_out: int = 6, n_in: int = 10, batch: int = 12, noise: float = 0.1) -> Problem:
    """Linear least squares ``0.5 mean_k ||W a_k - b_k||^2`` with ill-conditioned inputs.

    ``W`` is (out, in) = (6, 10): non-square, so a wrong fan layout changes Muon's shape scale. The
    inputs have per-axis scales log-spaced over two decades, so the gradient matrix has a spread of
    singular values and Newton-Schulz is not trivial.
    """
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -2, n_in)
    target = rng.normal(size=(n_out, n_in))
    init = {"weight": 0.1 * rng.normal(size=(n_out, n_in))}

    def batch_np(step: int) -> dict:
        r = np.random.default_rng([seed, 3, step])
        a = r.normal(size=(batch, n_in)) * scales
        b = a @ target.T + noise * r.normal(size=(batch, n_out))
        return {"a": a, "b": b}

    def grad_fn(xp: Any, params: dict, data: dict) -> tuple:
        a, b = data["a"], data["b"]
        w = params["weight"]
        err = xp.matmul(a, xp.matrix_transpose(w)) - b  # (B, out)
        loss = 0.5 * xp.mean(xp.sum(err * err, axis=-1))
        grads, var = _per_example(xp, {"weight": err[:, :, None] * a[:, None, :]})
        return loss, grads, var

    return Problem("matrix", f"matrix least squares W ({n_out}x{n_in}), inputs scaled over 2 decades, batch {batch}", init, batch_np, grad_fn)


# ----------------------------------------------------------------------------------------------
# 4. Replayed gradients: fixed sequences with the structure of real models
# ----------------------------------------------------------------------------------------------


def _replay(name: str, description: str, init: dict, batch_np: Callable[[int], dict]) -> Problem:
    """A problem whose step-``t`` gradient and variance are ``batch_np(t)["g_<param>"]`` / ``["v_<param>"]``."""

    def grad_fn(xp: Any, params: dict, data: dict) -> tuple:
        grads = {k: data[f"g_{k}"] for k in params}
        var = {k: data[f"v_{k}"] for k in params}
        loss = data["loss"] if "loss" in data else 0.0 * xp.sum(grads[next(iter(params))])
        return loss, grads, var

    return Problem(name, description, init, batch_np, grad_fn)


def structured_gradients(seed: int = 3) -> Problem:
    """Gradients with the structure of real models, replayed identically to every backend.

    Parameters and their step-``t`` gradients (a fixed mean direction plus fresh noise each step, so moments,
    variances and sign rules all see signal and noise):

    * ``embed`` (12, 20): rank 2 (``U_t V_t^T``), rows 2 and 7 and columns 0, 5 and 13 exactly zero (unused
      embedding rows, dead inputs): both Kronecker factors are rank-deficient with exact null directions;
    * ``heavy`` (8, 6): Student-t entries with 1.5 degrees of freedom (infinite variance: a few entries are
      100x the typical one);
    * ``tiny`` (5, 4) at scale 1e-8 and ``huge`` (6,) at scale 1e4 (gradients far from 1, around ``eps``);
    * ``bias`` (7,): entries 1 and 4 exactly zero.
    """
    rng = np.random.default_rng(seed)
    shapes = {"embed": (12, 20), "heavy": (8, 6), "tiny": (5, 4), "huge": (6,), "bias": (7,)}
    scales = {"embed": 1.0, "heavy": 1.0, "tiny": 1e-8, "huge": 1e4, "bias": 1.0}
    init = {k: rng.normal(size=s) for k, s in shapes.items()}
    mean = {k: rng.normal(size=s) for k, s in shapes.items()}
    u0, v0 = rng.normal(size=(12, 2)), rng.normal(size=(20, 2))
    dead_rows, dead_cols = [2, 7], [0, 5, 13]

    def batch_np(step: int) -> dict:
        r = np.random.default_rng([seed, 4, step])
        u = u0 + 0.5 * r.normal(size=u0.shape)
        v = v0 + 0.5 * r.normal(size=v0.shape)
        g = {"embed": u @ v.T}
        g["embed"][dead_rows, :] = 0.0
        g["embed"][:, dead_cols] = 0.0
        g["heavy"] = mean["heavy"] + r.standard_t(1.5, size=shapes["heavy"])
        g["tiny"] = scales["tiny"] * (mean["tiny"] + r.normal(size=shapes["tiny"]))
        g["huge"] = scales["huge"] * (mean["huge"] + r.normal(size=shapes["huge"]))
        g["bias"] = mean["bias"] + r.normal(size=shapes["bias"])
        g["bias"][[1, 4]] = 0.0
        out = {f"g_{k}": x for k, x in g.items()}
        for k, x in g.items():  # a positive per-element variance of the same scale (the -mb rules' extra input)
            out[f"v_{k}"] = (scales[k] ** 2) * r.uniform(0.1, 1.0, size=x.shape) * (x != 0)
        return out

    return _replay(
        "structured",
        "replayed gradients: rank 2 with zero rows/columns, Student-t(1.5) entries, scales 1e-8 and 1e4, zero biases",
        init,
        batch_np,
    )


class _DigitsRecording:
    """The digits MLP trained by mini-batch SGD in float64 NumPy; gradients recorded step by step (memoised)."""

    def __init__(self, seed: int, hidden: int, batch: int, lr: float) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError(
                "the 'digits' problem needs scikit-learn (pip install scikit-learn, or the 'test' extra of xpoptim); "
                f"it is not installed here ({exc})"
            ) from exc
        x, y = load_digits(return_X_y=True)
        self.x, self.y = x / 16.0, y
        rng = np.random.default_rng(seed)
        n_in, n_out = self.x.shape[1], 10
        self.init = {
            "w1": rng.uniform(-1, 1, size=(hidden, n_in)) / np.sqrt(n_in),
            "b1": rng.uniform(-1, 1, size=(hidden,)) / np.sqrt(n_in),
            "w2": rng.uniform(-1, 1, size=(n_out, hidden)) / np.sqrt(hidden),
            "b2": rng.uniform(-1, 1, size=(n_out,)) / np.sqrt(hidden),
        }
        self.seed, self.batch, self.lr = seed, batch, lr
        self.params = {k: v.copy() for k, v in self.init.items()}
        self.steps: list[dict] = []

    def _step(self) -> dict:
        t = len(self.steps) + 1
        idx = np.random.default_rng([self.seed, 5, t]).choice(len(self.x), size=self.batch, replace=False)
        x, y = self.x[idx], self.y[idx]
        p = self.params
        a = np.tanh(x @ p["w1"].T + p["b1"])
        z = a @ p["w2"].T + p["b2"]
        z = z - z.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(prob[np.arange(len(y)), y]))
        dz = prob.copy()
        dz[np.arange(len(y)), y] -= 1.0  # per-example d loss_k / d z_k
        d1 = (dz @ p["w2"]) * (1 - a * a)
        per_example = {
            "w1": d1[:, :, None] * x[:, None, :],
            "b1": d1,
            "w2": dz[:, :, None] * a[:, None, :],
            "b2": dz,
        }
        rec: dict = {"loss": np.asarray(loss)}
        for k, v in per_example.items():
            rec[f"g_{k}"] = v.mean(axis=0)
            rec[f"v_{k}"] = v.var(axis=0, ddof=1) / len(v)  # Eq. 44: unbiased variance of the mean
        for k in p:
            p[k] = p[k] - self.lr * rec[f"g_{k}"]
        return rec

    def gradients(self, step: int) -> dict:
        while len(self.steps) < step:
            self.steps.append(self._step())
        return self.steps[step - 1]


@functools.lru_cache(maxsize=4)
def _digits_recording(seed: int, hidden: int, batch: int, lr: float) -> _DigitsRecording:
    return _DigitsRecording(seed, hidden, batch, lr)


def digits_gradients(step: int, seed: int = 0, hidden: int = 32, batch: int = 64, lr: float = 0.1) -> dict:
    """The recorded float64 gradients of step ``step`` of the digits MLP (``g_<param>``, ``v_<param>``, ``loss``)."""
    return _digits_recording(seed, hidden, batch, lr).gradients(step)


def digits_mlp(seed: int = 0, hidden: int = 32, batch: int = 64, lr: float = 0.1) -> Problem:
    """The gradients of a 64-``hidden``-10 tanh MLP on scikit-learn's digits, replayed to every backend.

    The MLP (softmax cross-entropy, mini-batches of ``batch`` of the 1797 images scaled to [0, 1]) is trained by
    plain SGD at ``lr`` in float64 NumPy; its per-step mean gradients and their Eq. 44 variances are recorded
    once and fed identically to every backend and dtype. Pixels that are active in few images (three are never
    active) make the first layer's Kronecker factors nearly degenerate: the case where DeVA_Sinf's eigenbasis
    used to depend on the LAPACK.

    Raises:
        ImportError: scikit-learn is not installed (it is in the ``test`` extra).
    """
    rec = _digits_recording(seed, hidden, batch, lr)
    return _replay(
        "digits",
        f"replayed gradients of a 64-{hidden}-10 tanh MLP on sklearn digits (SGD lr {lr}, batch {batch}, float64)",
        rec.init,
        lambda step: rec.gradients(step),
    )


#: The verifier's fixed problem set, by name.
PROBLEMS: dict[str, Callable[[], Problem]] = {
    "quadratic": noisy_quadratic,
    "mlp": small_mlp,
    "matrix": matrix_regression,
    "structured": structured_gradients,
    "digits": digits_mlp,
}

#: The problems a default run uses: the closed-loop ones and the replayed real-model gradients (``digits`` is
#: skipped, with the reason in the report, where scikit-learn is not installed).
DEFAULT_PROBLEMS: tuple[str, ...] = ("quadratic", "mlp", "matrix", "structured", "digits")

#: The closed-loop problems (each backend computes gradients on its own trajectory).
CLOSED_LOOP_PROBLEMS: tuple[str, ...] = ("quadratic", "mlp", "matrix")

#: The replayed problems (the same recorded gradients for every backend).
REPLAYED_PROBLEMS: tuple[str, ...] = ("structured", "digits")


def get_problem(name: str) -> Problem:
    """Build a problem of ``PROBLEMS`` by name (clear ``ValueError`` for an unknown name).

    Raises:
        ValueError: an unknown name.
        ImportError: ``digits`` without scikit-learn.
    """
    if name not in PROBLEMS:
        raise ValueError(f"problem={name!r} is unknown: expected one of {sorted(PROBLEMS)}")
    return PROBLEMS[name]()
