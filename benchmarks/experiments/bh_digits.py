"""Dissecting Adam, section 4 (Fig. 3, MNIST) and Appendix D on a digits stand-in: the four recombinations of sign and variance adaptation.

M-SGD (``sgd``, momentum 0.9), M-SSD (``mssd``, mu 0.9), M-SVAG (``msvag``, mu 0.9), ADAM (0.9, 0.999,
1e-8) and, from Appendix D, ADAM* (``adam_star``: Adam with the kappa correction), M-SVAG-mb and
ADAM*-mb (variance of the batch mean from per-example gradients, Eq. 44), each through
``xpoptim.adapters.torch``, on the held-out protocol of ``_digits``: an MLP 64 -> 128 -> 64 -> 10 (tanh;
the paper's MNIST net has three ReLU layers of 1000/500/100 and L2 regularisation, here none), batch 128
as in the paper, a constant learning rate, the same grid for every method, the lr chosen on
validation cross-entropy over the tuning seeds and the full horizon, test accuracy and cross-entropy
over 8 fresh seeds (mean +- standard error).

The paper's MNIST findings, checked (REPORT: a digits MLP stands in for MNIST): ADAM clearly outperforms
M-SGD; M-SSD and ADAM differ very little; M-SVAG improves considerably on M-SGD but is outperformed by
both sign-based methods. Appendix D (on CIFAR there): ADAM* performs like ADAM and M-SVAG-mb like M-SVAG.
"Outperforms" means a test-accuracy difference beyond 2 standard errors; "differ very little" and "like"
mean within 2 standard errors.

Run: ``python -m benchmarks.experiments bh_digits [--quick]``.
"""

from __future__ import annotations

import argparse
import numpy as np


from . import _digits as D
from ._common import Report, one_thread_per_framework, parse_args, run_main

#: Library modules whose functions compute this experiment's numbers (see ``_provenance``).
SOURCES = (
    "benchmarks/experiments/_digits.py",
    "src/xpoptim/core/_backend.py",
    "src/xpoptim/core/adam_family.py",
    "src/xpoptim/core/balles_hennig.py",
    "src/xpoptim/core/directions.py",
    "src/xpoptim/core/factors.py",
    "src/xpoptim/core/moments.py",
    "src/xpoptim/core/spec.py",
)

