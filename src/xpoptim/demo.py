"""Demo: the same model, the same optimizer, the same batches, in PyTorch and in JAX; the same loss curve.

``python -m xpoptim.demo`` (also run by ``python -m xpoptim.matrix`` after the matrix) trains a small
MLP (64-32-10, tanh, softmax cross-entropy) on scikit-learn's digits (8x8 images; fixed synthetic data
when scikit-learn is not installed) with one xpoptim optimizer, twice from the same initialisation and
the same mini-batches:

* in PyTorch: ``torch.nn`` layers, autograd, ``xpoptim.adapters.torch.create(...)``;
* in JAX: a pure function of flax-layout kernels ``(in, out)``, ``jax.value_and_grad``, the optax
  transformation ``xpoptim.adapters.optax.create(...)``, the whole step under ``jax.jit``.

It prints the two loss curves side by side at a few steps, the largest difference, a sparkline, the
test accuracy of both, and, when matplotlib is installed, writes the two curves and their difference
to a PNG (``xpoptim-demo.png`` in the current folder by default; ``--png PATH`` elsewhere, ``--no-png``
none). Each framework computes its own
gradients with its own autodiff, so the agreement checks the whole training loop. In float32 the two
curves agree to about 1e-6 (rounding in two different matmul/autodiff implementations).

When torch or JAX is missing, the missing side is replaced by the NumPy array adapter
(``xpoptim.adapters.array``, gradients by hand) and the demo says which comparison it would show once
the framework is installed.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_data", "init_params", "train_torch", "train_jax", "train_numpy", "sparkline", "run", "main"]

_SPARK = "▁▂▃▄▅▆▇█"

#: Where ``python -m xpoptim.demo`` writes its figure unless told otherwise (needs matplotlib).
DEFAULT_PNG = "xpoptim-demo.png"


def load_data(seed: int = 0) -> tuple:
    """``(x_train, y_train, x_test, y_test, source)``: sklearn digits scaled to [0, 1], or synthetic data."""
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data / 16.0, d.target.astype(np.int64)
        source = "scikit-learn digits (1797 8x8 images, 10 classes)"
    except ImportError:
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(10, 64))
        y = rng.integers(0, 10, size=1500)
        x = centers[y] + 1.5 * rng.normal(size=(1500, 64))
        source = "synthetic Gaussian clusters (scikit-learn not installed)"
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test], source


def init_params(n_in: int = 64, hidden: int = 32, n_out: int = 10, seed: int = 0) -> dict:
    """Float64 NumPy initial parameters in torch ``Linear`` layout: ``w1`` (hidden, in), ``w2`` (out, hidden)."""
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.uniform(-1, 1, size=(hidden, n_in)) / math.sqrt(n_in),
        "b1": rng.uniform(-1, 1, size=(hidden,)) / math.sqrt(n_in),
        "w2": rng.uniform(-1, 1, size=(n_out, hidden)) / math.sqrt(hidden),
        "b2": rng.uniform(-1, 1, size=(n_out,)) / math.sqrt(hidden),
    }


def batches(n: int, batch: int, steps: int, seed: int = 0) -> list:
    """Index arrays of the mini-batches (epochs of fixed random permutations)."""
    rng = np.random.default_rng(seed + 1)
    out: list = []
    while len(out) < steps:
        perm = rng.permutation(n)
        out.extend(perm[i : i + batch] for i in range(0, n - batch + 1, batch))
    return out[:steps]


def train_torch(optimizer: str, hp: dict, data: tuple, params: dict, idx: list) -> tuple:
    """Train in PyTorch; returns ``(losses, test_accuracy)``."""
    import torch

    from xpoptim.adapters import torch as xt

    x_tr, y_tr, x_te, y_te = (torch.from_numpy(np.asarray(a)) for a in data[:4])
    x_tr, x_te = x_tr.float(), x_te.float()
    hidden = torch.nn.Linear(params["w1"].shape[1], params["w1"].shape[0])
    head = torch.nn.Linear(params["w2"].shape[1], params["w2"].shape[0])
    model = torch.nn.Sequential(hidden, torch.nn.Tanh(), head)
    with torch.no_grad():
        hidden.weight.copy_(torch.from_numpy(params["w1"]))
        hidden.bias.copy_(torch.from_numpy(params["b1"]))
        head.weight.copy_(torch.from_numpy(params["w2"]))
        head.bias.copy_(torch.from_numpy(params["b2"]))
    opt = xt.create(optimizer, model.parameters(), **hp)
    losses = []
    for b in idx:
        bi = torch.from_numpy(b)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_tr[bi]), y_tr[bi])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        acc = float((model(x_te).argmax(-1) == y_te).float().mean())
    return np.array(losses), acc


def train_jax(optimizer: str, hp: dict, data: tuple, params: dict, idx: list) -> tuple:
    """Train in JAX/optax (flax-layout kernels, ``jax.jit``); returns ``(losses, test_accuracy)``."""
    import jax
    import jax.numpy as jnp
    import optax

    from xpoptim.adapters import optax as xo

    x_tr, y_tr, x_te, y_te = data[:4]
    # flax layout: kernels are (in, out), the transpose of torch's Linear.weight
    p = {
        "w1": jnp.asarray(params["w1"].T, dtype=jnp.float32),
        "b1": jnp.asarray(params["b1"], dtype=jnp.float32),
        "w2": jnp.asarray(params["w2"].T, dtype=jnp.float32),
        "b2": jnp.asarray(params["b2"], dtype=jnp.float32),
    }
    tx = xo.create(optimizer, **hp)
    state = tx.init(p)

    def forward(p: dict, x: Any) -> Any:
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss_fn(p: dict, x: Any, y: Any) -> Any:
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y).mean()

    @jax.jit
    def step(p: dict, state: Any, x: Any, y: Any) -> tuple:
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        upd, state = tx.update(g, state, p)
        return optax.apply_updates(p, upd), state, loss

    xs = jnp.asarray(x_tr, dtype=jnp.float32)
    ys = jnp.asarray(y_tr, dtype=jnp.int32)
    losses = []
    for b in idx:
        p, state, loss = step(p, state, xs[b], ys[b])
        losses.append(float(loss))
    acc = float(jnp.mean(jnp.argmax(forward(p, jnp.asarray(x_te, dtype=jnp.float32)), -1) == jnp.asarray(y_te)))
    return np.array(losses), acc


def train_numpy(optimizer: str, hp: dict, data: tuple, params: dict, idx: list) -> tuple:
    """Train with the NumPy array adapter (backpropagation by hand, float32); returns ``(losses, test_accuracy)``."""
    from xpoptim.adapters import array as xa

    x_tr, y_tr, x_te, y_te = data[:4]
    x_tr, x_te = x_tr.astype(np.float32), x_te.astype(np.float32)
    p = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
    opt = xa.create(optimizer, p, **hp)

    def forward(x: np.ndarray) -> tuple:
        h = np.tanh(x @ p["w1"].T + p["b1"])
        return h, h @ p["w2"].T + p["b2"]

    losses = []
    for b in idx:
        x, y = x_tr[b], y_tr[b]
        h, logits = forward(x)
        z = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        losses.append(float(-np.mean(np.log(prob[np.arange(len(y)), y]))))
        d2 = prob
        d2[np.arange(len(y)), y] -= 1
        d2 /= len(y)
        d1 = (d2 @ p["w2"]) * (1 - h * h)
        opt.step({"w1": d1.T @ x, "b1": d1.sum(0), "w2": d2.T @ h, "b2": d2.sum(0)})
    acc = float(np.mean(forward(x_te)[1].argmax(-1) == y_te))
    return np.array(losses), acc


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """A one-line Unicode sparkline of ``values`` (resampled to ``width`` characters)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return ""
    v = v[np.linspace(0, v.size - 1, min(width, v.size)).astype(int)]
    lo, hi = float(v.min()), float(v.max())
    scale = (hi - lo) or 1.0
    return "".join(_SPARK[int(round((x - lo) / scale * (len(_SPARK) - 1)))] for x in v)


