"""Shared held-out protocol for the small-network experiments: scikit-learn's digits, an MLP, the torch adapter.

Data: the 1797 bundled 8x8 digits (no download), pixels scaled to [-0.5, 0.5], split once with a fixed
seed into 1000 training, 397 validation and 400 test images. Model: an MLP 64 -> hidden -> ... -> 10
(tanh), float64 by default, trained by ``xpoptim.adapters.torch.create`` with minibatches drawn without
replacement from the training set. The mini-batch rules (``msvag_mb``, ``adam_star_mb``) get the
per-example gradient variance of the batch mean from ``torch.func`` and ``xpoptim.core.moments``.

Protocol (``tune_lr`` then ``evaluate_seeds``): every optimizer gets the same learning-rate grid; each
grid point is trained over the full horizon on the *tuning* seeds and scored by the mean validation
cross-entropy at the end (a run whose loss becomes non-finite or exceeds ``STOP_ABOVE`` scores +inf);
the best lr is then trained on fresh *evaluation* seeds and reported on the test set, mean +- standard
error. A seed fixes the initialisation and the minibatch order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xpoptim.core import SPECS, MatrixSpec

#: Training / validation / test sizes (1797 images in all).
SPLIT = (1000, 397, 400)
#: The learning-rate grid shared by every optimizer: 3, 1, 0.3, ..., 1e-4 (half decades).
GRID = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4)
#: Mini-batch rules that need the per-example gradient variance.
MB = ("msvag_mb", "adam_star_mb")
#: Learning rate of the fallback rule (AdamW / DeVA_linf) on the non-matrix parameters of Muon / DeVA_Sinf.
FALLBACK_LR = 3e-3
#: A run stops (and scores +inf) once its minibatch loss is non-finite or above this.
STOP_ABOVE = 1e3
#: Tuning seeds and evaluation seeds never overlap.
TUNING_SEEDS = (100, 101, 102, 103)
EVAL_SEEDS = tuple(range(8))


def load(split_seed: int = 0) -> dict:
    """The digits split: ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` as NumPy float64 / int64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0 - 0.5).astype(np.float64)
    perm = np.random.default_rng(split_seed).permutation(len(x))
    a, b = SPLIT[0], SPLIT[0] + SPLIT[1]
    parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b : b + SPLIT[2]]}
    return {k: (x[i], y[i].astype(np.int64)) for k, i in parts.items()}


def init_mlp(seed: int, widths: Sequence[int] = (64, 64, 10)) -> dict:
    """LeCun-normal weights (torch layout ``(out, in)``) and zero biases: ``W1, b1, W2, b2, ...``."""
    r = np.random.default_rng(seed)
    p = {}
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        p[f"W{i}"] = r.normal(0, 1 / math.sqrt(fan_in), (fan_out, fan_in))
        p[f"b{i}"] = np.zeros(fan_out)
    return p


def matrix_keys(init: Mapping[str, Any]) -> tuple:
    """The hidden weight matrices (every ``W`` but the output layer's): the matrix rules act on these."""
    ws = sorted((k for k in init if k.startswith("W")), key=lambda k: int(k[1:]))
    return tuple(ws[:-1])


def batch_indices(seed: int, steps: int, n: int, batch_size: int) -> np.ndarray:
    """``(steps, batch_size)`` indices, each batch drawn without replacement (seed ``1000 + seed``)."""
    r = np.random.default_rng(1000 + seed)
    return np.stack([r.choice(n, batch_size, replace=False) for _ in range(steps)])


def forward(p: Mapping[str, Any], x: Any) -> Any:
    """Logits of the tanh MLP (torch)."""
    import torch
    import torch.nn.functional as F

    n = sum(1 for k in p if k.startswith("W"))
    h = x
    for i in range(1, n + 1):
        h = F.linear(h, p[f"W{i}"], p[f"b{i}"])
        if i < n:
            h = torch.tanh(h)
    return h


def make_optimizer(name: str, params: Mapping[str, Any], lr: float, hp: Mapping[str, Any] | None = None) -> Any:
    """``xpoptim.adapters.torch.create(name, ...)`` with no weight decay; matrix rules get the hidden matrices."""
    from xpoptim.adapters import torch as xt

    hp = {"lr": lr, "weight_decay": 0.0, **(hp or {})}
    spec = SPECS[name]
    if isinstance(spec, MatrixSpec):
        mats = matrix_keys(params)
        groups = [
            {"params": [params[k] for k in mats], "rule": name},
            {"params": [v for k, v in params.items() if k not in mats], "rule": spec.fallback,
             **dict(spec.fallback_defaults), "lr": FALLBACK_LR, "weight_decay": 0.0},
        ]
        return xt.create(name, groups, **hp)
    return xt.create(name, list(params.values()), **hp)


def per_example_variance(params: Mapping[str, Any], x: Any, y: Any, loss_fn: Any) -> dict:
    """Set ``p.grad`` to the batch-mean gradient and return ``{p: variance of the batch mean}`` (torch.func)."""
    import array_api_compat.torch as txp
    import torch

    from xpoptim.core.moments import minibatch_variance

    det = {k: v.detach() for k, v in params.items()}

    def one(ps: dict, xi: Any, yi: Any) -> Any:
        return loss_fn(ps, xi[None], yi[None])

    pe = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(det, x, y)
    out = {}
    for k, p in params.items():
        p.grad = pe[k].mean(0)
        out[p] = minibatch_variance(txp, pe[k], axis=0)
    return out


def cross_entropy(p: Mapping[str, Any], x: Any, y: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(forward(p, x), y)


def train(
    name: str,
    lr: float,
    seed: int,
    data: dict,
    steps: int,
    batch_size: int = 64,
    widths: Sequence[int] = (64, 64, 10),
    hp: Mapping[str, Any] | None = None,
) -> tuple:
    """Train one run; return ``(minibatch losses, final params as NumPy, diverged)``.

    A run that diverges (non-finite loss or above ``STOP_ABOVE``) stops early with ``diverged=True``.
    """
    import torch

    x, y = (torch.as_tensor(a) for a in data["train"])
    init = init_mlp(seed, widths)
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in init.items()}
    opt = make_optimizer(name, params, lr, hp)
    idx = torch.as_tensor(batch_indices(seed, steps, len(x), batch_size))
    losses = []
    diverged = False
    for t in range(steps):
        xb, yb = x[idx[t]], y[idx[t]]
        if name in MB:
            with torch.no_grad():
                loss = cross_entropy(params, xb, yb)
            opt.step(grad_variance=per_example_variance(params, xb, yb, cross_entropy))
        else:
            opt.zero_grad()
            loss = cross_entropy(params, xb, yb)
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        if not losses[-1] < STOP_ABOVE:
            diverged = True
            break
    final = {k: v.detach().numpy().copy() for k, v in params.items()}
    diverged = diverged or not all(np.all(np.isfinite(v)) for v in final.values())
    return np.array(losses), final, diverged


def evaluate(params: Mapping[str, np.ndarray], split: tuple) -> tuple:
    """``(cross-entropy, accuracy)`` of NumPy ``params`` on ``split = (x, y)``; (+inf, nan) for non-finite params."""
    import torch

    if not all(np.all(np.isfinite(v)) for v in params.values()):
        return math.inf, math.nan
    with torch.no_grad():
        p = {k: torch.as_tensor(v) for k, v in params.items()}
        logits = forward(p, torch.as_tensor(split[0]))
        y = torch.as_tensor(split[1])
        import torch.nn.functional as F

        loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(-1) == y).double().mean())
    return (loss if math.isfinite(loss) else math.inf), acc


def tune_lr(name: str, data: dict, steps: int, grid: Sequence[float] = GRID, seeds: Sequence[int] = TUNING_SEEDS, **kw: Any) -> tuple:
    """The grid point with the lowest mean validation cross-entropy over ``seeds``; returns ``(lr, {lr: score})``."""
    scores = {}
    for lr in grid:
        vals = []
        for s in seeds:
            _, params, diverged = train(name, lr, s, data, steps, **kw)
            vals.append(math.inf if diverged else evaluate(params, data["val"])[0])
        scores[lr] = float(np.mean(vals))
    best = min(scores, key=lambda k: (scores[k], -k))
    return best, scores


def evaluate_seeds(name: str, lr: float, data: dict, steps: int, seeds: Sequence[int] = EVAL_SEEDS, **kw: Any) -> dict:
    """Train on each evaluation seed; per-seed arrays of test loss, test accuracy, final training loss and curves."""
    out: dict = {"test_loss": [], "test_acc": [], "curves": [], "diverged": 0}
    for s in seeds:
        losses, params, diverged = train(name, lr, s, data, steps, **kw)
        loss, acc = evaluate(params, data["test"])
        out["test_loss"].append(loss)
        out["test_acc"].append(acc)
        out["curves"].append(losses)
        out["diverged"] += int(diverged)
    out["test_loss"] = np.array(out["test_loss"])
    out["test_acc"] = np.array(out["test_acc"])
    return out


def mean_se(x: Sequence[float]) -> tuple:
    """Mean and standard error (``std(ddof=1) / sqrt(n)``; 0 for one value)."""
    a = np.asarray(x, dtype=float)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0
    return float(a.mean()), se


def compare(a: Sequence[float], b: Sequence[float], z: float = 2.0) -> tuple:
    """``(difference of means, its standard error, verdict)`` for independent samples ``a - b``.

    The verdict is ``"better"`` (diff > z se), ``"worse"`` (diff < -z se) or ``"tie"``.
    """
    ma, sa = mean_se(a)
    mb, sb = mean_se(b)
    d, se = ma - mb, math.hypot(sa, sb)
    verdict = "better" if d > z * se else "worse" if d < -z * se else "tie"
    return d, se, verdict
