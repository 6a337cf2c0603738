"""Balles & Hennig, "Dissecting Adam", Fig. 5 and Lemma 1: the variance-adaptation factors.

* The three factors against the relative standard deviation ``eta``: SVAG's ``(1 + eta^2)^-1``
  (optimal for an unbiased direction, Eq. 14), Adam's implicit ``(1 + eta^2)^-1/2`` (Eq. 6) and the
  sign-optimal ``erf(1/(sqrt(2) eta))`` (Eq. 8/15/23), all from ``xpoptim.core.factors``. The
  erf-vs-Adam gap peaks at 0.0644 near eta = 1.91 (derived).
* ``kappa(0.9, t)`` anchors (Eq. 19) from ``xpoptim.core.factors.kappa``.
* Lemma 1 by Monte Carlo: for ``p_hat ~ N(p, sigma^2)``, the gamma minimising the empirical
  ``mean (gamma p_hat - p)^2`` is ``p^2/(p^2 + sigma^2)``; the gamma minimising
  ``mean (gamma sign(p_hat) - sign(p))^2`` is ``2 rho - 1 = erf(|p|/(sqrt(2) sigma))``.

Run: ``python -m benchmarks.experiments.bh_factors [--quick]``.
"""

from __future__ import annotations

import numpy as np

from xpoptim.core import factors

from ._common import Report, parse_args, run_main

