"""MVN-Grad on a small network (digits): batch sizes (Fig. 1), lr x beta2 robustness (Figs. 4-5), update-variance gap (Fig. 2).

Stand-ins on scikit-learn's digits with the held-out protocol of ``_digits`` (MLP 64 -> 64 -> 10, tanh,
float64, through ``xpoptim.adapters.torch``), comparing MVN-Grad with Adam, AdaBelief and LaProp
(beta1 0.9, beta2 0.999, each rule's default eps, no weight decay):

(a) Fig. 1 (MNIST training loss for different batch sizes): batch sizes 16, 64 and 256; for each optimizer
    and batch size the lr is chosen on validation (tuning seeds, full horizon, the same grid for all),
    then the final training loss on the whole training set and the test accuracy are measured on 8 fresh
    seeds (mean +- standard error).
(b) Figs. 4-5 (hyperparameter robustness across sweep runs, validation and training): every cell of an
    lr x beta2 grid is trained on two seeds; the spread of the validation and training losses over the
    grid measures robustness (median over cells, and the share of cells within 0.05 nats of the
    optimizer's best cell).
(c) Fig. 2 (conditional update-variance gap by Monte Carlo at frozen checkpoints, three seeds): an MLP
    trained by MVN-Grad through ``xpoptim.core.functional``; at each checkpoint 256 fresh minibatch
    gradients give both candidate steps from the same frozen state (momentum-then-normalize, i.e.
    AdaBelief's rule with MVN-Grad's proxy, and MVN-Grad's normalize-then-momentum; the kernels of
    ``mvngrad_theory``); gap = mean over parameters of Var(MtN) - Var(NtM).

Run: ``python -m benchmarks.experiments mvngrad_digits [--quick]``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from xpoptim.core import SPECS, functional, get_spec

from . import _digits as D
from ._common import Report, one_thread_per_framework, parse_args, run_main
from .mvngrad_theory import candidate_steps

#: Library modules whose functions compute this experiment's numbers (see ``_provenance``).
SOURCES = (
    "benchmarks/experiments/_digits.py",
    "benchmarks/experiments/mvngrad_theory.py",
    "src/xpoptim/core/_backend.py",
    "src/xpoptim/core/adam_family.py",
    "src/xpoptim/core/functional.py",
    "src/xpoptim/core/moments.py",
    "src/xpoptim/core/mvngrad.py",
    "src/xpoptim/core/spec.py",
)

OPTIMIZERS = ("adam", "adabelief", "laprop", "mvngrad")
OTHERS = ("adam", "adabelief", "laprop")


def part_a(rep: Report, data: dict, quick: bool) -> dict:
    sizes = (16, 64) if quick else (16, 64, 256)
    steps = 10 if quick else 300
    grid = D.GRID[3:5] if quick else D.GRID[3:8]
    tuning, evals = (D.TUNING_SEEDS[:1], D.EVAL_SEEDS[:2]) if quick else (D.TUNING_SEEDS[:2], D.EVAL_SEEDS)
    out, rows = {}, []
    for bs in sizes:
        for name in OPTIMIZERS:
            lr, _ = D.tune_lr(name, data, steps, grid, tuning, batch_size=bs)
            train_loss, acc, curves = [], [], []
            for s in evals:
                losses, params, _ = D.train(name, lr, s, data, steps, batch_size=bs)
                train_loss.append(D.evaluate(params, data["train"])[0])
                acc.append(100 * D.evaluate(params, data["test"])[1])
                curves.append(losses)
            out[(bs, name)] = {"lr": lr, "train": np.array(train_loss), "acc": np.array(acc), "curves": curves}
            tl, tl_se = D.mean_se(train_loss)
            a, a_se = D.mean_se(acc)
            edge = " (top of grid)" if lr == grid[0] else " (bottom of grid)" if lr == grid[-1] else ""
            rows.append([bs, SPECS[name].title, f"{lr:g}{edge}", f"{tl:.4f} +- {tl_se:.4f}", f"{a:.2f} +- {a_se:.2f}"])
            print(f"  (a) bs {bs} {name}: lr {lr:g} train {tl:.4f} acc {a:.2f}", flush=True)
    rep.note(f"### (a) Batch sizes (Fig. 1)\n\n{steps} steps; grid {', '.join(f'{g:g}' for g in grid)}; tuning seeds "
             f"{list(tuning)} (validation CE), evaluation seeds {list(evals)}. Final training loss on the whole training "
             "set and test accuracy, mean +- standard error.")
    rep.table(["batch size", "optimizer", "lr (validation)", "final training loss", "test accuracy %"], rows)
    for other in OTHERS:
        parts, ok = [], True
        for bs in sizes:
            d, se, verdict = D.compare(out[(bs, other)]["train"], out[(bs, "mvngrad")]["train"])  # positive: MVN-Grad lower
            ok &= verdict != "worse"
            parts.append(f"bs {bs}: {SPECS[other].title} - MVN-Grad = {d:+.4f} +- {se:.4f} ({'MVN-Grad lower' if verdict == 'better' else 'MVN-Grad higher' if verdict == 'worse' else 'tie'})")
        rep.check(f"(a) MVN-Grad's final training loss matches or beats {SPECS[other].title} at every batch size (not higher by more than 2 s.e.)",
                  ok, "; ".join(parts), strict=False, source="MVN-Grad Fig. 1 (MNIST, batch sizes); digits stand-in")
    return {"sizes": sizes, "res": out}


def part_b(rep: Report, data: dict, quick: bool) -> dict:
    lrs = (0.03, 0.003) if quick else (0.1, 0.03, 0.01, 3e-3, 1e-3)
    beta2s = (0.9, 0.999) if quick else (0.9, 0.99, 0.999, 0.9999)
    steps = 10 if quick else 300
    seeds = D.TUNING_SEEDS[:1] if quick else D.TUNING_SEEDS[:2]
    val = {n: np.zeros((len(lrs), len(beta2s))) for n in OPTIMIZERS}
    trn = {n: np.zeros((len(lrs), len(beta2s))) for n in OPTIMIZERS}
    for name in OPTIMIZERS:
        for i, lr in enumerate(lrs):
            for j, b2 in enumerate(beta2s):
                v, tr = [], []
                for s in seeds:
                    _, params, diverged = D.train(name, lr, s, data, steps, hp={"beta2": b2})
                    v.append(math.inf if diverged else D.evaluate(params, data["val"])[0])
                    tr.append(math.inf if diverged else D.evaluate(params, data["train"])[0])
                val[name][i, j], trn[name][i, j] = np.mean(v), np.mean(tr)
        print(f"  (b) {name}: median val {np.median(val[name]):.4f}", flush=True)
    rows = []
    for name in OPTIMIZERS:
        for what, grid in (("validation", val[name]), ("training", trn[name])):
            near = float(np.mean(grid <= grid.min() + 0.05))
            rows.append([SPECS[name].title, what, float(grid.min()), float(np.median(grid)), float(np.quantile(grid, 0.75)),
                         f"{100 * near:.0f}%"])
    rep.note(f"### (b) lr x beta2 robustness (Figs. 4-5)\n\nlr in {list(lrs)}, beta2 in {list(beta2s)}, batch 64, {steps} "
             f"steps, mean over seeds {list(seeds)}; cross-entropy after the run, over the {len(lrs) * len(beta2s)} cells.")
    rep.table(["optimizer", "loss", "best cell", "median cell", "75 % quantile", "cells within 0.05 of best"], rows)
    for other in OTHERS:
        mv, ot = float(np.median(val["mvngrad"])), float(np.median(val[other]))
        rep.check(f"(b) MVN-Grad is at least as robust as {SPECS[other].title} over the lr x beta2 grid (median validation loss over the cells not higher)",
                  mv <= ot, f"median validation CE: MVN-Grad {mv:.4f}, {SPECS[other].title} {ot:.4f}", strict=False,
                  source="MVN-Grad Figs. 4-5; digits stand-in")
    return {"lrs": lrs, "beta2s": beta2s, "val": val, "train": trn}


def part_c(rep: Report, data: dict, quick: bool) -> None:
    import torch

    checkpoints = (3, 8) if quick else (10, 50, 200, 500)
    k_draws, batch = (32, 16) if quick else (256, 32)
    x, y = (torch.as_tensor(a) for a in data["train"])
    spec = get_spec("mvngrad")
    eps = 1e-8
    hp = spec.validate(lr=1e-2, beta1=0.9, beta2=0.999, eps=eps, eps_s=eps)
    init = D.init_mlp(0)
    keys, shapes = list(init), [init[k].shape for k in init]
    sizes = [int(np.prod(s)) for s in shapes]

    def unflat(w: torch.Tensor) -> dict:
        return {k: t.reshape(s) for k, t, s in zip(keys, torch.split(w, sizes), shapes)}

    def loss(w: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return D.cross_entropy(unflat(w), xb, yb)

    grad = torch.func.grad(loss)
    rows, gaps = [], []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        w = np.concatenate([v.ravel() for v in D.init_mlp(seed).values()])
        state = functional.init(spec, w, hp)
        for t in range(1, max(checkpoints) + 1):
            if t in checkpoints:  # frozen theta and (m, v, u) after t - 1 steps: candidates for step t
                wt = torch.as_tensor(w)
                idx = torch.as_tensor(np.stack([rng.choice(len(x), batch, replace=False) for _ in range(k_draws)]))
                gs = torch.func.vmap(grad, in_dims=(None, 0, 0))(wt, x[idx], y[idx]).numpy()
                st = {k: np.broadcast_to(v, gs.shape) for k, v in state.items()}
                d_mtn, d_ntm = candidate_steps(gs, st["exp_avg"], st["exp_avg_var"], st["momentum"], t, eps)
                var_mtn = np.var(d_mtn, 0, ddof=1)
                gap = float(np.mean(var_mtn - np.var(d_ntm, 0, ddof=1)))
                gaps.append(gap)
                rows.append([seed, t, gap, gap / float(np.mean(var_mtn))])
            b = rng.choice(len(x), batch, replace=False)
            g = grad(torch.as_tensor(w), x[b], y[b]).numpy()
            w, state = functional.step(spec, w, g, state, hp, t)
    rep.note(f"### (c) Update-variance gap at frozen checkpoints (Fig. 2)\n\nMLP trained by MVN-Grad (lr 1e-2, batch {batch}); "
             f"{k_draws} fresh minibatch gradients per checkpoint; gap = mean over parameters of Var(MtN) - Var(NtM); "
             "rel = gap / mean Var(MtN).")
    rep.table(["seed", "checkpoint t", "gap", "rel"], rows)
    by_t = {t: np.mean([r[2] for r in rows if r[1] == t]) for t in checkpoints}
    rep.check("(c) the conditional update-variance gap Var(MtN) - Var(NtM) is positive at every checkpoint and seed",
              min(gaps) > 0, "mean over seeds: " + ", ".join(f"t={t}: {g:.3g}" for t, g in by_t.items())
              + f"; smallest {min(gaps):.3g}", strict=False, source="MVN-Grad Fig. 2 / Thm 3.1; MLP on digits")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    with one_thread_per_framework():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    rep = Report("mvngrad_digits", "MVN-Grad on digits: batch sizes, lr x beta2 robustness, update-variance gap", args.out, args.quick, SOURCES)
    data = D.load()
    rep.note(f"MLP 64 -> 64 -> 10 (tanh, float64); split {D.SPLIT[0]} / {D.SPLIT[1]} / {D.SPLIT[2]}; torch adapter; "
             "beta1 0.9, beta2 0.999 unless swept; no weight decay.")
    a = part_a(rep, data, args.quick)
    b = part_b(rep, data, args.quick)
    part_c(rep, data, args.quick)

    import matplotlib.pyplot as plt

    sizes = a["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, bs in zip(axes[0], sizes):
        for i, name in enumerate(OPTIMIZERS):
            r = a["res"][(bs, name)]
            n = min(len(c) for c in r["curves"])
            c = np.array([x[:n] for x in r["curves"]])
            k = max(1, n // 30)
            sm = c[:, : n - n % k].reshape(len(c), -1, k).mean(-1)
            xs = (np.arange(sm.shape[1]) + 1) * k
            ax.plot(xs, sm.mean(0), color=f"C{i}", label=f"{SPECS[name].title} (lr {r['lr']:g})")
            ax.fill_between(xs, np.maximum(sm.mean(0) - sm.std(0), 1e-6), sm.mean(0) + sm.std(0), color=f"C{i}", alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(f"batch size {bs}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("training minibatch loss (window mean)")
    fig.suptitle("MVN-Grad Fig. 1 stand-in: training loss across batch sizes (mean +- std over evaluation seeds)")
    fig.tight_layout()
    rep.savefig(fig, "mvngrad_digits_batch", "Training loss for batch sizes 16 / 64 / 256 at the validation-tuned lr of each optimizer.")

    fig, axes = plt.subplots(2, len(OPTIMIZERS), figsize=(3.6 * len(OPTIMIZERS), 6.5), squeeze=False)
    allv = np.concatenate([np.ravel(b[w][n]) for n in OPTIMIZERS for w in ("val", "train")])
    finite = allv[np.isfinite(allv)]
    vmin, vmax = float(finite.min()), float(np.quantile(finite, 0.9))
    for j, name in enumerate(OPTIMIZERS):
        for i, (what, lab) in enumerate((("val", "validation"), ("train", "training"))):
            ax = axes[i, j]
            im = ax.imshow(np.where(np.isfinite(b[what][name]), b[what][name], vmax), vmin=vmin, vmax=vmax, cmap="viridis_r")
            ax.set_xticks(range(len(b["beta2s"])), [f"{v:g}" for v in b["beta2s"]], fontsize=7)
            ax.set_yticks(range(len(b["lrs"])), [f"{v:g}" for v in b["lrs"]], fontsize=7)
            ax.set_title(f"{SPECS[name].title}: {lab}", fontsize=9)
            if j == 0:
                ax.set_ylabel("lr")
            if i == 1:
                ax.set_xlabel("beta2")
    fig.colorbar(im, ax=axes, shrink=0.7, label="cross-entropy after the run")
    fig.suptitle("MVN-Grad Figs. 4-5 stand-in: lr x beta2 sweep (validation top, training bottom)")
    rep.savefig(fig, "mvngrad_digits_grid", "Validation (top) and training (bottom) cross-entropy over the lr x beta2 grid.")
    return rep.finish()


if __name__ == "__main__":
    run_main(main)
