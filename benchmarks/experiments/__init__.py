"""Reproductions of the papers' experiments.

Each module is a script: ``python -m benchmarks.experiments <name> [--quick] [--out DIR]``. It writes
PNG figures and a Markdown summary under ``benchmarks/results/experiments/`` (or ``--out``), prints
the numbers behind every checked claim (PASS/FAIL, or REPORT for expectations that are our own
reconstruction) and exits non-zero if a strict claim fails.

Modules:
    bh_quadratics: Balles & Hennig section 2.2 / Fig. 2, SGD vs stochastic sign descent.
    bh_factors: Balles & Hennig Fig. 5 and Lemma 1, the variance-adaptation factors.
    deva_trace: DeVA Fig. 2, the 9x9 trace quadratic.
    mvngrad_theory: MVN-Grad update-variance gap, spike robustness, low-variance regime.
    real_data: every optimizer on a digits MLP, held-out protocol, torch and JAX side by side.
    bh_digits: Balles & Hennig section 4 / Appendix D on digits (M-SGD, M-SSD, M-SVAG, ADAM, ADAM*, -mb).
    mvngrad_digits: MVN-Grad Fig. 1 (batch sizes), Figs. 4-5 (lr x beta2 robustness), Fig. 2 (gap on an MLP).
    deva_lr_sweep: DeVA Fig. 4-style learning-rate sweep of vector vs matrix methods on a digits MLP.
    charlm: a 1000-step character-level transformer on generated text, held-out loss.

Every result records the SHA-256 of the sources it was computed from (``_provenance``):
``python -m benchmarks.experiments --check`` lists the stale ones, ``--stale`` regenerates them.
"""

EXPERIMENTS = ("bh_quadratics", "bh_factors", "deva_trace", "mvngrad_theory", "real_data", "bh_digits", "mvngrad_digits", "deva_lr_sweep", "charlm")
