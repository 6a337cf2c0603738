"""DeVA: decoupled variance adaptation (Song, Bai, Zhang, Bullins, Gleich, arXiv 2602.06880).

DeVA writes an adaptive step as *(variance-adaptation factor) x (scale-invariant direction)*:
``sign`` in the vector (l_inf) case, ``msign`` (Muon's orthogonalisation) in the spectral (S_inf)
case. **Provenance:** the paper's algorithm boxes could not be read; both rules follow the authors'
released code exactly (Tsedao/Decoupled-Variance-Adaptation ``optimizers/deva.py``, classes
``DeVAEuclideanNorm`` and ``DeVASchattenNorm``, HEAD 2e4d26e), spec section 4.
"""

from __future__ import annotations

from typing import Any

from ._backend import HOST, matmul
from .directions import SHAPE_SCALES, newton_schulz, sign
from .moments import bias_correction, ema
from .muon import NS_HYPERS, ns_check
from .spec import ElementwiseSpec, Hyper, MatrixSpec, beta_hyper, concrete, eps_hyper, lr_hyper, wd_hyper

__all__ = [
    "deva_linf_direction",
    "deva_linf_gamma",
    "DEVA_LINF",
    "deva_sinf_init",
    "deva_sinf_seed",
    "deva_sinf_update",
    "deva_sinf_apply",
    "deva_sinf_host_step",
    "deva_sinf_options",
    "deva_sinf_step_factor",
    "resolve_shampoo_beta",
    "DEVA_SINF",
    "EIGH_RIDGE",
    "NULL_TOL_FACTOR",
]


# ----------------------------------------------------------------------------------------------
# DeVA_linf (vector)
# ----------------------------------------------------------------------------------------------


def deva_linf_gamma(xp: Any, m: Any, v: Any, eps: Any, bc1: Any = 1.0, bc2: Any = 1.0) -> Any:
    """DeVA_linf's variance-adaptation factor ``Gamma = |m_hat| / sqrt(v_hat + eps)``.

    Without bias correction (``bc1 = bc2 = 1``, as released) and with ``v = EMA(m^2)``,
    ``Gamma = (1 + eta_m^2)^(-1/2)`` where ``eta_m^2 = EMA(m^2)/m^2 - 1`` is the momentum's own
    relative variance (spec 4.1). Also the diagnostic Fig. 2(c-d) of the paper uses.
    """
    return xp.abs(m / bc1) / xp.sqrt(v / bc2 + eps)


def deva_linf_direction(
    xp: Any,
    g: Any,
    m: Any,
    v: Any,
    beta1: Any,
    beta2: Any,
    eps: Any,
    bc1: Any,
    bc2: Any,
    *,
    nesterov: bool = False,
    second_moment_of: str = "momentum",
) -> tuple:
    """DeVA_linf (``DeVAEuclideanNorm``): ``d = Gamma * sign(N)``.

    1. ``m <- b1 m + (1-b1) g``
    2. ``v <- b2 v + (1-b2) m^2`` (the *updated* momentum, as released; ``second_moment_of="gradient"``
       uses ``g^2``, which makes the rule Adam with eps inside the sqrt and sign/magnitude split)
    3. ``Gamma = |m| / sqrt(v + eps)`` (eps = 1e-5 *inside* the sqrt, added to v; no bias correction
       as released, ``bias_correction=True`` divides m by ``1 - b1^t`` and v by ``1 - b2^t``)
    4. ``N = (1-b1) g + b1 m`` (Nesterov) or ``m``; ``d = Gamma sign(N)``.

    The ``bias_correction`` switch acts only through the scalars: ``bc1 = bc2 = 1`` when off.

    References:
        arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation ``DeVAEuclideanNorm``; spec 4.1.
    """
    m = ema(xp, m, g, beta1)
    x = m if second_moment_of == "momentum" else g
    v = beta2 * v + (1 - beta2) * (x * x)
    gamma = deva_linf_gamma(xp, m, v, eps, bc1, bc2)
    n = (1 - beta1) * g + beta1 * m if nesterov else m
    return gamma * sign(xp, n), m, v


def _deva_linf_scalars(hp: dict, t: Any, ops: Any = HOST) -> tuple:
    b1, b2 = hp["beta1"], hp["beta2"]
    if hp["bias_correction"]:
        return (b1, b2, hp["eps"], bias_correction(b1, t), bias_correction(b2, t))
    return (b1, b2, hp["eps"], 1.0 + 0 * b1, 1.0 + 0 * b2)


