"""Train in PyTorch, continue in JAX, finish in NumPy: one Muon run moved twice through checkpoint files.

A small MLP classifies points of a synthetic task (labels from a fixed random teacher network). The run takes
``--steps`` full-batch steps in three segments:

1. PyTorch, ``xpoptim.adapters.torch.Muon`` (2-D weights to Muon, biases to the AdamW fallback); the state is
   exported (``opt.export_state(model.named_parameters())``) and written to a safetensors file;
2. JAX, ``xpoptim.adapters.optax.muon`` on a flax-style tree (``Dense`` kernels ``(in, out)``); the state is read
   back and imported (``xo.import_state``), the run continues under ``jax.jit``, and the state is exported to an
   ``.npz`` file;
3. NumPy, ``xpoptim.adapters.numpy.Muon``, hand-written gradients; the state is imported from the file.

An uninterrupted PyTorch run of the same length is the reference: the script prints the largest difference of the
parameters at the end (relative to the distance travelled) and plots both loss curves, the moved one coloured by
framework, into ``docs/portable_loss.png``.

    python examples/portable_torch_jax_numpy.py [--steps 120] [--out docs/portable_loss.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import xpoptim.portable as xpp
from xpoptim.adapters import numpy as xn
from xpoptim.adapters import optax as xo
from xpoptim.adapters import torch as xt

IN, HIDDEN, CLASSES, N = 16, 32, 4, 512
LR = 0.02


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, IN))
    teacher = rng.standard_normal((IN, CLASSES)) + 0.3 * rng.standard_normal((IN, CLASSES))
    return x, np.argmax(np.tanh(x @ teacher) + 0.5 * rng.standard_normal((N, CLASSES)), axis=1)


def init() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)).double()
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


# -- the three frameworks --------------------------------------------------------------------------------------------


def torch_segment(params, steps, portable=None):
    x, y = (torch.from_numpy(a) for a in data())
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(params[n]))
    opt = xt.Muon(model.named_parameters(), lr=LR, compile=False)  # biases: the AdamW fallback, at lr too
    if portable is not None:
        opt.import_state(portable)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}, losses, opt.export_state()


def jax_segment(params, steps, portable):
    x, y = (jnp.asarray(a) for a in data())
    tree = {layer: {"kernel": jnp.asarray(params[f"{layer}.weight"].T), "bias": jnp.asarray(params[f"{layer}.bias"])} for layer in ("0", "2")}

    def loss_fn(p):
        logits = jnp.tanh(x @ p["0"]["kernel"] + p["0"]["bias"]) @ p["2"]["kernel"] + p["2"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = xo.muon(learning_rate=LR)  # 2-D leaves (flax (in, out) kernels) to Muon, the rest to AdamW
    state = xo.import_state(portable.rename(lambda n: n.replace("weight", "kernel")), tree, tx)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(steps):
        tree, state, loss = step(tree, state)
        losses.append(float(loss))
    out = {f"{layer}.weight": np.asarray(tree[layer]["kernel"]).T.copy() for layer in tree}
    out.update({f"{layer}.bias": np.asarray(tree[layer]["bias"]).copy() for layer in tree})
    portable = xo.export_state(state, tree, optimizer="muon").rename(lambda n: n.replace("kernel", "weight"))
    return out, losses, portable


def numpy_segment(params, steps, portable):
    x, y = data()
    onehot = np.eye(CLASSES)[y]
    arrays = {n: v.copy() for n, v in params.items()}
    opt = xn.Muon(arrays, lr=LR)
    opt.import_state(portable)
    losses = []
    for _ in range(steps):
        h = np.tanh(x @ arrays["0.weight"].T + arrays["0.bias"])
        z = h @ arrays["2.weight"].T + arrays["2.bias"]
        z = z - z.max(axis=1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        losses.append(float(-np.mean(np.log(prob[np.arange(N), y]))))
        dz = (prob - onehot) / N
        dh = (dz @ arrays["2.weight"]) * (1 - h * h)
        opt.step({"0.weight": dh.T @ x, "0.bias": dh.sum(0), "2.weight": dz.T @ h, "2.bias": dz.sum(0)})
    return arrays, losses


# -- the run ----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120, help="total steps (three equal segments)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "portable_loss.png"))
    args = ap.parse_args()
    k = args.steps // 3
    with jax.enable_x64(True), jax.default_matmul_precision("float32"), tempfile.TemporaryDirectory() as tmp:
        p0 = init()
        p1, l1, s1 = torch_segment(p0, k)
        s1.save(Path(tmp) / "after_torch.safetensors")
        p2, l2, s2 = jax_segment(p1, k, xpp.load(Path(tmp) / "after_torch.safetensors"))
        s2.save(Path(tmp) / "after_jax.npz")
        p3, l3 = numpy_segment(p2, k, xpp.load(Path(tmp) / "after_jax.npz"))
        ref, lref, _ = torch_segment(p0, 3 * k)
    diff = max(float(np.max(np.abs(p3[n] - ref[n]))) for n in ref)
    travel = max(float(np.max(np.abs(ref[n] - p0[n]))) for n in ref)
    print(f"Muon, float64, {3 * k} steps in three segments (torch -> JAX -> NumPy) against one torch run:")
    print(f"  loss {lref[0]:.4f} -> {lref[-1]:.4f}; final parameters differ by {diff:.2e} ({diff / travel:.2e} of the distance travelled)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, 3 * k + 1)
    ax.plot(steps, lref, color="0.75", lw=5, label="uninterrupted PyTorch run")
    for seg, (name, losses, color) in enumerate((("PyTorch", l1, "C0"), ("JAX / optax", l2, "C1"), ("NumPy", l3, "C2"))):
        ax.plot(steps[seg * k : (seg + 1) * k], losses, color=color, lw=1.8, label=f"moved run: {name}")
    for s in (k, 2 * k):
        ax.axvline(s + 0.5, color="0.4", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"One Muon run, moved torch -> JAX -> NumPy (final parameters within {diff / travel:.0e} of travel)")
    ax.title.set_fontsize(9)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
