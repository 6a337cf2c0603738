"""MVN-Grad (Patitucci & Mokhtari, arXiv 2602.10204): the three mechanisms the paper claims .

Provenance: the paper's algorithm box and the exact theorem statements could not be read; the rule is
the form implemented in ``xpoptim.core.mvngrad`` and the protocols below are our reconstructions. Only the
exact identities derived for that form (checked) are strict checks; the rest is reported.

(a) One-step conditional update-variance gap (Fig. 2 / Theorem 3.1). Both candidate steps share the
    variance proxy ``v_t``: momentum-then-normalize (AdaBelief's rule with the same proxy) and MVN-Grad
    (normalize-then-momentum), computed by ``xpoptim.core``'s AdaBelief and MVNGrad direction kernels from
    the same frozen state. On a Gaussian oracle with ``m_{t-1} = mu`` the gap is
    ``beta1 (2 - beta1) mu^2 Var(w)/bc1^2``, ``w = 1/(sqrt(v_hat) + eps)`` (checked against Gauss-Hermite
    quadrature and Monte Carlo); on frozen checkpoints of a softmax regression on scikit-learn's digits
    (three seeds, K = 256 fresh minibatch gradients) it is estimated by Monte Carlo.
(b) Delayed single-spike robustness (Fig. 3 / Theorem 3.2): peak ``max_tau |Delta_tau|`` after a spike
    ``M`` injected at step t0 = 1000 of a stationary stream ``g = 1 + 0.1 xi``, lr = 1, shared
    hyperparameters, for Adam, AdaBelief, LaProp and MVN-Grad.
(c) The low-variance regime: with small homoscedastic noise Adam's step collapses to ``sign(mu)`` while
    MVN-Grad's is ``mu / (0.923 sigma)`` (gradient magnitudes kept); and a rotated stochastic quadratic
    where both run with a tuned learning rate.

Run: ``python -m benchmarks.experiments.mvngrad_theory [--quick]``.
"""

from __future__ import annotations

import math

import numpy as np

from xpoptim.core import functional, get_spec, make_direction_kernel

from ._common import Report, parse_args, run_main

#: Library modules whose functions compute this experiment's numbers (see ``_provenance``).
SOURCES = (
    "src/xpoptim/core/_backend.py",
    "src/xpoptim/core/adam_family.py",
    "src/xpoptim/core/functional.py",
    "src/xpoptim/core/moments.py",
    "src/xpoptim/core/mvngrad.py",
    "src/xpoptim/core/spec.py",
)

B1, B2 = 0.9, 0.999


def _kernels(eps: float) -> tuple:
    """MtN (AdaBelief rule) and NtM (MVN-Grad rule) direction kernels sharing the proxy v."""
    ab, mv = get_spec("adabelief"), get_spec("mvngrad")
    hp_ab = ab.validate(beta1=B1, beta2=B2, eps=eps)
    hp_mv = mv.validate(beta1=B1, beta2=B2, eps=eps, eps_s=eps)  # AdaBelief adds eps into its state
    return (ab, hp_ab, make_direction_kernel(ab, np, ab.static(hp_ab))), (mv, hp_mv, make_direction_kernel(mv, np, mv.static(hp_mv)))


def candidate_steps(g: np.ndarray, m: np.ndarray, v: np.ndarray, u: np.ndarray, t: int, eps: float) -> tuple:
    """(MtN, NtM) directions for gradients ``g`` from the frozen state (m_{t-1}, v_{t-1}, u_{t-1})."""
    (ab, hp_ab, k_ab), (mv, hp_mv, k_mv) = _kernels(eps)
    d_mtn = k_ab(g, m, v, *ab.scalars(hp_ab, t))[0]
    d_ntm = k_mv(g, m, v, u, *mv.scalars(hp_mv, t))[0]
    return d_mtn, d_ntm