DEVA_LINF = ElementwiseSpec(
    name="deva_linf",
    title="DeVALinf",
    hyperparams=(
        lr_hyper(0.02),
        beta_hyper("beta1", 0.9, "momentum"),
        beta_hyper("beta2", 0.999, "decay of the second moment of the momentum"),
        eps_hyper(1e-5, "added to v inside the sqrt (hard-coded 1e-5 in the release)"),
        wd_hyper(0.0),
        Hyper("nesterov", False, "bool", "sign of (1 - b1) g + b1 m instead of m"),
        Hyper("second_moment_of", "momentum", "choice", "v = EMA(m^2) (release) or EMA(g^2)", ("momentum", "gradient")),
        Hyper("bias_correction", False, "bool", "bias-correct m and v (not in the release)"),
    ),
    state=("exp_avg", "exp_avg_sq"),
    scalars=_deva_linf_scalars,
    direction=deva_linf_direction,
    conventions="Gamma = |m|/sqrt(v + eps), v = EMA(m^2) of the updated m; eps inside the sqrt; no bias correction (option); decoupled decay before",
    source="arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation DeVAEuclideanNorm (released code; paper box not read)",
)


# ----------------------------------------------------------------------------------------------
# DeVA_Sinf (spectral), SOAP-style Kronecker eigenbases
# ----------------------------------------------------------------------------------------------

#: Ridge added before ``eigh`` (as released); it only keeps eigh from failing on a zero matrix.
EIGH_RIDGE = 1e-30


def _eye_like(xp: Any, a: Any) -> Any:
    n = a.shape[-1]
    return xp.eye(n, dtype=a.dtype, device=_device(a))


def _device(a: Any) -> Any:
    import array_api_compat

    return array_api_compat.device(a)


def _mT(xp: Any, a: Any) -> Any:
    return xp.matrix_transpose(a)


def _rotate(xp: Any, x: Any, ql: Any, qr: Any) -> Any:
    """``Q_L^T X Q_R`` (a side without a factor keeps the identity)."""
    if ql is not None:
        x = matmul(xp, _mT(xp, ql), x)
    if qr is not None:
        x = matmul(xp, x, qr)
    return x


def _unrotate(xp: Any, x: Any, ql: Any, qr: Any) -> Any:
    """``Q_L X Q_R^T``."""
    if ql is not None:
        x = matmul(xp, ql, x)
    if qr is not None:
        x = matmul(xp, x, _mT(xp, qr))
    return x


def _canonical_signs(xp: Any, q: Any) -> Any:
    """Flip eigenvector columns so each column's largest-magnitude entry is positive.

    The DeVA_Sinf trajectory is invariant to column signs in exact arithmetic (a sign flip of a basis
    vector flips the matching row of the rotated momentum and of ``msign``'s output); fixing them makes
    every backend's LAPACK agree.
    """
    a = xp.abs(q)
    is_max = a == xp.max(a, axis=-2, keepdims=True)
    lead = xp.sum(xp.where(is_max, q, 0 * q), axis=-2, keepdims=True)
    return q * xp.where(lead < 0, -1 + 0 * lead, 1 + 0 * lead)


#: Relative tolerance factor of the null-space test: an eigenvalue (seed) or estimated eigenvalue
#: (refresh) ``w_j <= NULL_TOL_FACTOR * n * eps(dtype) * max|w|`` counts as zero. Measured: the null
#: eigenvalues of ``fl((1-b_s) G G^T)`` stay below ``2.5 eps max|w|`` (float32 and float64, n up to 1024),
#: and ``diag(Q^T L Q)`` of the null columns after the power step + QR below ``100 eps max`` (float32,
#: n = 512), so the threshold sits above round-off with margin; an eigenvalue this small has an
#: eigenvector that round-off alone decides, so replacing it by the canonical one loses nothing.
NULL_TOL_FACTOR = 4.0


def _null_mask(xp: Any, w: Any, shift: float = 0.0) -> Any:
    """``w_j - shift <= NULL_TOL_FACTOR * n * eps * max_j |w_j|`` along the last axis (``shift``: the ridge).

    With ``shift = EIGH_RIDGE`` the all-zero factor (``w = 1e-30`` everywhere) is all null, so its basis is
    the canonical one (the identity), the same on every backend.
    """
    n = w.shape[-1]
    eps = xp.finfo(w.dtype).eps
    tol = (NULL_TOL_FACTOR * n * eps) * xp.max(xp.abs(w), axis=-1, keepdims=True)
    return (w - shift) <= tol