#: Library modules whose functions compute this experiment's numbers (see ``_provenance``).
SOURCES = (
    "src/xpoptim/core/_backend.py",
    "src/xpoptim/core/factors.py",
    "src/xpoptim/core/moments.py",
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    rep = Report("bh_factors", "Dissecting Adam, Fig. 5 and Lemma 1: variance-adaptation factors", args.out, args.quick, SOURCES)
    n_eta = 2001 if args.quick else 200001
    eta = np.logspace(-2, 2, n_eta)
    one = np.ones_like(eta)
    s = eta**2  # variance of a unit-mean direction
    f_svag = factors.svag_factor(np, one, s)
    f_adam = factors.adam_factor(np, one, s)
    f_erf = factors.erf_factor(np, one, s)

    # Closed forms written here independently of the core (the check compares the two).
    rep.check("core factors equal their closed forms on the eta grid",
              max(np.max(np.abs(f_svag - 1 / (1 + eta**2))), np.max(np.abs(f_adam - 1 / np.sqrt(1 + eta**2)))) < 1e-14,
              f"max |svag - 1/(1+eta^2)| = {np.max(np.abs(f_svag - 1 / (1 + eta**2))):.1e}, "
              f"max |adam - (1+eta^2)^-1/2| = {np.max(np.abs(f_adam - 1 / np.sqrt(1 + eta**2))):.1e}", source="Eq. 6, 14")
    import math

    sub = eta[:: max(1, n_eta // 4000)]
    erf_ref = np.array([math.erf(1 / (math.sqrt(2) * e)) for e in sub])
    err = np.max(np.abs(factors.erf_factor(np, np.ones_like(sub), sub**2) - erf_ref))
    rep.check("core erf factor equals math.erf(1/(sqrt(2) eta))", err < 1e-14, f"max error {err:.1e}", source="Eq. 8, 23")

    gap = f_adam - f_erf
    i = int(np.argmax(np.abs(gap)))
    rep.check("largest |Adam - erf| gap is 0.0644 at eta = 1.91 (0.463 vs 0.399)",
              abs(abs(gap[i]) - 0.0644) < 5e-4 and abs(eta[i] - 1.91) < 0.02,
              f"max gap {gap[i]:.5f} at eta = {eta[i]:.4f} (Adam {f_adam[i]:.4f}, erf {f_erf[i]:.4f})", source="derived")
    big = eta > 50
    ratio = np.max(np.abs(f_erf[big] * eta[big] - np.sqrt(2 / np.pi)))
    rep.check("for large eta, erf ~ sqrt(2/pi)/eta = 0.798/eta vs Adam ~ 1/eta",
              ratio < 1e-3 and np.max(np.abs(f_adam[big] * eta[big] - 1)) < 1e-3,
              f"max |eta erf - 0.7979| = {ratio:.1e} for eta > 50", source="derived")
    anchors = {1: 1.0, 2: 0.5014, 5: 0.2044, 10: 0.1090, 50: 0.0532}
    got = {t: float(factors.kappa(0.9, t)) for t in anchors}
    lim = float(factors.kappa(0.9, 10**6))
    rep.check("kappa(0.9, t) anchors 1, 0.5014, 0.2044, 0.1090, 0.0532 -> 0.05263",
              all(abs(got[t] - v) < 6e-5 for t, v in anchors.items()) and abs(lim - 0.1 / 1.9) < 1e-12,
              ", ".join(f"t={t}: {got[t]:.4f}" for t in anchors) + f", t=1e6: {lim:.5f}", source="Eq. 19")

    # Lemma 1, Monte Carlo.
    rng = np.random.default_rng(0)
    n = 20_000 if args.quick else 2_000_000
    etas_mc = np.array([0.1, 0.3, 0.6, 1.0, 1.91, 3.0, 6.0, 20.0])
    rows, ok_u, ok_s = [], True, True
    mc_u, mc_s = [], []
    for e in etas_mc:
        p, sigma = 1.0, float(e)
        ph = p + sigma * rng.standard_normal(n)
        # argmin_gamma mean (gamma ph - p)^2 = p mean(ph) / mean(ph^2)
        gu = p * np.mean(ph) / np.mean(ph * ph)
        # argmin_gamma mean (gamma sign(ph) - sign(p))^2 = mean(sign(ph)) sign(p)
        sg = np.sign(ph)
        gs = float(np.mean(sg)) * np.sign(p)
        se_s = float(np.std(sg)) / np.sqrt(n)
        # delta-method standard error of the ratio estimate
        se_u = float(np.std(p * ph / np.mean(ph * ph) - gu * ph * ph / np.mean(ph * ph))) / np.sqrt(n)
        tu = float(factors.svag_factor(np, np.array(p), np.array(sigma**2)))
        ts = float(factors.erf_factor(np, np.array(p), np.array(sigma**2)))
        ok_u &= abs(gu - tu) <= 5 * se_u + 1e-12
        ok_s &= abs(gs - ts) <= 5 * se_s + 1e-12
        mc_u.append(gu)
        mc_s.append(gs)
        rows.append([e, gu, tu, se_u, gs, ts, se_s])
    rep.note(f"Lemma 1 Monte Carlo ({n} draws per eta, p = 1, sigma = eta): empirical-loss minimisers vs the core factors")
    rep.table(["eta", "MC gamma (unbiased dir.)", "SVAG factor", "s.e.", "MC gamma (sign dir.)", "erf factor", "s.e."], rows)
    rep.check("Lemma 1: the optimal gamma for an unbiased direction is the SVAG factor p^2/(p^2+sigma^2) (within 5 s.e.)",
              ok_u, "max |MC - SVAG| = " + f"{max(abs(r[1] - r[2]) for r in rows):.2e}", source="Lemma 1, Eq. 14")
    rep.check("Lemma 1: the optimal gamma for the sign direction is erf(|p|/(sqrt(2) sigma)) (within 5 s.e.)",
              ok_s, "max |MC - erf| = " + f"{max(abs(r[4] - r[5]) for r in rows):.2e}", source="Lemma 1, Eq. 15, 23")
    # The Monte Carlo optimum for sign directions must tell erf apart from Adam's factor near eta = 1.91.
    j = int(np.argmin(np.abs(etas_mc - 1.91)))
    adam_j = 1 / math.sqrt(1 + etas_mc[j] ** 2)
    rep.check("at eta = 1.91 the MC sign optimum sides with erf, not with Adam's (1+eta^2)^-1/2",
              abs(mc_s[j] - rows[j][5]) < abs(mc_s[j] - adam_j),
              f"MC {mc_s[j]:.4f}, erf {rows[j][5]:.4f}, Adam {adam_j:.4f}", source="Lemma 1")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].semilogx(eta, f_svag, label=r"SVAG $(1+\eta^2)^{-1}$")
    ax[0].semilogx(eta, f_adam, label=r"Adam $(1+\eta^2)^{-1/2}$")
    ax[0].semilogx(eta, f_erf, label=r"erf $(1/(\sqrt{2}\eta))$", ls="--")
    ax[0].semilogx(etas_mc, mc_u, "o", color="C0", label="MC optimum, unbiased direction")
    ax[0].semilogx(etas_mc, mc_s, "s", color="C2", mfc="none", label="MC optimum, sign direction")
    ax[0].set_xlabel(r"relative std $\eta$")
    ax[0].set_ylabel(r"factor $\gamma$")
    ax[0].legend(fontsize=8)
    ax[0].set_title("Fig. 5: variance-adaptation factors (xpoptim.core.factors)")
    ax[1].semilogx(eta, gap)
    ax[1].axvline(eta[i], color="k", lw=0.5)
    ax[1].set_xlabel(r"$\eta$")
    ax[1].set_title(f"Adam - erf: max {gap[i]:.4f} at eta = {eta[i]:.2f}")
    rep.savefig(fig, "bh_factors", "Left: the three factors vs eta with the Lemma 1 Monte Carlo optima; right: the Adam - erf gap.")
    return rep.finish()


if __name__ == "__main__":
    run_main(main)
