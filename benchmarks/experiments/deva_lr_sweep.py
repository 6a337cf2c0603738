"""DeVA Fig. 4-style learning-rate sweep of vector vs matrix methods on a small network (digits MLP).

The paper sweeps the learning rate of ResNet-20 on CIFAR-10 (validation accuracy after 40 epochs): the
optimal learning rates cluster near 0.005 for the vector methods and near 0.01 for the matrix methods,
where DeVA_linf and SOAP peak. Stand-in: an MLP 64 -> 128 -> 128 -> 10 (tanh, float64) on digits with the
split of ``_digits``, 300 steps of batch 64, through ``xpoptim.adapters.torch``. Vector methods: Adam and
DeVA_linf on every parameter; matrix methods: Muon and DeVA_Sinf on the two hidden weight matrices, with
their fallback rules (AdamW / DeVA_linf at lr 3e-3) on biases and the output layer. Defaults of each rule
except weight decay 0. SOAP is not in this library and is not swept.

Every method sweeps the same grid on two sweep seeds (validation accuracy, as in the figure); the lr with
the best mean validation accuracy is then run on 8 fresh seeds and reported on the test set.

Run: ``python -m benchmarks.experiments deva_lr_sweep [--quick]``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from xpoptim.core import SPECS

from . import _digits as D
from ._common import Report, one_thread_per_framework, parse_args, run_main

#: Library modules whose functions compute this experiment's numbers (see ``_provenance``).
SOURCES = (
    "benchmarks/experiments/_digits.py",
    "src/xpoptim/core/_backend.py",
    "src/xpoptim/core/adam_family.py",
    "src/xpoptim/core/deva.py",
    "src/xpoptim/core/directions.py",
    "src/xpoptim/core/functional.py",
    "src/xpoptim/core/moments.py",
    "src/xpoptim/core/muon.py",
    "src/xpoptim/core/spec.py",
)

VECTOR = ("adam", "deva_linf")
MATRIX = ("muon", "deva_sinf")
WIDTHS = (64, 128, 128, 10)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    with one_thread_per_framework():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    steps = 10 if args.quick else 300
    grid = D.GRID[3:5] if args.quick else D.GRID
    sweep, evals = (D.TUNING_SEEDS[:1], D.EVAL_SEEDS[:2]) if args.quick else (D.TUNING_SEEDS[:2], D.EVAL_SEEDS)
    rep = Report("deva_lr_sweep", "DeVA Fig. 4-style lr sweep: vector vs matrix methods on a digits MLP", args.out, args.quick, SOURCES)
    rep.note(f"MLP {' -> '.join(map(str, WIDTHS))}, {steps} steps of batch 64, grid {', '.join(f'{g:g}' for g in grid)}; "
             f"sweep seeds {list(sweep)} (validation accuracy), evaluation seeds {list(evals)} (test accuracy, mean +- s.e.).")
    data = D.load()
    curves, best, test = {}, {}, {}
    rows = []
    for name in (*VECTOR, *MATRIX):
        accs = []
        for lr in grid:
            a = []
            for s in sweep:
                _, params, diverged = D.train(name, lr, s, data, steps, widths=WIDTHS)
                a.append(math.nan if diverged else 100 * D.evaluate(params, data["val"])[1])
            accs.append(float(np.mean(a)) if np.all(np.isfinite(a)) else math.nan)
        curves[name] = np.array(accs)
        i = int(np.nanargmax(curves[name]))
        best[name] = grid[i]
        r = D.evaluate_seeds(name, grid[i], data, steps, evals, widths=WIDTHS)
        test[name] = 100 * r["test_acc"]
        m, se = D.mean_se(test[name])
        kind = "vector" if name in VECTOR else "matrix"
        edge = " (top of grid)" if i == 0 else " (bottom of grid)" if i == len(grid) - 1 else ""
        rows.append([SPECS[name].title, kind, f"{grid[i]:g}{edge}", f"{curves[name][i]:.2f}", f"{m:.2f} +- {se:.2f}"])
        print(f"  {name}: best lr {grid[i]:g} val {curves[name][i]:.2f} test {m:.2f}", flush=True)
    rep.table(["method", "kind", "best lr (validation)", "validation accuracy % at it", "test accuracy %"], rows)
    rep.note("Validation accuracy (%) for every grid point (mean over sweep seeds; nan: a run diverged):")
    rep.table(["lr"] + [SPECS[n].title for n in (*VECTOR, *MATRIX)],
              [[f"{lr:g}"] + [f"{curves[n][i]:.2f}" for n in (*VECTOR, *MATRIX)] for i, lr in enumerate(grid)])

    src = "DeVA Fig. 4 caption (ResNet-20 / CIFAR-10); digits MLP stand-in"
    v_best = max(VECTOR, key=lambda n: np.nanmax(curves[n]))
    rep.check("the best vector method (peak validation accuracy) is DeVA_linf", v_best == "deva_linf",
              ", ".join(f"{SPECS[n].title} {np.nanmax(curves[n]):.2f}% at lr {best[n]:g}" for n in VECTOR), strict=False, source=src)
    lo_matrix, hi_vector = min(best[n] for n in MATRIX), max(best[n] for n in VECTOR)
    rep.check("the matrix methods' optimal learning rates are at least the vector methods'", lo_matrix >= hi_vector,
              "optimal lr: " + ", ".join(f"{SPECS[n].title} {best[n]:g}" for n in (*VECTOR, *MATRIX)), strict=False, source=src)
    d, se, verdict = D.compare(test["deva_sinf"], test["muon"])
    rep.check("DeVA_Sinf matches or beats Muon on test accuracy at their best lr (not worse by more than 2 s.e.)", verdict != "worse",
              f"DeVA_Sinf - Muon = {d:+.2f} +- {se:.2f} points ({verdict})", strict=False, source="DeVA abstract; digits MLP stand-in")
    d, se, verdict = D.compare(test["deva_linf"], test["adam"])
    rep.check("DeVA_linf matches or beats Adam on test accuracy at their best lr (not worse by more than 2 s.e.)", verdict != "worse",
              f"DeVA_linf - Adam = {d:+.2f} +- {se:.2f} points ({verdict})", strict=False, source="DeVA abstract; digits MLP stand-in")

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, group, title in ((axes[0], VECTOR, "vector methods"), (axes[1], MATRIX, "matrix methods")):
        for i, n in enumerate(group):
            ax.semilogx(grid, curves[n], "o-", color=f"C{i + (0 if group is VECTOR else 2)}", label=SPECS[n].title)
        ax.set_title(title)
        ax.set_xlabel("learning rate")
        ax.legend()
    axes[0].set_ylabel("validation accuracy % (mean over sweep seeds)")
    fig.suptitle("DeVA Fig. 4 stand-in: lr sweep on a digits MLP")
    fig.tight_layout()
    rep.savefig(fig, "deva_lr_sweep", "Validation accuracy against the learning rate, vector methods (left) and matrix methods (right).")
    return rep.finish()


if __name__ == "__main__":
    run_main(main)