def _canonical_null_basis(xp: Any, q: Any, null: Any) -> Any:
    """Replace the columns of the orthogonal ``q`` marked by ``null`` with a canonical basis of their span.

    The span of the null columns is fixed by the others (it is their orthogonal complement), but the basis
    inside it is not: ``eigh`` and ``qr`` return whatever their LAPACK's rounding produced (torch and NumPy
    differ). We take the eigenvectors of ``P D P`` with ``P = I - Q_r Q_r^T`` the projector onto the
    complement of the kept columns ``Q_r`` and ``D = diag(sqrt(1 + j/n))`` (fixed, distinct entries in
    [1, sqrt 2], chosen concave so that pair sums such as ``d_a + d_b`` rarely coincide: the null space of
    duplicated rows is spanned by ``e_a - e_b``). ``P D P`` has eigenvalue 0 on the kept span and
    eigenvalues in [1, sqrt 2] on the complement, so ``eigh`` (ascending) lists the ``k`` complement
    vectors last, by ascending Rayleigh quotient of ``D``; they fill the null positions in column order,
    each with a canonical sign (``_canonical_signs``). A coordinate direction ``e_i`` inside the null space
    (a dead row) is itself one of these eigenvectors. Fixed shapes only (a mask, a selection matmul):
    safe under ``jax.jit``. Cost: one ``eigh`` and four matmuls of ``n x n`` matrices.

    Args:
        xp: array namespace.
        q: ``(..., n, n)`` matrix with orthonormal columns.
        null: ``(..., n)`` boolean mask of the columns to replace (any positions; none or all allowed).

    Returns:
        ``q`` with the masked columns replaced (the others are untouched).
    """
    n = q.shape[-1]
    dt = q.dtype
    dev = _device(q)
    nul = xp.astype(null, dt)
    kept = q * (1 - nul)[..., None, :]
    proj = _eye_like(xp, q) - matmul(xp, kept, _mT(xp, kept))
    j = xp.arange(n, dtype=dt, device=dev)
    d = xp.sqrt(1 + j / n)
    a = matmul(xp, proj * d, proj)  # P D P
    _, c = xp.linalg.eigh((a + _mT(xp, a)) / 2)
    # The i-th null column (in column order) takes eigh's column n - k + i: a selection matmul.
    before = xp.astype(j[:, None] <= j[None, :], dt)  # before[i, j] = (i <= j)
    count = matmul(xp, nul[..., None, :], before)[..., 0, :]  # null columns at positions <= j
    k = xp.sum(nul, axis=-1, keepdims=True)
    target = (n - k) + count - 1
    sel = xp.astype((j[:, None] == target[..., None, :]) & null[..., None, :], dt)
    fill = _canonical_signs(xp, matmul(xp, c, sel))
    return xp.where(null[..., None, :], fill, q)


def _eigenbasis(xp: Any, factor: Any) -> Any:
    """Eigenvectors of a PSD factor, columns by descending eigenvalue (spec 4.2, first call).

    **Deviation from the release:** the released code keeps whatever basis LAPACK returns inside the null
    space of the factor. For any non-square gradient one factor is rank-deficient (``G G^T`` has rank
    ``<= m < n``), and that basis is not deterministic: torch's ``eigh`` and NumPy's differ by O(1) there.
    The trajectory depends on it, because ``V`` (the EMA of ``r c^T``) and ``Gamma`` are elementwise in the
    rotated basis, and later gradients are not confined to the first gradient's range. Here the null
    columns (eigenvalue ``<= 4 n eps max``, see ``NULL_TOL_FACTOR``) are replaced by a canonical basis of
    the null space (``_canonical_null_basis``), so every backend gets the same basis; in the full-rank
    case nothing changes.
    """
    w, q = xp.linalg.eigh(factor + EIGH_RIDGE * _eye_like(xp, factor))
    w, q = xp.flip(w, axis=-1), xp.flip(q, axis=-1)
    q = _canonical_signs(xp, q)
    return _canonical_null_basis(xp, q, _null_mask(xp, w, EIGH_RIDGE))


def _permutation(xp: Any, order: Any, dtype: Any) -> Any:
    """Matrix ``P`` with ``(Q P)[:, j] = Q[:, order[j]]`` (a gather written as a matmul)."""
    k = order.shape[-1]
    rows = xp.arange(k, device=_device(order))
    return xp.astype(rows[:, None] == order[..., None, :], dtype)


