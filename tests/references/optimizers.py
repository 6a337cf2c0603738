"""Float64 reference implementations of all 15 optimizers, written from ``docs/algorithms.md``.

Each reference is a plain NumPy loop over steps that follows the spec's pseudo-code literally (section numbers
in the docstrings), deliberately in the *paper's* form where the core uses an algebraically equal closed form
(e.g. M-SVAG as ``gamma = 1/(1 + eta^2)`` with an explicit ``m = 0`` branch, where the core uses
``m^3/(m^2 + s)``). Nothing here imports ``xpoptim``; defaults are the spec's numbers, typed in again.

Entry point: ``run_reference(name, theta0, grad_fn, steps, hp, maximize=False, layout="out_in")`` returns the
trajectory ``theta_0 .. theta_T`` as an array of shape ``(T + 1, *theta0.shape)``. ``grad_fn(theta, t)`` returns
the gradient at ``theta`` for step ``t`` (for the mini-batch rules: the per-example gradients, stacked on axis 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["REFERENCES", "DEFAULTS", "run_reference", "kappa_reference", "ns_reference", "shape_scale_reference"]

F64 = np.float64

#: The spec's defaults (typed in from algorithms.md; ``tests/core`` checks the core's against these).
DEFAULTS: dict[str, dict] = {
    "adam": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
    "adamw": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2),
    "adabelief": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-16, weight_decay=0.0),
    "laprop": dict(lr=4e-4, beta1=0.9, beta2=0.999, eps=1e-15, weight_decay=0.0),
    "mvngrad": dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, eps_s=0.0, weight_decay=0.0, residual="m_t"),
    "sgd": dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False),
    "mssd": dict(lr=1e-3, mu=0.9, weight_decay=0.0),
    "svag": dict(lr=1e-3, mu=0.9, weight_decay=0.0, variance_unbiasing=True),
    "msvag": dict(lr=1e-3, mu=0.9, weight_decay=0.0, variance_unbiasing=True),
    "adam_star": dict(lr=1e-3, mu=0.9, weight_decay=0.0, adaptation="adam"),
    "msvag_mb": dict(lr=1e-3, mu=0.9, weight_decay=0.0),
    "adam_star_mb": dict(lr=1e-3, mu=0.9, weight_decay=0.0, adaptation="adam"),
    "deva_linf": dict(
        lr=0.02, beta1=0.9, beta2=0.999, eps=1e-5, weight_decay=0.0, nesterov=False,
        second_moment_of="momentum", bias_correction=False,
    ),
    "deva_sinf": dict(
        lr=3e-3, beta1=0.95, beta2=0.95, shampoo_beta=-1.0, eps=1e-8, weight_decay=0.01, precondition_frequency=10,
        max_precond_dim=10000, correct_bias=True, nesterov=True, normalize_grads=False, shape_scale="match_rms_adamw",
        ns_steps=5, ns_coefficients="quintic", ns_dtype=None,
    ),
    "muon": dict(
        lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, ns_coefficients="quintic", ns_dtype=None,
        ns_prenorm="frobenius", ns_eps=1e-7, shape_scale="original",
    ),
}

QUINTIC = (3.4445, -4.7750, 2.0315)


# ----------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------


def kappa_reference(mu: float, t: int) -> float:
    """kappa(mu, t) as the sum of squared weights of the bias-corrected EMA (docs/algorithms.md section 3.1 [D]).

    ``m_hat_t = sum_s c_s g_s`` with ``c_s = (1 - mu) mu^(t-s) / (1 - mu^t)``; ``kappa = sum_s c_s^2``.
    """
    c = [(1 - mu) * mu ** (t - s) / (1 - mu**t) for s in range(1, t + 1)]
    return math.fsum(x * x for x in c)


def shape_scale_reference(kind: str, shape: tuple, layout: str) -> float:
    """Spec 5.3: shape scales in fan terms; ``out_in`` = torch Linear (rows are fan_out)."""
    rows, cols = shape[-2], shape[-1]
    fan_out, fan_in = (rows, cols) if layout == "out_in" else (cols, rows)
    return {
        "original": math.sqrt(max(1.0, fan_out / fan_in)),
        "match_rms_adamw": 0.2 * math.sqrt(max(fan_in, fan_out)),
        "deva_muon": math.sqrt(max(fan_in, fan_out)),
        "none": 1.0,
    }[kind]


def _coefficient_table(coefficients, steps: int) -> list:
    if isinstance(coefficients, str):
        coefficients = {"quintic": QUINTIC, "cubic": (1.5, -0.5, 0.0)}[coefficients]
    coefficients = list(coefficients)
    if len(coefficients) == 3 and all(isinstance(c, (int, float)) for c in coefficients):
        return [tuple(coefficients)] * steps
    assert len(coefficients) == steps
    return [tuple(row) for row in coefficients]


def ns_reference(x, steps: int = 5, coefficients=QUINTIC, prenorm: str = "frobenius", eps: float = 1e-7) -> np.ndarray:
    """Newton-Schulz orthogonalisation, docs/algorithms.md section 5.1 / 5.2, one matrix at a time (stacks are looped).

    * ``frobenius``: ``X / max(||X||_F, eps)`` (torch.optim.Muon clamp);
    * ``frobenius_add``: ``X / (||X||_F + eps)`` (KellerJordan/Muon, optax);
    * ``schatten8``: ``X / sqrt(||X||_F^2 + eps)``, then divide by the Schatten-8 norm
      ``||(X X^T)^2||_F^(1/4)`` before the first iteration (DeVA repo ``msign``).

    Transpose when rows > cols; iterate ``A = X X^T``, ``X <- a X + (b A + c A^2) X``; transpose back.
    """
    x = np.asarray(x, dtype=F64)
    if x.ndim > 2:
        return np.stack([ns_reference(xi, steps, coefficients, prenorm, eps) for xi in x])
    table = _coefficient_table(coefficients, steps)
    tall = x.shape[0] > x.shape[1]
    X = x.T.copy() if tall else x.copy()
    norm = math.sqrt(float(np.sum(X * X)))
    if prenorm == "frobenius":
        X = X / max(norm, eps)
    elif prenorm == "frobenius_add":
        X = X / (norm + eps)
    elif prenorm == "schatten8":
        X = X / math.sqrt(norm * norm + eps)
        A = X @ X.T
        s8 = math.sqrt(math.sqrt(math.sqrt(float(np.sum((A @ A) ** 2)))))
        if s8 > 0:
            X = X / s8
    else:
        raise ValueError(prenorm)
    for a, b, c in table:
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


def _erf(x: np.ndarray) -> np.ndarray:
    """Elementwise ``math.erf`` (independent of scipy), ``erf(inf) = 1``."""
    return np.vectorize(math.erf, otypes=[F64])(x)


# ----------------------------------------------------------------------------------------------
# Elementwise rules: step(theta, g, state, t, hp) -> theta (state updated in place in a dict)
# ----------------------------------------------------------------------------------------------


def _adam(theta, g, S, t, hp, decoupled):
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    if decoupled:
        theta = theta * (1 - lr * wd)  # docs/algorithms.md section 1.1 step 5: AdamW decays first (torch order)
    else:
        g = g + wd * theta  # torch.optim.Adam's coupled L2
    S["m"] = b1 * S["m"] + (1 - b1) * g
    S["v"] = b2 * S["v"] + (1 - b2) * g**2
    m_hat = S["m"] / (1 - b1**t)
    v_hat = S["v"] / (1 - b2**t)
    return theta - lr * m_hat / (np.sqrt(v_hat) + eps)


def ref_adam(theta, g, S, t, hp):
    """Spec 1.1 (Adam, coupled L2 as torch.optim.Adam)."""
    return _adam(theta, g, S, t, hp, decoupled=False)


def ref_adamw(theta, g, S, t, hp):
    """Spec 1.1 (AdamW: decoupled decay first)."""
    return _adam(theta, g, S, t, hp, decoupled=True)


def ref_adabelief(theta, g, S, t, hp):
    """Spec 1.2: residual against the updated m, eps added into s every step, decay first."""
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    theta = theta * (1 - lr * wd)
    S["m"] = b1 * S["m"] + (1 - b1) * g
    S["s"] = b2 * S["s"] + (1 - b2) * (g - S["m"]) ** 2 + eps
    denom = np.sqrt(S["s"]) / math.sqrt(1 - b2**t) + eps
    return theta - (lr / (1 - b1**t)) * S["m"] / denom


def ref_laprop(theta, g, S, t, hp):
    """Spec 1.3 (simple form; lr-scaled decoupled decay first, the spec's [I] recommendation)."""
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    theta = theta * (1 - lr * wd)
    S["v"] = b2 * S["v"] + (1 - b2) * g**2
    n = g / (np.sqrt(S["v"] / (1 - b2**t)) + eps)
    S["m"] = b1 * S["m"] + (1 - b1) * n
    return theta - lr * S["m"] / (1 - b1**t)


def ref_mvngrad(theta, g, S, t, hp):
    """Spec 2.3 steps 1-6 (residual against m_t, or m_{t-1} with residual='m_prev')."""
    lr, b1, b2, eps, eps_s, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["eps_s"], hp["weight_decay"]
    theta = theta * (1 - lr * wd)
    m_prev = S["m"]
    S["m"] = b1 * m_prev + (1 - b1) * g
    resid = g - (S["m"] if hp["residual"] == "m_t" else m_prev)
    S["v"] = b2 * S["v"] + (1 - b2) * resid**2 + eps_s
    z = g / (np.sqrt(S["v"] / (1 - b2**t)) + eps)
    S["u"] = b1 * S["u"] + (1 - b1) * z
    return theta - lr * S["u"] / (1 - b1**t)


def ref_sgd(theta, g, S, t, hp):
    """torch.optim.SGD: coupled L2; buffer = g at t = 1, else mu buf + (1 - dampening) g; Nesterov g + mu buf."""
    lr, mu, damp, wd = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
    g = g + wd * theta
    if mu == 0:
        return theta - lr * g
    S["buf"] = g.copy() if t == 1 else mu * S["buf"] + (1 - damp) * g
    d = g + mu * S["buf"] if hp["nesterov"] else S["buf"]
    return theta - lr * d


def ref_mssd(theta, g, S, t, hp):
    """Spec 3.2 (Alg. 1): m <- mu m + g; theta <- theta - alpha sign(m) (decay first, [I])."""
    theta = theta * (1 - hp["lr"] * hp["weight_decay"])
    S["m"] = hp["mu"] * S["m"] + g
    return theta - hp["lr"] * np.sign(S["m"])


def _bh_moments(g, S, t, mu):
    S["m"] = mu * S["m"] + (1 - mu) * g
    S["v"] = mu * S["v"] + (1 - mu) * g**2
    return S["m"] / (1 - mu**t), S["v"] / (1 - mu**t)


def _variance_estimate(m, v):
    """Spec 3.4 / 3.9: ``v - m^2`` clamped at 0 against round-off, and 0 below 16 units in the last place of ``v``
    (``np.spacing``): there it is the round-off of forming ``v`` and ``m^2``, not a variance. At exactly 16 ulp the
    estimate is kept where ``v``'s significand is odd (round-half-to-even of ``v + d/32``)."""
    d = np.maximum(v - m**2, 0.0)
    ulp = np.spacing(v)
    odd = np.floor(v / ulp) % 2 == 1
    return np.where((d < 16 * ulp) | ((d == 16 * ulp) & ~odd), 0.0, d)


def ref_svag(theta, g, S, t, hp):
    """Spec 3.3 / 3.9: repo form ``gamma = m^2/(m^2 + s)``, ``s = (v - m^2)/(1 - rho)``, clipped to [0, 1],
    NaN -> 0 (``variance_unbiasing=True``); paper form ``gamma = 1/(1 + (v - m^2)/m^2)`` otherwise."""
    lr, mu = hp["lr"], hp["mu"]
    theta = theta * (1 - lr * hp["weight_decay"])
    m, v = _bh_moments(g, S, t, mu)
    with np.errstate(divide="ignore", invalid="ignore"):
        if hp["variance_unbiasing"]:
            rho = min(kappa_reference(mu, t), 0.9999)
            s = _variance_estimate(m, v) / (1 - rho)
            gamma = m**2 / (m**2 + s)
            gamma = np.nan_to_num(np.clip(gamma, 0.0, 1.0), nan=0.0)
        else:
            eta2 = _variance_estimate(m, v) / m**2
            gamma = np.where(m == 0, 0.0, 1.0 / (1.0 + eta2))
    return theta - lr * gamma * g


def ref_msvag(theta, g, S, t, hp):
    """Spec 3.4 (paper Alg. 2: ``eta^2 = kappa (v - m^2)/m^2``, ``gamma = 1/(1 + eta^2)``, m = 0 -> 0) and
    docs/algorithms.md section 3.9 (published/repo: factor ``m^2/(m^2 + rho s)``, ``s = (v - m^2)/(1 - rho)``, clip, NaN -> 0)."""
    lr, mu = hp["lr"], hp["mu"]
    theta = theta * (1 - lr * hp["weight_decay"])
    m, v = _bh_moments(g, S, t, mu)
    with np.errstate(divide="ignore", invalid="ignore"):
        if hp["variance_unbiasing"]:
            rho = min(kappa_reference(mu, t), 0.9999)
            s = _variance_estimate(m, v) / (1 - rho)
            gamma = np.nan_to_num(np.clip(m**2 / (m**2 + rho * s), 0.0, 1.0), nan=0.0)
        else:
            eta2 = kappa_reference(mu, t) * _variance_estimate(m, v) / m**2
            gamma = np.where(m == 0, 0.0, 1.0 / (1.0 + eta2))
    return theta - lr * gamma * m


def _sign_factor(m, eta2, adaptation):
    """gamma for a sign direction: ``(1 + eta^2)^(-1/2)`` or ``erf(1/(sqrt(2) eta))`` (docs/algorithms.md section 3.5, 3.7)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if adaptation == "adam":
            gamma = 1.0 / np.sqrt(1.0 + eta2)
        else:
            eta = np.sqrt(eta2)
            gamma = _erf(1.0 / (math.sqrt(2.0) * eta))  # eta = 0 -> erf(inf) = 1
    return np.where(m == 0, 0.0, gamma)


def ref_adam_star(theta, g, S, t, hp):
    """Spec 3.5 (Alg. 4) with the docs/algorithms.md section 3.7 erf option: ``theta -= alpha gamma sign(m)``."""
    lr, mu = hp["lr"], hp["mu"]
    theta = theta * (1 - lr * hp["weight_decay"])
    m, v = _bh_moments(g, S, t, mu)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta2 = kappa_reference(mu, t) * _variance_estimate(m, v) / m**2
    return theta - lr * _sign_factor(m, eta2, hp["adaptation"]) * np.sign(m)


def _mb_moments(pe, S, mu):
    """Spec 3.6: g = batch mean, s_hat = unbiased variance of the mean (Eq. 44, unbiased form), Eq. 48."""
    B = pe.shape[0]
    g = pe.mean(axis=0)
    s_hat = np.sum((pe - g) ** 2, axis=0) / (B - 1) / B
    return g, s_hat


def ref_msvag_mb(theta, pe, S, t, hp, maximize=False):
    """Spec 3.6 (Alg. 3): m <- mu m + g; s_bar <- mu^2 s_bar + s_hat; eta^2 = s_bar/m^2; theta -= alpha gamma m."""
    lr, mu = hp["lr"], hp["mu"]
    g, s_hat = _mb_moments(pe, S, mu)
    if maximize:
        g = -g
    theta = theta * (1 - lr * hp["weight_decay"])
    S["m"] = mu * S["m"] + g
    S["s"] = mu**2 * S["s"] + s_hat
    m = S["m"]
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = np.where(m == 0, 0.0, 1.0 / (1.0 + S["s"] / m**2))
    return theta - lr * gamma * m


def ref_adam_star_mb(theta, pe, S, t, hp, maximize=False):
    """Spec 3.6 (Alg. 5): as M-SVAG-mb with ``gamma sign(m)``, gamma = (1+eta^2)^(-1/2) or the erf factor."""
    lr, mu = hp["lr"], hp["mu"]
    g, s_hat = _mb_moments(pe, S, mu)
    if maximize:
        g = -g
    theta = theta * (1 - lr * hp["weight_decay"])
    S["m"] = mu * S["m"] + g
    S["s"] = mu**2 * S["s"] + s_hat
    m = S["m"]
    with np.errstate(divide="ignore", invalid="ignore"):
        eta2 = S["s"] / m**2
    return theta - lr * _sign_factor(m, eta2, hp["adaptation"]) * np.sign(m)


def ref_deva_linf(theta, g, S, t, hp):
    """Spec 4.1 (DeVAEuclideanNorm): decay first; m EMA; v = EMA(m^2) of the updated m (or of g^2);
    Gamma = sqrt(m^2/(v + eps)); d = (1-b1) g + b1 m (Nesterov) or m; theta -= lr Gamma sign(d).
    ``bias_correction=True`` [I]: Gamma from m/(1 - b1^t) and v/(1 - b2^t)."""
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    theta = theta * (1 - lr * wd)
    S["m"] = b1 * S["m"] + (1 - b1) * g
    x = S["m"] if hp["second_moment_of"] == "momentum" else g
    S["v"] = b2 * S["v"] + (1 - b2) * x**2
    m, v = S["m"], S["v"]
    if hp["bias_correction"]:
        m, v = m / (1 - b1**t), v / (1 - b2**t)
    gamma = np.sqrt(m**2 / (v + eps))
    d = (1 - b1) * g + b1 * S["m"] if hp["nesterov"] else S["m"]
    return theta - lr * gamma * np.sign(d)


ELEMENTWISE_REFS: dict[str, Callable] = {
    "adam": ref_adam,
    "adamw": ref_adamw,
    "adabelief": ref_adabelief,
    "laprop": ref_laprop,
    "mvngrad": ref_mvngrad,
    "sgd": ref_sgd,
    "mssd": ref_mssd,
    "svag": ref_svag,
    "msvag": ref_msvag,
    "adam_star": ref_adam_star,
    "deva_linf": ref_deva_linf,
}
MB_REFS: dict[str, Callable] = {"msvag_mb": ref_msvag_mb, "adam_star_mb": ref_adam_star_mb}


# ----------------------------------------------------------------------------------------------
# Matrix rules
# ----------------------------------------------------------------------------------------------


def _muon_matrix(theta, g, S, hp, scale):
    """Spec 5.1 (torch.optim.Muon convention): B EMA; N Nesterov; O = NS(N); decay with the base lr first."""
    mu = hp["momentum"]
    S["B"] = mu * S["B"] + (1 - mu) * g
    N = (1 - mu) * g + mu * S["B"] if hp["nesterov"] else S["B"]
    O = ns_reference(N, hp["ns_steps"], hp["ns_coefficients"], hp["ns_prenorm"], hp["ns_eps"])
    return theta * (1 - hp["lr"] * hp["weight_decay"]) - hp["lr"] * scale * O


class _DevaSinfMatrix:
    """Spec 4.2 for one matrix, as released (DeVASchattenNorm + SOAP maintenance).

    ``sign_mode``: ``"raw"`` keeps LAPACK's eigenvector / QR signs, ``"canonical"`` makes each eigenvector's
    first entry and each R diagonal positive, ``"random"`` flips columns at random. The trajectory is invariant
    to these column signs in exact arithmetic (a flipped basis vector flips the matching row of the rotated
    momentum and of msign's output; row/column norms, V and Gamma do not change).

    Cluster convention (xpoptim's, documented in ``core/deva.py`` and ``docs/verification.md``; the release leaves
    it to LAPACK): the trajectory is *not* invariant to the basis inside a near-degenerate eigenspace (V is
    elementwise in the rotated basis). The values (the seed's eigenvalues; at a refresh, the estimates
    ``q^T F q`` of the current basis, before the power step) are sorted descending and split into clusters
    wherever two consecutive ones differ by more than ``tau max|.|``, ``tau = sqrt(n eps)``; every cluster of two or
    more columns ``N`` is replaced, in column order, by the eigenvectors of ``N^T D N`` (ascending),
    ``D = diag(sqrt(1 + j/n))``, mapped back by ``N``. At a refresh the columns are ordered by cluster (descending),
    keeping their previous order inside a cluster, then the power step + QR, then the same clusters (now
    consecutive columns) are replaced, except that columns with ``|R_jj| <= tau max|R_ii|`` (noise columns of a
    rank-deficient ``F Q``) join the last cluster. ``tau_eps`` sets the ``eps`` of ``tau``
    (default float64's; a float32 run's reference uses float32's).
    """

    def __init__(self, shape, hp, sign_mode="raw", rng=None, tau_eps=None):
        n, m = shape
        self.hp, self.sign_mode, self.rng = hp, sign_mode, rng
        self.tau_eps = float(np.finfo(F64).eps) if tau_eps is None else float(tau_eps)
        self.bs = hp["beta2"] if hp["shampoo_beta"] < 0 else hp["shampoo_beta"]
        self.has_l, self.has_r = n <= hp["max_precond_dim"], m <= hp["max_precond_dim"]
        self.QL, self.QR = np.eye(n), np.eye(m)
        self.L = self.R = None
        self.M, self.V = np.zeros(shape), np.zeros(shape)
        self.k = 0
        self.seeded = False

    def _signs(self, Q, R=None):
        if self.sign_mode == "canonical":
            s = np.sign(np.diag(R)) if R is not None else np.sign(Q[0, :])
            return Q * np.where(s == 0, 1.0, s)
        if self.sign_mode == "random":
            return Q * self.rng.choice([-1.0, 1.0], size=Q.shape[1])
        return Q

    def _eig_desc(self, A):
        w, Q = np.linalg.eigh(A + 1e-30 * np.eye(A.shape[0]))
        w, Q = w[::-1], Q[:, ::-1]
        Q = self._signs(Q)
        for cluster in self._groups(w):
            Q = self._fill_null(Q, cluster)
        return Q

    def _tau(self, n):
        return math.sqrt(n * self.tau_eps)

    def _groups(self, values):
        """Clusters (lists of column indices, descending by value) of values closer than tau max|values|."""
        values = [float(v) for v in values]
        order = sorted(range(len(values)), key=lambda j: (-values[j], j))
        tol = self._tau(len(values)) * max(abs(v) for v in values)
        groups = [[order[0]]]
        for prev, j in zip(order, order[1:]):
            if values[prev] - values[j] > tol:
                groups.append([j])
            else:
                groups[-1].append(j)
        return groups

    def _fill_null(self, Q, null):
        """Canonical basis of span(Q[:, null]): eigenvectors of the compression of D = diag(sqrt(1 + j/n))."""
        if len(null) < 2:
            return Q
        null = sorted(null)
        n = Q.shape[0]
        N = Q[:, null]
        D = np.diag([math.sqrt(1 + j / n) for j in range(n)])
        _, W = np.linalg.eigh(N.T @ D @ N)  # ascending
        B = N @ W
        Q = Q.copy()
        for i, j in enumerate(null):
            col = B[:, i]
            big = np.argmax(np.abs(col))
            Q[:, j] = col if col[big] >= 0 else -col  # any sign will do (sign invariance); keep it tidy
        return Q

    def step(self, W, G):
        hp = self.hp
        b1, b2, bs, eps = hp["beta1"], hp["beta2"], self.bs, hp["eps"]
        if not self.seeded:  # first call: seed the preconditioner; W is not changed
            if self.has_l:
                self.L = (1 - bs) * G @ G.T
                self.QL = self._eig_desc(self.L)
            if self.has_r:
                self.R = (1 - bs) * G.T @ G
                self.QR = self._eig_desc(self.R)
            self.seeded = True
            return W
        Gr = self.QL.T @ G @ self.QR  # 1
        self.k += 1  # 2
        self.M = b1 * self.M + (1 - b1) * Gr  # 3
        r = np.linalg.norm(self.M, axis=1)  # 4
        c = np.linalg.norm(self.M, axis=0)
        self.V = b2 * self.V + (1 - b2) * np.outer(r, c)  # 5
        N = (1 - b1) * Gr + b1 * self.M if hp["nesterov"] else self.M  # 6
        O = ns_reference(N, hp["ns_steps"], hp["ns_coefficients"], "schatten8", 1e-20)  # 7
        Gamma = np.sqrt(np.outer(r, c)) / np.sqrt(self.V + eps)  # 8
        U = shape_scale_reference(hp["shape_scale"], W.shape, "out_in") * (O * Gamma)  # 9
        k = self.k
        step = hp["lr"] * math.sqrt(1 - b2**k) / (1 - b1**k) if hp["correct_bias"] else hp["lr"]  # 10
        dW = self.QL @ U @ self.QR.T  # 11
        if hp["normalize_grads"]:
            rms = math.sqrt(float(np.mean(dW**2)))
            if rms > 0:
                dW = dW / rms
        W = W - step * dW  # 12
        W = W - hp["lr"] * hp["weight_decay"] * W  # 13: after the step, base lr
        # 14: maintenance (momentum to the original basis, factors EMA, refresh every f steps, re-rotate)
        M_orig = self.QL @ self.M @ self.QR.T
        if self.has_l:
            self.L = bs * self.L + (1 - bs) * G @ G.T
        if self.has_r:
            self.R = bs * self.R + (1 - bs) * G.T @ G
        if k % hp["precondition_frequency"] == 0:
            for side in ("L", "R"):
                if not (self.has_l if side == "L" else self.has_r):
                    continue
                F, Q = (self.L, self.QL) if side == "L" else (self.R, self.QR)
                est = np.diag(Q.T @ F @ Q)
                groups = [sorted(cluster) for cluster in self._groups(est)]
                order = [j for cluster in groups for j in cluster]
                Q = Q[:, order]
                self.V = self.V[order, :] if side == "L" else self.V[:, order]
                Q, Rfac = np.linalg.qr(F @ Q)
                Q = self._signs(Q, Rfac)
                n = Q.shape[0]
                rdiag = np.abs(np.diag(Rfac))
                null = [j for j in range(n) if rdiag[j] <= self._tau(n) * rdiag.max()]
                start = 0  # the groups, decided before the power step, now sit in consecutive columns
                blocks = []
                for cluster in groups:
                    blocks.append([j for j in range(start, start + len(cluster)) if j not in null])
                    start += len(cluster)
                blocks[-1] = sorted(set(blocks[-1]) | set(null))  # QR noise columns join the last cluster
                for block in blocks:
                    Q = self._fill_null(Q, block)
                if side == "L":
                    self.QL = Q
                else:
                    self.QR = Q
        self.M = self.QL.T @ M_orig @ self.QR
        return W


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def run_reference(
    name: str,
    theta0: np.ndarray,
    grad_fn: Callable[[np.ndarray, int], np.ndarray],
    steps: int,
    hp: dict | None = None,
    *,
    maximize: bool = False,
    layout: str = "out_in",
    sign_mode: str = "raw",
    seed: int = 0,
    rule_dtype: str = "float64",
) -> np.ndarray:
    """Run the reference of ``name`` for ``steps`` steps; return the trajectory ``(steps + 1, *shape)``.

    Args:
        name: registry name (``"adam"``, ..., ``"muon"``).
        theta0: initial parameter (float64; a stack of matrices for the matrix rules).
        grad_fn: ``grad_fn(theta, t)``: the gradient (per-example gradients on axis 0 for ``*_mb``).
        steps: number of steps.
        hp: overrides of the spec defaults (``DEFAULTS[name]``).
        maximize: ascend (the gradient is negated before anything else).
        layout: ``"out_in"`` / ``"in_out"`` for Muon's shape scale.
        sign_mode: DeVA_Sinf eigenvector sign handling (see ``_DevaSinfMatrix``).
        seed: for ``sign_mode="random"``.
        rule_dtype: the precision of the run the reference is compared with, where the rule's definition depends
            on it: DeVA_Sinf clusters eigenvalues at ``tau = sqrt(n eps)`` of that precision (a float32 run's
            reference computes the float32 rule in float64). The other rules ignore it.
    """
    unknown = set(hp or {}) - set(DEFAULTS[name])
    assert not unknown, f"reference {name} has no hyperparameter(s) {unknown}"
    hp = {**DEFAULTS[name], **(hp or {})}
    theta = np.array(theta0, dtype=F64)
    traj = [theta.copy()]
    if name in ELEMENTWISE_REFS or name in MB_REFS:
        S: dict = {k: np.zeros_like(theta) for k in ("m", "v", "s", "u", "buf")}
        for t in range(1, steps + 1):
            g = np.asarray(grad_fn(theta.copy(), t), dtype=F64)
            if name in MB_REFS:
                theta = MB_REFS[name](theta, g, S, t, hp, maximize=maximize)
            else:
                theta = ELEMENTWISE_REFS[name](theta, -g if maximize else g, S, t, hp)
            traj.append(theta.copy())
        return np.stack(traj)
    batch = theta.shape[:-2]
    idx = list(np.ndindex(*batch)) if batch else [()]
    if name == "muon":
        scale = shape_scale_reference(hp["shape_scale"], theta.shape, layout)
        states = {i: {"B": np.zeros(theta.shape[-2:])} for i in idx}
        for t in range(1, steps + 1):
            g = np.asarray(grad_fn(theta.copy(), t), dtype=F64)
            g = -g if maximize else g
            new = theta.copy()
            for i in idx:
                new[i] = _muon_matrix(theta[i], g[i], states[i], hp, scale)
            theta = new
            traj.append(theta.copy())
        return np.stack(traj)
    if name == "deva_sinf":
        rng = np.random.default_rng(seed)
        tau_eps = float(np.finfo(np.dtype(rule_dtype)).eps)
        mats = {i: _DevaSinfMatrix(theta.shape[-2:], hp, sign_mode, rng, tau_eps) for i in idx}
        for t in range(1, steps + 1):
            g = np.asarray(grad_fn(theta.copy(), t), dtype=F64)
            g = -g if maximize else g
            new = theta.copy()
            for i in idx:
                new[i] = mats[i].step(theta[i], g[i])
            theta = new
            traj.append(theta.copy())
        return np.stack(traj)
    raise KeyError(name)


REFERENCES = tuple(DEFAULTS)