def part_a_oracle(rep: Report, quick: bool) -> None:
    eps = 1e-16
    t = 8
    bc1, bc2 = 1 - B1**t, 1 - B2**t
    mu = np.array([1.0, -0.3, 0.05, 2.0, 0.0])
    sigma = np.array([0.5, 1.0, 0.2, 3.0, 1.0])
    v_prev = np.array([0.1, 0.5, 0.02, 4.0, 0.3]) * bc2
    u_prev = np.array([0.3, -1.0, 0.0, 2.0, 0.1])
    # Gauss-Hermite (probabilists') quadrature of the exact conditional variances
    x, wq = np.polynomial.hermite_e.hermegauss(150)
    wq = wq / wq.sum()
    xi = x[:, None]
    g = mu + sigma * xi
    d_mtn, d_ntm = candidate_steps(g, np.broadcast_to(mu, g.shape), np.broadcast_to(v_prev, g.shape), np.broadcast_to(u_prev, g.shape), t, eps)

    def qvar(y: np.ndarray) -> np.ndarray:
        m1 = np.sum(wq[:, None] * y, 0)
        return np.sum(wq[:, None] * (y - m1) ** 2, 0)

    gap_q = qvar(d_mtn) - qvar(d_ntm)
    w = 1 / (np.sqrt((B2 * v_prev + (1 - B2) * (B1 * sigma * xi) ** 2 + eps) / bc2) + eps)
    closed = B1 * (2 - B1) * mu**2 * qvar(w) / bc1**2
    nz = mu != 0
    err = float(np.max(np.abs(gap_q - closed)[nz] / np.abs(closed[nz])))
    tol = 1e-9 * np.where(nz, np.abs(closed), np.max(np.abs(closed)))
    rep.check("(a) Gaussian oracle: Var(MtN) - Var(NtM) = beta1 (2 - beta1) mu^2 Var(w) / bc1^2 (quadrature, 9 digits)",
              bool(np.all(np.abs(gap_q - closed) <= tol)),
              f"max relative error (mu != 0) {err:.1e}, |gap| at mu = 0: {abs(gap_q[~nz][0]):.1e}; gaps {np.array2string(gap_q, precision=4)} (0 for mu = 0)", source="derived identity (update-variance gap)")
    # Monte Carlo
    n = 40_000 if quick else 1_000_000
    rng = np.random.default_rng(0)
    g = mu + sigma * rng.standard_normal((n, mu.size))
    d_mtn, d_ntm = candidate_steps(g, np.broadcast_to(mu, g.shape), np.broadcast_to(v_prev, g.shape), np.broadcast_to(u_prev, g.shape), t, eps)
    parts = np.array_split(np.arange(n), 20)
    est = np.array([np.var(d_mtn[p], 0) - np.var(d_ntm[p], 0) for p in parts])
    gap_mc, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(len(parts))
    rows = [[float(mu[i]), float(sigma[i]), float(closed[i]), float(gap_mc[i]), float(se[i])] for i in range(mu.size)]
    rep.note(f"(a) Gaussian oracle at t = {t}, m_(t-1) = mu: closed form vs Monte Carlo ({n} draws)")
    rep.table(["mu", "sigma", "closed form", "Monte Carlo", "s.e."], rows)
    rep.check("(a) Gaussian oracle: Monte Carlo gap agrees with the closed form (within 5 s.e.)",
              bool(np.all(np.abs(gap_mc - closed) <= 5 * se + 1e-12)),
              "max |MC - closed| / s.e. = " + f"{float(np.max(np.abs(gap_mc - closed) / np.maximum(se, 1e-300))):.2f}",
              source="derived identity (update-variance gap)")


def _digits() -> tuple:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = np.concatenate([x / 16.0, np.ones((len(x), 1))], axis=1)
    return x, y


def _softmax_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = x @ w
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    return x.T @ p / len(y)


def part_a_digits(rep: Report, quick: bool) -> None:
    x, y = _digits()
    checkpoints = (5, 20) if quick else (10, 50, 200, 500)
    k_draws, batch = (64, 32) if quick else (256, 32)
    spec = get_spec("mvngrad")
    hp = spec.validate(lr=1e-2, beta1=B1, beta2=B2, eps=1e-8, eps_s=1e-8)
    rows, gaps = [], []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        w = 0.01 * rng.standard_normal((x.shape[1], 10))
        state = functional.init(spec, w, hp)
        for t in range(1, max(checkpoints) + 1):
            if t in checkpoints:  # frozen theta and (m, v, u) after t - 1 steps: candidates for step t
                gs = np.stack([_softmax_grad(w, x[b], y[b]) for b in (rng.choice(len(x), batch, replace=False) for _ in range(k_draws))])
                st = {k: np.broadcast_to(vv, gs.shape) for k, vv in state.items()}
                d_mtn, d_ntm = candidate_steps(gs, st["exp_avg"], st["exp_avg_var"], st["momentum"], t, 1e-8)
                gap = float(np.mean(np.var(d_mtn, 0, ddof=1) - np.var(d_ntm, 0, ddof=1)))
                rel = gap / float(np.mean(np.var(d_mtn, 0, ddof=1)))
                gaps.append(gap)
                rows.append([seed, t, gap, rel])
            b = rng.choice(len(x), batch, replace=False)
            w, state = functional.step(spec, w, _softmax_grad(w, x[b], y[b]), state, hp, t)
    rep.note(
        "(a) digits softmax regression (650 parameters) trained by MVN-Grad (lr 1e-2, batch 32); at each frozen "
        f"checkpoint {k_draws} fresh minibatch gradients give both candidate steps from the same state. "
        "gap = mean over coordinates of Var(MtN) - Var(NtM); rel = gap / mean Var(MtN)."
    )
    rep.table(["seed", "checkpoint t", "gap", "rel"], rows)
    by_t = {t: np.mean([r[2] for r in rows if r[1] == t]) for t in checkpoints}
    rep.check("(a) digits checkpoints: the conditional update-variance gap is positive (every seed and checkpoint)",
              min(gaps) > 0, "mean over seeds: " + ", ".join(f"t={t}: {g:.3g}" for t, g in by_t.items()),
              strict=False, source="MVN-Grad Fig. 2 caption; protocol ours")


