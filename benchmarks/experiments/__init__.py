"""Reproductions of the papers' experiments (issue 8).

Each module is a script: ``python -m benchmarks.experiments.<name> [--quick] [--out DIR]``. It writes
PNG figures and a Markdown summary under ``benchmarks/results/experiments/`` (or ``--out``), prints
the numbers behind every checked claim (PASS/FAIL, or REPORT for expectations that are our own
reconstruction) and exits non-zero if a strict claim fails.

Modules:
    bh_quadratics: Balles & Hennig section 2.2 / Fig. 2, SGD vs stochastic sign descent (spec 6.1).
    bh_factors: Balles & Hennig Fig. 5 and Lemma 1, the variance-adaptation factors (spec 6.2).
    deva_trace: DeVA Fig. 2, the 9x9 trace quadratic (spec 6.4).
    mvngrad_theory: MVN-Grad update-variance gap, spike robustness, low-variance regime (spec 6.5-6.7).
    real_data: digits MLP and a character-level transformer, torch and JAX side by side (issue 8.5).
"""

EXPERIMENTS = ("bh_quadratics", "bh_factors", "deva_trace", "mvngrad_theory", "real_data")