def _refresh_basis(xp: Any, factor: Any, q: Any, v: Any, axis: int) -> tuple:
    """SOAP maintenance: sort by estimated eigenvalues, permute Q and V's axis, one power step + QR.

    Then the columns whose estimated eigenvalue ``diag(Q^T L Q)`` (after the QR) is round-off,
    ``<= 4 n eps max`` (``NULL_TOL_FACTOR``), are replaced by the canonical basis of their span
    (``_canonical_null_basis``; not in the release, which keeps the QR's noise columns). Extra cost per
    refreshed side: one ``eigh`` and six ``n x n`` matmuls, every ``precondition_frequency`` steps.
    """
    est = xp.sum(q * matmul(xp, factor, q), axis=-2)  # diag(Q^T L Q)
    order = xp.argsort(-est, axis=-1, stable=True)
    perm = _permutation(xp, order, q.dtype)
    q = matmul(xp, q, perm)
    v = matmul(xp, _mT(xp, perm), v) if axis == -2 else matmul(xp, v, perm)
    q, r = xp.linalg.qr(matmul(xp, factor, q))
    d = xp.linalg.diagonal(r)
    q = q * xp.where(d < 0, -1 + 0 * d, 1 + 0 * d)[..., None, :]
    # Columns whose estimated eigenvalue is round-off (QR of a rank-deficient L Q) are LAPACK noise:
    # replace them with the canonical null basis (deviation from the release, see ``_eigenbasis``).
    est = xp.sum(q * matmul(xp, factor, q), axis=-2)
    return _canonical_null_basis(xp, q, _null_mask(xp, est)), v


def deva_sinf_init(xp: Any, g: Any, max_precond_dim: int = 10000) -> dict:
    """Zero state for a matrix (or stack) shaped like ``g``: nothing is factored until the seed.

    Returns:
        A dict with ``L``, ``R``, ``QL``, ``QR`` (``None`` on a side larger than
        ``max_precond_dim``), ``exp_avg`` (momentum, rotated basis), ``exp_avg_sq`` (``V``, EMA of
        ``r c^T`` in the rotated basis) and ``gamma`` (the diagnostic ``Gamma``, init 1).
    """
    n, m = g.shape[-2], g.shape[-1]
    batch = tuple(g.shape[:-2])
    dev = _device(g)

    def sq(k: int) -> Any:
        return xp.zeros((*batch, k, k), dtype=g.dtype, device=dev) if k <= max_precond_dim else None

    return {
        "L": sq(n),
        "R": sq(m),
        "QL": sq(n),
        "QR": sq(m),
        "exp_avg": xp.zeros_like(g),
        "exp_avg_sq": xp.zeros_like(g),
        "gamma": xp.ones_like(g),
    }


def deva_sinf_seed(xp: Any, state: dict, g: Any, shampoo_beta: Any) -> dict:
    """First call: ``L = (1-b_s) G G^T``, ``R = (1-b_s) G^T G``, eigenbases by descending eigenvalue.

    The parameter does not move on this call (spec 4.2). Inside a factor's null space (one side of any
    non-square ``G`` is rank-deficient) the basis is the canonical one of ``_canonical_null_basis``, not
    LAPACK's arbitrary one as in the release, so every backend seeds the same basis (see ``_eigenbasis``).
    """
    out = dict(state)
    if state["L"] is not None:
        out["L"] = (1 - shampoo_beta) * matmul(xp, g, _mT(xp, g))
        out["QL"] = _eigenbasis(xp, out["L"])
    if state["R"] is not None:
        out["R"] = (1 - shampoo_beta) * matmul(xp, _mT(xp, g), g)
        out["QR"] = _eigenbasis(xp, out["R"])
    out["exp_avg"] = 0 * state["exp_avg"]
    out["exp_avg_sq"] = 0 * state["exp_avg_sq"]
    return out


