"""Every optimizer on real data, held out, in torch and JAX: an MLP on scikit-learn's digits.

(a) Held-out protocol (``_digits``): an MLP 64 -> 64 -> 10 (tanh, float64) on the 1000 / 397 / 400
    train / validation / test split, 300 steps of batch 64, every optimizer of ``xpoptim.core.SPECS``
    through the torch adapter. The same learning-rate grid for every optimizer; the lr with the lowest
    mean validation cross-entropy after the full 300 steps on 4 tuning seeds is then run on 8 fresh
    evaluation seeds and reported on the test set (mean +- standard error). Muon and DeVA_Sinf act on
    the hidden weight matrix, their fallback rule (AdamW / DeVA_linf at lr 3e-3) on the rest. Weight
    decay 0 everywhere (Balles & Hennig use none). The MVN-Grad paper's claim that MVN-Grad matches or
    outperforms Adam, AdaBelief and LaProp is checked on test accuracy.
(b) The same numbers in both frameworks: each optimizer at its tuned lr, on two evaluation seeds, through
    ``xpoptim.adapters.torch`` and ``xpoptim.adapters.optax`` from the same initial weights and minibatches
    (per-example variances from torch.func and jax.vmap for the mini-batch rules); the relative deviation
    of the training losses is measured over the first 10 steps and at later steps.

Run: ``python -m benchmarks.experiments real_data [--quick]``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from xpoptim.core import SPECS, MatrixSpec

from . import _digits as D
from ._common import Report, one_thread_per_framework, parse_args, run_main

#: Library modules whose functions compute this experiment's numbers (see ``_provenance``).
SOURCES = (
    "benchmarks/experiments/_digits.py",
    "src/xpoptim/core/_backend.py",
    "src/xpoptim/core/adam_family.py",
    "src/xpoptim/core/balles_hennig.py",
    "src/xpoptim/core/deva.py",
    "src/xpoptim/core/directions.py",
    "src/xpoptim/core/factors.py",
    "src/xpoptim/core/functional.py",
    "src/xpoptim/core/moments.py",
    "src/xpoptim/core/muon.py",
    "src/xpoptim/core/mvngrad.py",
    "src/xpoptim/core/spec.py",
    "src/xpoptim/core/state.py",
)

EARLY = 10  # steps over which the two frameworks must agree to rounding
CHECKPOINTS = (10, 50, 100, 300)


def jax_forward(p: dict, x, y):
    """The MLP in JAX; weights stored transposed (``(in, out)``, flax layout) so shape scales agree."""
    import jax
    import jax.numpy as jnp

    n = sum(1 for k in p if k.startswith("W"))
    h = x
    for i in range(1, n + 1):
        h = h @ p[f"W{i}"] + p[f"b{i}"]
        if i < n:
            h = jnp.tanh(h)
    return jnp.mean(jax.nn.logsumexp(h, -1) - jnp.take_along_axis(h, y[..., None], -1)[..., 0])


def run_jax(name: str, lr: float, seed: int, data: dict, steps: int, batch_size: int = 64) -> np.ndarray:
    """Training losses of the optax adapter from the same initialisation and minibatches as ``_digits.train``."""
    import jax
    import jax.numpy as jnp
    import optax

    from xpoptim.adapters import optax as xo

    init = D.init_mlp(seed)
    params = {k: jnp.asarray(v.T if k.startswith("W") else v) for k, v in init.items()}
    hp = {"lr": lr, "weight_decay": 0.0}
    if isinstance(SPECS[name], MatrixSpec):
        mats = D.matrix_keys(init)
        hp["fallback_hyperparams"] = {"lr": D.FALLBACK_LR, "weight_decay": 0.0}
        hp["dimension_numbers"] = {k: (xo.DimensionNumbers() if k in mats else None) for k in params}
    opt = xo.create(name, **hp)

    def loss_one(p, ex):
        return jax_forward(p, ex[0][None], ex[1][None])

    @jax.jit
    def step(p, s, xb, yb):
        if name in D.MB:
            _, g, gv = xo.per_example_grad_variance(loss_one, p, (xb, yb))
            loss = jax_forward(p, xb, yb)
            u, s = opt.update(g, s, p, grad_variance=gv)
        else:
            loss, g = jax.value_and_grad(jax_forward)(p, xb, yb)
            u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    x, y = data["train"]
    idx = D.batch_indices(seed, steps, len(x), batch_size)
    state = opt.init(params)
    losses = []
    for t in range(steps):
        params, state, loss = step(params, state, jnp.asarray(x[idx[t]]), jnp.asarray(y[idx[t]]))
        losses.append(loss)
    return np.array([float(v) for v in losses])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    with one_thread_per_framework(jax_x64=True):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        import jax  # noqa: F401
        import torch  # noqa: F401

        from xpoptim.adapters import optax as _xo  # noqa: F401
        from xpoptim.adapters import torch as _xt  # noqa: F401
    except Exception as exc:  # an adapter is missing: say exactly what
        print(f"real_data: cannot run, an adapter or framework is not importable: {exc!r}")
        return 2
    rep = Report("real_data", "Every optimizer on digits, held out, in torch and JAX", args.out, args.quick, SOURCES)
    names = ["adam", "adabelief", "laprop", "mvngrad", "muon", "msvag_mb"] if args.quick else list(SPECS)
    steps = 30 if args.quick else 300
    grid = D.GRID[3:6] if args.quick else D.GRID
    tuning, evals = (D.TUNING_SEEDS[:1], D.EVAL_SEEDS[:2]) if args.quick else (D.TUNING_SEEDS, D.EVAL_SEEDS)
    data = D.load()
    rep.note(
        f"Split {D.SPLIT[0]} / {D.SPLIT[1]} / {D.SPLIT[2]} (train / validation / test), {steps} steps of batch 64, "
        f"float64. Grid (every optimizer): {', '.join(f'{g:g}' for g in grid)}. Tuning seeds {list(tuning)} "
        f"(lowest mean validation cross-entropy after {steps} steps), evaluation seeds {list(evals)} (test set). "
        f"Fallback lr for Muon / DeVA_Sinf non-matrix parameters: {D.FALLBACK_LR:g} (our choice)."
    )

    tuned, results, rows = {}, {}, []
    for name in names:
        lr, scores = D.tune_lr(name, data, steps, grid, tuning)
        res = D.evaluate_seeds(name, lr, data, steps, evals)
        tuned[name], results[name] = lr, res
        edge = "top" if lr == grid[0] else "bottom" if lr == grid[-1] else ""
        acc, acc_se = D.mean_se(100 * res["test_acc"])
        loss, loss_se = D.mean_se(res["test_loss"])
        rows.append([SPECS[name].title, f"{lr:g}" + (f" ({edge} of grid)" if edge else ""), f"{scores[lr]:.4f}",
                     f"{acc:.2f} +- {acc_se:.2f}", f"{loss:.4f} +- {loss_se:.4f}", res["diverged"]])
        print(f"  {name}: lr {lr:g} val {scores[lr]:.4f} test acc {acc:.2f} +- {acc_se:.2f}", flush=True)
    rep.note(f"### (a) Held-out protocol\n\nTest accuracy (%) and test cross-entropy, mean +- standard error over "
             f"{len(evals)} evaluation seeds, at the lr chosen on validation.")
    rep.table(["optimizer", "lr (validation)", "validation CE (tuning seeds)", "test accuracy %", "test CE",
               "diverged eval runs"], rows)
    src = "MVN-Grad paper, experiments section (matches or outperforms Adam, AdaBelief, LaProp)"
    if "mvngrad" in results:
        for other in ("adam", "adabelief", "laprop"):
            if other not in results:
                continue
            d, se, verdict = D.compare(100 * results["mvngrad"]["test_acc"], 100 * results[other]["test_acc"])
            rep.check(f"MVN-Grad matches or outperforms {SPECS[other].title} on test accuracy (not worse by more than 2 s.e.)",
                      verdict != "worse",
                      f"MVN-Grad - {SPECS[other].title} = {d:+.2f} +- {se:.2f} points ({verdict})", strict=False, source=src)

    # (b) torch vs JAX at the tuned learning rates.
    agree_seeds = evals[:2]
    dev_rows, early_dev = [], {}
    for name in names:
        tc = np.array([D.train(name, tuned[name], s, data, steps)[0] for s in agree_seeds], dtype=object)
        jc = [run_jax(name, tuned[name], s, data, steps) for s in agree_seeds]
        n = min(min(len(a) for a in tc), min(len(a) for a in jc))
        t_arr = np.array([a[:n] for a in tc], dtype=float)
        j_arr = np.array([a[:n] for a in jc], dtype=float)
        rel = np.max(np.abs(t_arr - j_arr) / np.maximum(np.abs(t_arr), 1e-300), axis=0)
        early_dev[name] = float(np.max(rel[:EARLY]))
        over = np.nonzero(rel > 1e-12)[0]
        at = [f"{float(np.max(rel[max(0, c - 5):c])):.1e}" if c <= n else "-" for c in CHECKPOINTS if c <= steps]
        dev_rows.append([SPECS[name].title, f"{tuned[name]:g}", f"{early_dev[name]:.1e}", *at,
                         int(over[0]) + 1 if over.size else "-"])
    rep.note(f"### (b) torch vs JAX\n\nRelative deviation |loss_torch - loss_JAX| / loss_torch of the training minibatch "
             f"loss, max over seeds {list(agree_seeds)}: over the first {EARLY} steps, and over the 5 steps ending at "
             f"each checkpoint; 'first step > 1e-12' is where it first exceeds 1e-12.")
    rep.table(["optimizer", "lr", f"first {EARLY} steps"] + [f"steps {c - 4}-{c}" for c in CHECKPOINTS if c <= steps]
              + ["first step > 1e-12"], dev_rows)
    others = {k: v for k, v in early_dev.items() if k != "deva_sinf"}
    rep.check(f"torch and JAX give the same numbers for every optimizer but DeVA_Sinf (rel dev < 1e-10 over the first {EARLY} steps, float64)",
              all(v < 1e-10 for v in others.values()),
              ", ".join(f"{SPECS[k].title} {v:.0e}" for k, v in others.items()), source="cross-framework equivalence")
    if "deva_sinf" in early_dev:
        rep.check(f"DeVA_Sinf: torch and JAX agree to 1e-6 over the first {EARLY} steps", early_dev["deva_sinf"] < 1e-6,
                  f"max rel dev {early_dev['deva_sinf']:.1e}", strict=False, source="cross-framework equivalence")

    import matplotlib.pyplot as plt

    cols = 5
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(3.2 * cols, 2.6 * math.ceil(len(names) / cols)), squeeze=False)
    for ax, name in zip(axes.flat, names):
        curves = results[name]["curves"]
        n = min(len(c) for c in curves)
        c = np.array([a[:n] for a in curves])
        m, sd = c.mean(0), c.std(0)
        x = np.arange(1, n + 1)
        ax.plot(x, m)
        ax.fill_between(x, np.maximum(m - sd, 1e-6), m + sd, alpha=0.25)
        ax.set_yscale("log")
        ax.set_title(f"{SPECS[name].title} (lr {tuned[name]:g})", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"digits MLP: training minibatch loss at the validation-tuned lr, mean +- std over {len(evals)} evaluation seeds (torch)")
    fig.tight_layout()
    rep.savefig(fig, "real_data_digits", "Training loss of every optimizer at its validation-tuned lr (torch adapter), mean +- std over the evaluation seeds.")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = sorted(names, key=lambda k: -results[k]["test_acc"].mean())
    means = [100 * results[k]["test_acc"].mean() for k in order]
    ses = [D.mean_se(100 * results[k]["test_acc"])[1] for k in order]
    ax.barh([SPECS[k].title for k in order], means, xerr=ses, color="C0")
    ax.set_xlim(max(0.0, min(means) - 5), 100)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy % (mean +- s.e.)")
    ax.set_title("digits MLP, held out: test accuracy at the validation-tuned lr")
    rep.savefig(fig, "real_data_digits_test", "Test accuracy of every optimizer, mean +- standard error over the evaluation seeds.")
    return rep.finish()


if __name__ == "__main__":
    run_main(main)