def spike_run(spec_name: str, ms: np.ndarray, t0: int, horizon: int, eps: float = 1e-8, seed: int = 0) -> tuple:
    """Steps Delta (lr = 1) of one optimizer on g = 1 + 0.1 xi with a spike M at step t0 (one column per M)."""
    spec = get_spec(spec_name)
    extra = {"eps_s": 0.0} if spec_name == "mvngrad" else {}
    hp = spec.validate(lr=1.0, beta1=B1, beta2=B2, eps=eps, **extra)
    rng = np.random.default_rng(seed)
    theta = np.zeros(ms.size)
    state = functional.init(spec, theta, hp)
    deltas, u_prev = [], None
    for t in range(1, t0 + horizon + 1):
        g = 1.0 + 0.1 * rng.standard_normal() + np.where(t == t0, ms, 0.0)
        if t == t0:
            u_prev = state["exp_avg" if spec_name == "laprop" else "momentum"].copy() if spec_name in ("laprop", "mvngrad") else None
        new, state = functional.step(spec, theta, g, state, hp, t)
        if t >= t0:
            deltas.append(theta - new)
        theta = new
    return np.array(deltas), u_prev


def part_b(rep: Report, quick: bool) -> None:
    t0, horizon = (1000, 100) if quick else (1000, 500)
    ms = np.concatenate([[0.0], 10.0 ** np.arange(0, 7)])
    bc1, bc2 = 1 - B1**t0, 1 - B2**t0
    rows, peaks, ok_lim, lim_txt = [], {}, True, []
    table = {"adam": (1.08, 2.51), "adabelief": (10.7, 2.79), "laprop": (1.08, 3.40), "mvngrad": (10.7, 11.4)}
    for name in ("adam", "adabelief", "laprop", "mvngrad"):
        d, u_prev = spike_run(name, ms, t0, horizon)
        peak = np.max(np.abs(d), axis=0)
        peaks[name] = peak
        s = 1 / math.sqrt(1 - B2)
        if name == "adam":
            lim = (1 - B1) * s * math.sqrt(bc2) / bc1
        elif name == "adabelief":
            lim = (1 - B1) * s / B1 * math.sqrt(bc2) / bc1
        elif name == "laprop":
            lim = (B1 * float(u_prev[-1]) + (1 - B1) * s * math.sqrt(bc2)) / bc1
        else:
            lim = (B1 * float(u_prev[-1]) + (1 - B1) * s / B1 * math.sqrt(bc2)) / bc1
        at_spike = float(abs(d[0, -1]))
        ok_lim &= abs(at_spike - lim) <= 0.01 * lim
        lim_txt.append(f"{name} {at_spike:.4f} vs {lim:.4f}")
        rows.append([name, float(peak[0]), table[name][0], float(peak[-1]), table[name][1], float(peak[-1] / peak[-3])])
    rep.note(f"(b) single spike at t0 = {t0}, mu = 1, sigma = 0.1, beta = ({B1}, {B2}), eps = 1e-8, lr = 1, horizon {horizon}: "
             "peak |Delta| for M = 0 and M = 1e6, with the values of our reference simulation, and the plateau ratio peak(1e6)/peak(1e4)")
    rep.table(["method", "peak M=0", "spec M=0", "peak M=1e6", "spec M=1e6", "peak(1e6)/peak(1e4)"], rows)
    rep.check("(b) the step at a huge spike (M = 1e6) equals the derived M -> inf limit (within 1 %)", ok_lim,
              "; ".join(lim_txt), source="derived limit (M -> inf)")
    close = all(abs(r[1] - r[2]) <= 0.1 * r[2] and abs(r[3] - r[4]) <= 0.1 * r[4] for r in rows)
    rep.check("(b) peaks agree with our reference simulation table within 10 %", close,
              "; ".join(f"{r[0]} {r[1]:.3g}/{r[3]:.3g}" for r in rows), strict=False, source="MVN-Grad Fig. 3; protocol ours")
    bounded = all(abs(r[5] - 1) < 0.05 for r in rows)
    rep.check("(b) every method's peak is bounded in M (plateau: peak(1e6)/peak(1e4) within 5 % of 1)", bounded,
              ", ".join(f"{r[0]} {r[5]:.3f}" for r in rows), strict=False, source="MVN-Grad Thm 3.2 (exact form not available)")
    base = peaks["mvngrad"][0]
    inc = float(np.max(peaks["mvngrad"] - base))
    bound = (1 - B1) / (B1 * math.sqrt(1 - B2)) * math.sqrt(bc2) / bc1
    rep.check("(b) MVN-Grad's spike increment is bounded by (1-b1)/(b1 sqrt(1-b2)) sqrt(bc2)/bc1", inc <= bound * 1.01,
              f"max increment over M {inc:.3f} vs bound {bound:.3f}", strict=False, source="derived bound")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, lab in (("adam", "Adam"), ("adabelief", "AdaBelief"), ("laprop", "LaProp"), ("mvngrad", "MVN-Grad")):
        ax.loglog(ms[1:], peaks[name][1:], "o-", label=lab)
    ax.set_xlabel("spike size M")
    ax.set_ylabel(r"peak $\max_\tau |\Delta_\tau|$ (lr = 1)")
    ax.set_title("MVN-Grad Fig. 3 (reconstructed protocol): delayed single spike")
    ax.legend()
    rep.savefig(fig, "mvngrad_spike", "Peak update magnitude vs spike size M (log-log), shared hyperparameters.")