def deva_sinf_update(
    xp: Any,
    state: dict,
    g: Any,
    step_factor: Any,
    *,
    beta1: Any,
    beta2: Any,
    shampoo_beta: Any,
    eps: Any,
    refresh: bool,
    nesterov: bool = True,
    normalize_grads: bool = False,
    scale: float = 1.0,
    ns_steps: int = 5,
    ns_coefficients: Any = "quintic",
    ns_dtype: Any = None,
) -> tuple:
    """One DeVA_Sinf step after the seed (``DeVASchattenNorm.step``, spec 4.2 steps 1-14).

    1. ``G~ = Q_L^T G Q_R``; 3. ``M~ <- b1 M~ + (1-b1) G~``;
    4. ``r_i = ||M~_{i,:}||``, ``c_j = ||M~_{:,j}||``; 5. ``V <- b2 V + (1-b2) r c^T``;
    6. ``N = (1-b1) G~ + b1 M~`` (Nesterov) or ``M~``; 7. ``O = msign(N)`` by Newton-Schulz with the
    DeVA repo's Schatten-8 first-step normalisation; 8. ``Gamma_ij = sqrt(r_i c_j)/sqrt(V_ij + eps)``;
    9. ``U = 0.2 sqrt(max(n, m)) (O * Gamma)``; 11. ``dW = Q_L U Q_R^T`` (optionally RMS-normalised);
    14. ``L <- b_s L + (1-b_s) G G^T``, same for R; on refresh steps sort by estimated eigenvalue
    (permuting V), one power iteration + QR, and re-express the momentum in the new basis (V is only
    permuted, SOAP's approximation). QR columns whose estimated eigenvalue is round-off (a rank-deficient
    factor) are replaced by the canonical null-space basis (not in the release; see ``_refresh_basis``).

    The momentum is carried back and forth between bases only on refresh steps (the released code
    does it every step; without a refresh the round trip is the identity up to round-off).

    Args:
        xp: array namespace.
        state: from ``deva_sinf_init`` / ``deva_sinf_seed``.
        g: gradient ``(..., n, m)``.
        step_factor: ``sqrt(1 - b2^k)/(1 - b1^k)`` when ``correct_bias`` else 1 (host scalar).
        beta1, beta2, shampoo_beta, eps: hyperparameters (``shampoo_beta`` already resolved).
        refresh: this is a ``k % precondition_frequency == 0`` step.
        nesterov, normalize_grads, ns_steps, ns_coefficients, ns_dtype: options.
        scale: the shape scale of ``O * Gamma`` (``core.directions.shape_scale`` of the
            ``shape_scale`` hyperparameter in the adapter's fan layout; 0.2 sqrt(max(n, m)) by default).

    Returns:
        ``(delta, new_state)`` where the parameter update is ``W <- (W - lr * delta)(1 - lr wd)``
        (see ``deva_sinf_apply``).

    References:
        arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation ``DeVASchattenNorm``; SOAP (Vyas et
        al. 2024) for the preconditioner maintenance; spec 4.2.
    """
    ql, qr = state["QL"], state["QR"]
    g_rot = _rotate(xp, g, ql, qr)
    m_rot = ema(xp, state["exp_avg"], g_rot, beta1)
    r = xp.sqrt(xp.sum(m_rot * m_rot, axis=-1))
    c = xp.sqrt(xp.sum(m_rot * m_rot, axis=-2))
    rc = r[..., :, None] * c[..., None, :]
    v = beta2 * state["exp_avg_sq"] + (1 - beta2) * rc
    n_in = (1 - beta1) * g_rot + beta1 * m_rot if nesterov else m_rot
    o = newton_schulz(
        xp, n_in, steps=ns_steps, coefficients=ns_coefficients, prenorm="schatten8", eps=1e-20, compute_dtype=ns_dtype
    )
    gamma = xp.sqrt(rc) / xp.sqrt(v + eps)
    u = scale * (o * gamma)
    dw = _unrotate(xp, u, ql, qr)
    if normalize_grads:
        rms = xp.sqrt(xp.mean(dw * dw, axis=(-2, -1), keepdims=True))
        dw = dw / xp.where(rms > 0, rms, 1 + 0 * rms)

    out = dict(state)
    out["gamma"] = gamma
    if ql is not None:
        out["L"] = shampoo_beta * state["L"] + (1 - shampoo_beta) * matmul(xp, g, _mT(xp, g))
    if qr is not None:
        out["R"] = shampoo_beta * state["R"] + (1 - shampoo_beta) * matmul(xp, _mT(xp, g), g)
    if refresh and (ql is not None or qr is not None):
        m_orig = _unrotate(xp, m_rot, ql, qr)
        if ql is not None:
            ql, v = _refresh_basis(xp, out["L"], ql, v, axis=-2)
        if qr is not None:
            qr, v = _refresh_basis(xp, out["R"], qr, v, axis=-1)
        out["QL"], out["QR"] = ql, qr
        m_rot = _rotate(xp, m_orig, ql, qr)
    out["exp_avg"] = m_rot
    out["exp_avg_sq"] = v
    return step_factor * dw, out