def _available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:
        return False


_RUNNERS = {
    "torch": ("PyTorch (torch.optim adapter)", "xpoptim.adapters.torch", train_torch),
    "jax": ("JAX (optax adapter, jit)", "xpoptim.adapters.optax", train_jax),
    "numpy": ("NumPy (array adapter)", "xpoptim.adapters.array", train_numpy),
}


def run(optimizer: str = "mvngrad", hp: dict | None = None, steps: int = 150, batch: int = 64, png: str | Path | None = None, out=print) -> dict:
    """Train twice (torch and JAX, or NumPy standing in for a missing one) and report the agreement.

    Args:
        optimizer: an xpoptim optimizer name.
        hp: its hyperparameters (default ``lr=3e-3``).
        steps: training steps.
        batch: mini-batch size.
        png: where to write the loss-curve figure (needs matplotlib); ``None``: no figure.
        out: the print function.

    Returns:
        ``{"frameworks": [a, b], "losses": {a: array, b: array}, "max_abs_diff": float,
        "accuracy": {a: float, b: float}, "png": path or None}`` (one framework and
        ``max_abs_diff=None`` when neither torch nor JAX is installed).
    """
    hp = dict(hp) if hp is not None else {"lr": 3e-3}
    wanted = ["torch", "jax"]
    have = [k for k in wanted if _available(_RUNNERS[k][1])]
    missing = [k for k in wanted if k not in have]
    pair = (have + ["numpy", "numpy"])[:2]
    if pair == ["numpy", "numpy"]:
        pair = ["numpy"]
    x_tr, y_tr, x_te, y_te, source = load_data()
    params = init_params(n_in=x_tr.shape[1])
    idx = batches(len(x_tr), batch, steps)
    out(f"\n== xpoptim demo: {optimizer} {hp} on {source}, MLP {x_tr.shape[1]}-32-10, batch {batch}, {steps} steps, float32 ==")
    if missing:
        out(f"   {' and '.join(missing)} not installed: comparing {' with '.join(_RUNNERS[k][0] for k in pair)} instead; "
            f"install them (pip install torch jax optax) to see torch and JAX train to the same curve")
    from ._backends import pinned_numerics

    results = {}
    with pinned_numerics():
        _float32_jax()
        for k in pair:
            results[k] = _RUNNERS[k][2](optimizer, hp, (x_tr, y_tr, x_te, y_te), params, idx)
    names = list(results)
    la = results[names[0]][0]
    lb = results[names[-1]][0]
    diff = np.abs(la - lb)
    marks = sorted({0, 1, 2, 5, 10, 20, 50, 100, steps // 2, steps - 1} & set(range(steps)))
    if len(names) > 1:
        out(f"   {'step':>5}  {names[0] + ' loss':>14}  {names[-1] + ' loss':>14}  {'|diff|':>9}")
        for s in marks:
            out(f"   {s + 1:>5}  {la[s]:>14.7f}  {lb[s]:>14.7f}  {diff[s]:>9.1e}")
        out(f"   max |loss difference| over {steps} steps: {diff.max():.2e} (loss from {la[0]:.3f} to {la[-1]:.3f})")
    else:
        out(f"   {'step':>5}  {names[0] + ' loss':>14}")
        for s in marks:
            out(f"   {s + 1:>5}  {la[s]:>14.7f}")
        out("   (one framework only: nothing to compare against)")
    for k in names:
        out(f"   {k:>6} {sparkline(results[k][0])}")
    out("   test accuracy: " + ", ".join(f"{k} {results[k][1]:.3f}" for k in names))
    written = None
    if png is not None:
        written = _plot(results, optimizer, Path(png), out)
    return {
        "frameworks": names,
        "losses": {k: results[k][0] for k in names},
        "max_abs_diff": float(diff.max()) if len(names) > 1 else None,
        "accuracy": {k: results[k][1] for k in names},
        "png": written,
    }


def _float32_jax() -> None:
    """The demo trains in float32: keep JAX's default float dtype float32 inside the pinned context."""
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.config.update("jax_enable_x64", False)


def _plot(results: dict, optimizer: str, path: Path, out) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out("   (matplotlib not installed: no figure)")
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(results)
    for k, style in zip(names, ("-", "--")):
        ax.plot(np.arange(1, len(results[k][0]) + 1), results[k][0], style, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{optimizer}: same init, same batches")
    ax.legend()
    d = np.abs(results[names[0]][0] - results[names[-1]][0])
    ax2.semilogy(np.arange(1, len(d) + 1), np.maximum(d, 1e-12))
    ax2.set_xlabel("step")
    ax2.set_ylabel(f"|loss {names[0]} - loss {names[-1]}|")
    ax2.set_title("difference (float32)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out(f"   wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xpoptim.demo [--optimizer NAME] [--lr LR] [--steps N] [--png PATH | --no-png]``."""
    p = argparse.ArgumentParser(prog="python -m xpoptim.demo", description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="mvngrad", help="xpoptim optimizer name (default mvngrad)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--png", default=DEFAULT_PNG, help=f"write the loss curves here when matplotlib is installed (default {DEFAULT_PNG})")
    p.add_argument("--no-png", dest="png", action="store_const", const=None, help="write no figure")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.steps < 1:
        p.error(f"--steps={args.steps} is invalid: expected an integer >= 1")
    run(args.optimizer, {"lr": args.lr}, steps=args.steps, png=args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