def part_c(rep: Report, quick: bool) -> None:
    # long enough for v to forget the mean tracker's start-up transient (~beta2^t * 4e-3 mu^2 << sigma^2)
    steps = 15000
    sigma = 1e-3
    rng = np.random.default_rng(1)
    mu = np.logspace(-2, 0, 12) * rng.choice([-1.0, 1.0], 12)
    dirs = {}
    for name in ("adam", "mvngrad"):
        spec = get_spec(name)
        hp = spec.validate(lr=1.0, beta1=B1, beta2=B2, eps=1e-8)
        th = np.zeros_like(mu)
        st = functional.init(spec, th, hp)
        acc = []
        for t in range(1, steps + 1):
            new, st = functional.step(spec, th, mu + sigma * rng.standard_normal(mu.size), st, hp, t)
            if t > steps - 500:
                acc.append(th - new)
            th = new
        dirs[name] = np.mean(acc, axis=0)
    da, dm = dirs["adam"], dirs["mvngrad"]
    c = math.sqrt(2 * B1**2 / (1 + B1))
    ratio = dm * c * sigma / mu
    rep.note(f"(c) stationary stream g = mu + {sigma} xi, |mu| from 1e-2 to 1 (12 coordinates), mean step over the last 500 of {steps} steps, lr = 1")
    rep.table(["|mu|", "Adam step", "MVN-Grad step", "MVN step x 0.923 sigma / mu"], [[abs(float(a)), float(b), float(e), float(r)] for a, b, e, r in zip(mu, da, dm, ratio)])
    rep.check("(c) Adam collapses to sign descent: |step| = 1 on every coordinate (within 2 %) although |mu| spans 2 decades",
              bool(np.all(np.abs(np.abs(da) - 1) < 0.02) and np.all(np.sign(da) == np.sign(mu))),
              f"|Adam step| in [{np.min(np.abs(da)):.4f}, {np.max(np.abs(da)):.4f}]", source="Balles & Hennig Eq. 6-7")
    rep.check("(c) MVN-Grad keeps gradient magnitudes: step = mu / (0.923 sigma) (stationary constant sqrt(2 b1^2/(1+b1)), within 5 %)",
              bool(np.all(np.abs(ratio - 1) < 0.05)), f"ratio in [{ratio.min():.4f}, {ratio.max():.4f}]", source="derived stationary constant")

    # Rotated, well-conditioned stochastic quadratic with small homoscedastic noise, lr tuned per method.
    from scipy.stats import special_ortho_group

    d = 20 if quick else 100
    n_steps = 200 if quick else 1000
    r = special_ortho_group.rvs(d, random_state=3)
    q = r @ np.diag(np.random.default_rng(4).uniform(0.1, 1.1, d)) @ r.T
    noise = 1e-3
    lrs = [k * 10.0**e for e in range(-5, 1) for k in (1, 3, 6)]
    tuning_seed, eval_seeds = 5, list(range(100, 102 if quick else 108))

    def run_q(spec, hp: dict, seed: int) -> np.ndarray:
        rr = np.random.default_rng(seed)
        th = rr.standard_normal(d)
        st = functional.init(spec, th, hp)
        ls = [0.5 * th @ q @ th]
        for t in range(1, n_steps + 1):
            th, st = functional.step(spec, th, q @ th + noise * rr.standard_normal(d), st, hp, t)
            ls.append(0.5 * th @ q @ th)
        return np.array(ls)

    def score(ls: np.ndarray) -> float:
        return float(np.mean(np.log10(np.maximum(ls[-n_steps // 10 :], 1e-300)))) if np.all(np.isfinite(ls)) else np.inf

    best, curves, finals = {}, {}, {}
    for name in ("adam", "mvngrad"):
        spec = get_spec(name)
        tuned = min(lrs, key=lambda lr: score(run_q(spec, spec.validate(lr=lr, beta1=B1, beta2=B2, eps=1e-8), tuning_seed)))
        hp = spec.validate(lr=tuned, beta1=B1, beta2=B2, eps=1e-8)
        runs = [run_q(spec, hp, s) for s in eval_seeds]
        finals[name] = np.array([score(ls) for ls in runs])
        best[name] = (float(finals[name].mean()), tuned)
        curves[name] = runs[0]
    se = {k: float(v.std(ddof=1) / np.sqrt(len(v))) for k, v in finals.items()}
    rep.note(
        f"(c) rotated well-conditioned quadratic, d = {d}, homoscedastic noise {noise}, {n_steps} steps; lr tuned on "
        f"{{1, 3, 6}} x 10^k with seed {tuning_seed} (initialisation and noise), then {len(eval_seeds)} fresh seeds: "
        "mean log10 loss over the last 10 % of steps, mean +- s.e.: "
        + ", ".join(f"{k}: {v[0]:.2f} +- {se[k]:.2f} (lr {v[1]:g})" for k, v in best.items())
    )
    diff = finals["adam"].mean() - finals["mvngrad"].mean()
    diff_se = float(np.hypot(se["adam"], se["mvngrad"]))
    rep.check("(c) low-noise rotated quadratic: MVN-Grad converges faster than Adam (each at its tuned lr; lower final loss by > 2 s.e. on fresh seeds)",
              diff > 2 * diff_se,
              f"final log10 loss: MVN-Grad {best['mvngrad'][0]:.2f} +- {se['mvngrad']:.2f}, Adam {best['adam'][0]:.2f} +- {se['adam']:.2f} "
              f"(Adam - MVN-Grad = {diff:.2f} +- {diff_se:.2f} decades)",
              strict=False, source="MVN-Grad abstract; setup ours")

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].loglog(np.abs(mu), np.abs(da), "o", label="Adam |step|")
    ax[0].loglog(np.abs(mu), np.abs(dm) * c * sigma, "s", label=r"MVN-Grad |step| $\times 0.923\sigma$")
    ax[0].loglog(np.abs(mu), np.abs(mu), "k--", lw=0.8, label=r"$|\mu|$")
    ax[0].set_xlabel(r"$|\mu_i|$ (gradient mean)")
    ax[0].set_title(r"low variance: Adam $\to$ sign, MVN-Grad $\propto \mu$")
    ax[0].legend(fontsize=8)
    for name, lab in (("adam", "Adam"), ("mvngrad", "MVN-Grad")):
        ax[1].semilogy(curves[name], label=f"{lab} (lr {best[name][1]:g})")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("L - L*")
    ax[1].set_title("rotated quadratic, small homoscedastic noise")
    ax[1].legend()
    rep.savefig(fig, "mvngrad_lowvar", "Left: per-coordinate step vs gradient mean; right: tuned Adam vs MVN-Grad on a rotated quadratic.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    rep = Report("mvngrad_theory", "MVN-Grad: update-variance gap, spike robustness, low-variance regime", args.out, args.quick, SOURCES)
    rep.note("Reconstruction notice: MVN-Grad's equations are the form implemented in xpoptim.core.mvngrad (the paper's "
             "Algorithm 1 was not available in readable form) and the experiment protocols are ours. Strict checks are exact identities derived for that form.")
    part_a_oracle(rep, args.quick)
    part_a_digits(rep, args.quick)
    part_b(rep, args.quick)
    part_c(rep, args.quick)
    return rep.finish()


if __name__ == "__main__":
    run_main(main)