def deva_sinf_options(hp: dict) -> dict:
    """The static switches of ``deva_sinf_update`` taken from validated hyperparameters (one place for every caller)."""
    return {k: hp[k] for k in ("nesterov", "normalize_grads", "ns_steps", "ns_coefficients", "ns_dtype")}


def deva_sinf_host_step(xp: Any, state: dict, g: Any, hp: dict, t: int, scale: float) -> tuple:
    """Step ``t`` (a host int, ``t >= 1``) of DeVA_Sinf: the seed at ``t = 1``, then ``deva_sinf_update``.

    Returns:
        ``(delta, new_state)``; ``delta`` is ``None`` on the seed call (the parameter does not move), else apply
        it with ``deva_sinf_apply``. Step ``k = t - 1`` refreshes the bases when ``k % precondition_frequency == 0``.
    """
    sb = resolve_shampoo_beta(hp)
    if t == 1:
        return None, deva_sinf_seed(xp, state, g, sb)
    k = t - 1
    return deva_sinf_update(
        xp,
        state,
        g,
        deva_sinf_step_factor(hp, k),
        beta1=hp["beta1"],
        beta2=hp["beta2"],
        shampoo_beta=sb,
        eps=hp["eps"],
        refresh=k % hp["precondition_frequency"] == 0,
        scale=scale,
        **deva_sinf_options(hp),
    )


def deva_sinf_apply(xp: Any, p: Any, delta: Any, lr: Any, weight_decay: Any) -> Any:
    """``W <- W - lr * delta`` then ``W <- W - lr wd W`` (decay *after* the step, base lr)."""
    return (p - lr * delta) * (1 - lr * weight_decay)


def deva_sinf_step_factor(hp: dict, k: Any, ops: Any = HOST) -> Any:
    """``sqrt(1 - b2^k)/(1 - b1^k)`` (SOAP's bias correction) or 1; ``k >= 1`` counts real steps."""
    if not hp["correct_bias"]:
        return 1.0
    return ops.sqrt(bias_correction(hp["beta2"], k)) / bias_correction(hp["beta1"], k)


def resolve_shampoo_beta(hp: dict) -> Any:
    """``shampoo_beta < 0`` means "use beta2" (the release's -1 default); a traced value is used as given."""
    sb = hp["shampoo_beta"]
    value = concrete(sb)
    return hp["beta2"] if value is not None and value < 0 else sb


def _deva_sinf_check(hp: dict) -> None:
    ns_check("DeVASinf", hp)


DEVA_SINF = MatrixSpec(
    name="deva_sinf",
    title="DeVASinf",
    hyperparams=(
        lr_hyper(3e-3),
        beta_hyper("beta1", 0.95, "momentum (kept in the rotated basis)"),
        beta_hyper("beta2", 0.95, "decay of V = EMA(r c^T)"),
        Hyper("shampoo_beta", -1.0, "beta_or_negative", "decay of the Kronecker factors L, R; < 0 means beta2"),
        eps_hyper(1e-8, "added to V inside the sqrt of Gamma"),
        wd_hyper(0.01, "decoupled decay W - lr wd W *after* the step, base lr (as released)"),
        Hyper("precondition_frequency", 10, "int_pos", "refresh the eigenbases every f steps"),
        Hyper("max_precond_dim", 10000, "int_pos", "sides larger than this keep an identity rotation"),
        Hyper("correct_bias", True, "bool", "step = lr sqrt(1 - b2^k)/(1 - b1^k) (SOAP convention)"),
        Hyper("nesterov", True, "bool", "msign of (1 - b1) G~ + b1 M~"),
        Hyper("normalize_grads", False, "bool", "divide dW by its RMS"),
        Hyper("shape_scale", "match_rms_adamw", "choice", "scale of O*Gamma (release: 0.2 sqrt(max(n, m)))", SHAPE_SCALES),
        *NS_HYPERS,
    ),
    fallback="deva_linf",
    fallback_defaults={},
    conventions="first call seeds L, R, Q without moving W; Gamma = sqrt(r c^T)/sqrt(V + eps); U = 0.2 sqrt(max(n,m)) msign(N)*Gamma; step lr sqrt(bc2)/bc1; decay after the step; refresh every f steps (power iteration + QR)",
    source="arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation DeVASchattenNorm (released code; SOAP maintenance)",
    check=_deva_sinf_check,
)