METHODS = {
    "sgd": "M-SGD",
    "mssd": "M-SSD",
    "msvag": "M-SVAG",
    "adam": "ADAM",
    "adam_star": "ADAM*",
    "msvag_mb": "M-SVAG-mb",
    "adam_star_mb": "ADAM*-mb",
}
WIDTHS = (64, 128, 64, 10)
BATCH = 128


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    with one_thread_per_framework():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    steps = 10 if args.quick else 300
    grid = D.GRID[3:5] if args.quick else D.GRID
    tuning, evals = (D.TUNING_SEEDS[:1], D.EVAL_SEEDS[:2]) if args.quick else (D.TUNING_SEEDS[:2], D.EVAL_SEEDS)
    rep = Report("bh_digits", "Dissecting Adam section 4 / Appendix D on digits: M-SGD, M-SSD, M-SVAG, ADAM, ADAM*", args.out, args.quick, SOURCES)
    rep.note(
        f"MLP {' -> '.join(map(str, WIDTHS))} (tanh, float64), batch {BATCH}, {steps} steps, constant lr, no weight decay. "
        f"Split {D.SPLIT[0]} / {D.SPLIT[1]} / {D.SPLIT[2]}. Grid (every method): {', '.join(f'{g:g}' for g in grid)}; "
        f"lr chosen on mean validation cross-entropy over tuning seeds {list(tuning)}; reported on test over evaluation "
        f"seeds {list(evals)}, mean +- standard error."
    )
    kw = {"widths": WIDTHS, "batch_size": BATCH}
    data = D.load()
    res, rows, lrs = {}, [], {}
    for name, label in METHODS.items():
        lr, scores = D.tune_lr(name, data, steps, grid, tuning, **kw)
        r = D.evaluate_seeds(name, lr, data, steps, evals, **kw)
        res[name], lrs[name] = r, lr
        acc, acc_se = D.mean_se(100 * r["test_acc"])
        ce, ce_se = D.mean_se(r["test_loss"])
        edge = " (top of grid)" if lr == grid[0] else " (bottom of grid)" if lr == grid[-1] else ""
        rows.append([label, f"{lr:g}{edge}", f"{scores[lr]:.4f}", f"{acc:.2f} +- {acc_se:.2f}", f"{ce:.4f} +- {ce_se:.4f}", r["diverged"]])
        print(f"  {label}: lr {lr:g} test acc {acc:.2f} +- {acc_se:.2f}", flush=True)
    rep.table(["method", "lr (validation)", "validation CE", "test accuracy %", "test CE", "diverged eval runs"], rows)

    def cmp(a: str, b: str) -> tuple:
        return D.compare(100 * res[a]["test_acc"], 100 * res[b]["test_acc"])

    def show(a: str, b: str) -> str:
        d, se, v = cmp(a, b)
        return f"{METHODS[a]} - {METHODS[b]} = {d:+.2f} +- {se:.2f} points ({v})"

    src = "Balles & Hennig section 4.2 (MNIST); digits stand-in"
    rep.check("ADAM clearly outperforms M-SGD", cmp("adam", "sgd")[2] == "better", show("adam", "sgd"), strict=False, source=src)
    rep.check("M-SSD and ADAM differ very little (within 2 s.e.)", cmp("mssd", "adam")[2] == "tie", show("mssd", "adam"), strict=False, source=src)
    rep.check("M-SVAG outperforms M-SGD", cmp("msvag", "sgd")[2] == "better", show("msvag", "sgd"), strict=False, source=src)
    rep.check("M-SVAG is outperformed by both sign-based methods (M-SSD, ADAM)",
              cmp("msvag", "mssd")[2] == "worse" and cmp("msvag", "adam")[2] == "worse",
              show("msvag", "mssd") + "; " + show("msvag", "adam"), strict=False, source=src)
    src_d = "Balles & Hennig Appendix D (CIFAR there); digits stand-in"
    rep.check("ADAM* performs like ADAM (within 2 s.e.)", cmp("adam_star", "adam")[2] == "tie", show("adam_star", "adam"), strict=False, source=src_d)
    rep.check("M-SVAG-mb performs like M-SVAG (within 2 s.e.)", cmp("msvag_mb", "msvag")[2] == "tie", show("msvag_mb", "msvag"), strict=False, source=src_d)

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, label) in enumerate(METHODS.items()):
        curves = res[name]["curves"]
        n = min(len(c) for c in curves)
        c = np.array([a[:n] for a in curves])
        k = max(1, n // 50)  # smooth the minibatch loss over windows of k steps
        sm = c[:, : n - n % k].reshape(len(c), -1, k).mean(-1)
        x = (np.arange(sm.shape[1]) + 1) * k
        m, sd = sm.mean(0), sm.std(0)
        ls = "--" if name in ("adam_star", "msvag_mb", "adam_star_mb") else "-"
        axes[0].plot(x, m, ls, color=f"C{i}", label=f"{label} (lr {lrs[name]:g})")
        axes[0].fill_between(x, np.maximum(m - sd, 1e-6), m + sd, color=f"C{i}", alpha=0.15)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"training minibatch loss (mean of {k}-step windows)")
    axes[0].legend(fontsize=7)
    names = list(METHODS)
    means = [100 * res[n]["test_acc"].mean() for n in names]
    ses = [D.mean_se(100 * res[n]["test_acc"])[1] for n in names]
    axes[1].barh([METHODS[n] for n in names], means, xerr=ses, color=[f"C{i}" for i in range(len(names))])
    axes[1].set_xlim(max(0.0, min(means) - 3), 100)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("test accuracy % (mean +- s.e.)")
    fig.suptitle(f"Dissecting Adam Fig. 3 (MNIST) stand-in on digits: {len(evals)} evaluation seeds, lr tuned on validation")
    fig.tight_layout()
    rep.savefig(fig, "bh_digits", "Left: training loss (mean +- std over the evaluation seeds); right: test accuracy (mean +- s.e.).")
    return rep.finish()


if __name__ == "__main__":
    run_main(main)
