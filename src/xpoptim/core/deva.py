"""DeVA: decoupled variance adaptation (Song, Bai, Zhang, Bullins, Gleich, arXiv 2602.06880).

DeVA writes an adaptive step as *(variance-adaptation factor) x (scale-invariant direction)*:
``sign`` in the vector (l_inf) case, ``msign`` (Muon's orthogonalisation) in the spectral (S_inf)
case. **Provenance:** the paper's algorithm boxes could not be read; both rules follow the authors'
released code exactly (Tsedao/Decoupled-Variance-Adaptation ``optimizers/deva.py``, classes
``DeVAEuclideanNorm`` and ``DeVASchattenNorm``, HEAD 2e4d26e), docs/algorithms.md section 4.

**DeVA_Sinf as a well-defined function (departure from the release).** The update is not invariant to the
basis chosen inside a near-degenerate eigenspace of a Kronecker factor (``V`` and ``Gamma`` are elementwise in
the rotated basis), and ``eigh``/``qr`` choose that basis by rounding, differently in every LAPACK. Real
gradients make such eigenspaces common: one factor of a non-square gradient is rank-deficient, and inputs active
in few examples give many tiny, nearly equal eigenvalues. Here the (estimated) eigenvalues are grouped into
clusters wherever consecutive ones differ by at most ``tau max|w|``, ``tau = sqrt(n eps)`` (derived in
:func:`cluster_tolerance`), and each cluster of two or more columns gets a canonical basis of its span
(:func:`_canonical_cluster_basis`), at the seed and after each refresh; the refresh decides its clusters on the
current basis' estimates, orders columns by cluster (keeping their order inside one) and canonicalises the same
clusters after the power step (:func:`_refresh_basis`). Where the release's basis is well defined (eigenvalues
separated by more than ``tau``, full-rank ``L Q``) nothing changes. In float64 (``tau ~ 1e-7``) every backend then computes the same update to round-off on
real gradients, up to ``eps / tau = sqrt(eps / n)`` (the error left on eigenvectors separated by the smallest kept
gap). In float32 (``tau ~ 3e-3``) the basis is also only determined up to the cluster decisions, which rounding
can flip where a gap lies within the estimates' error of ``tau``; ``docs/verification.md`` gives the measured
consequence.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping
from typing import Any

from ._backend import HOST, is_concrete_number, matmul
from .directions import SHAPE_SCALES, newton_schulz, sign
from .moments import bias_correction, ema
from .muon import NS_HYPERS, ns_check
from .spec import ElementwiseSpec, Hyper, HyperKind, MatrixSpec, beta_hyper, concrete, eps_hyper, lr_hyper, wd_hyper
from .verification import SIGN_FLOAT32, Bound, Verification

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
    "deva_sinf_state_init",
    "deva_sinf_state_shapes",
    "deva_sinf_phase",
    "deva_sinf_rule",
    "deva_sinf_apply_step",
    "DEVA_SINF_PHASES",
    "DEVA_SINF",
    "EIGH_RIDGE",
    "cluster_tolerance",
    "cluster_precision",
]


# ----------------------------------------------------------------------------------------------
# DeVA_linf (vector)
# ----------------------------------------------------------------------------------------------


def deva_linf_gamma(xp: Any, m: Any, v: Any, eps: Any, bc1: Any = 1.0, bc2: Any = 1.0) -> Any:
    """DeVA_linf's variance-adaptation factor ``Gamma = |m_hat| / sqrt(v_hat + eps)``.

    Without bias correction (``bc1 = bc2 = 1``, as released) and with ``v = EMA(m^2)``,
    ``Gamma = (1 + eta_m^2)^(-1/2)`` where ``eta_m^2 = EMA(m^2)/m^2 - 1`` is the momentum's own
    relative variance (docs/algorithms.md section 4.1). Also the diagnostic Fig. 2(c-d) of the paper uses.
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
        arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation ``DeVAEuclideanNorm``; docs/algorithms.md section 4.1.
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
        Hyper("nesterov", False, HyperKind.BOOL, "sign of (1 - b1) g + b1 m instead of m"),
        Hyper("second_moment_of", "momentum", HyperKind.CHOICE, "v = EMA(m^2) (release) or EMA(g^2)", ("momentum", "gradient")),
        Hyper("bias_correction", False, HyperKind.BOOL, "bias-correct m and v (not in the release)"),
    ),
    state=("exp_avg", "exp_avg_sq"),
    scalars=_deva_linf_scalars,
    direction=deva_linf_direction,
    arguments={"exp_avg": "m", "exp_avg_sq": "v"},
    conventions="Gamma = |m|/sqrt(v + eps), v = EMA(m^2) of the updated m; eps inside the sqrt; no bias correction (option); decoupled decay before",
    source="arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation DeVAEuclideanNorm (released code; paper box not read)",
    verification=Verification(
        hp={"lr": 1e-2, "weight_decay": 1e-2},
        variants=(
            (
                "nesterov,bc,g2",
                {"lr": 1e-2, "weight_decay": 1e-2, "nesterov": True, "bias_correction": True, "second_moment_of": "gradient"},
            ),
        ),
        float32=SIGN_FLOAT32,
        trajectory_float32=Bound(
            1e-5,
            "measured max 3.4e-6 over 10 seeds; Gamma = |m|/sqrt(v + eps) with v ~ (1 - b2) m^2 early: 1/sqrt(1 - b2)"
            " ~ 31 amplifies the relative error of the first steps",
        ),
    ),
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


def cluster_tolerance(n: int, dtype_eps: float) -> float:
    """Relative eigen-gap ``tau = sqrt(n eps)`` below which eigenvectors are treated as one cluster.

    Derivation. ``eigh`` (and the QR of the refresh) is backward stable: it returns the exact eigenvectors of
    ``A + E`` with ``||E|| <= p(n) eps ||A||``, ``p(n) ~ n`` for Householder tridiagonalisation. By Davis-Kahan, the
    invariant subspace of a group of eigenvalues separated from the rest of the spectrum by a gap ``delta`` is then
    computed with an angle error ``<= ||E|| / delta``; two backends (two LAPACKs, two roundings) can differ by that
    much, and *inside* a group the individual vectors are not determined at all once their own gaps are
    ``<~ ||E||``. Grouping eigenvalues whose consecutive gaps are ``<= tau ||A||`` and giving each group a canonical
    basis of its span trades two errors: the canonical basis diagonalises ``A`` only up to the group's spread
    (``<= (k-1) tau ||A||``, a modelling error: it is an approximate eigenbasis), while the spans of separated groups
    carry the numerical error ``n eps / tau``. Balancing ``tau = n eps / tau`` gives ``tau = sqrt(n eps)``: float64,
    n = 64: 1.2e-7 (eigenvalues closer than ~1e-7 ||A|| are one cluster; everything the release resolves to better
    than ~1e-9 is kept); float32, n = 64: 2.8e-3.

    Args:
        n: the factor's side.
        dtype_eps: unit round-off of the arithmetic, ``finfo(dtype).eps``.

    Returns:
        ``tau``, relative to ``max_j |w_j|``.
    """
    return math.sqrt(n * float(dtype_eps))


def _clusters(xp: Any, w: Any, tau: float) -> Any:
    """Cluster index of each column, from the (estimated) eigenvalues ``w`` (``(..., n)``, any order).

    Sorted descending, ``w_(1) >= ... >= w_(n)``; a new cluster starts where ``w_(i-1) - w_(i) > tau max|w|``. The
    returned ids (floats ``0, 1, ...``, by descending eigenvalue) are computed by comparisons and sums only (no
    matmul, so TF32-like matmul modes cannot change them): ``id_j = sum_i start_i [w_(i) >= w_j]``.
    """
    ws = xp.flip(xp.sort(w, axis=-1), axis=-1)  # descending
    scale = xp.max(xp.abs(w), axis=-1, keepdims=True)
    start = xp.astype(ws[..., :-1] - ws[..., 1:] > tau * scale, w.dtype)  # start_i for i = 1..n-1
    above = xp.astype(ws[..., 1:, None] >= w[..., None, :], w.dtype)  # [w_(i) >= w_j], i = 1..n-1
    return xp.sum(start[..., :, None] * above, axis=-2)


def _canonical_cluster_basis(xp: Any, q: Any, cid: Any) -> Any:
    """Replace the columns of every cluster of size >= 2 with a canonical orthonormal basis of the cluster's span.

    The span of a cluster's columns is well determined (the cluster is separated from the rest of the spectrum by
    more than ``tau``, see :func:`cluster_tolerance`), the basis inside it is not: ``eigh`` and ``qr`` return whatever
    their LAPACK's rounding produced (torch and NumPy differ), and the DeVA_Sinf trajectory depends on it (``V`` and
    ``Gamma`` are elementwise in the rotated basis). For a cluster with columns ``Q_C`` the canonical basis is the
    eigenvectors of ``Q_C^T D Q_C`` (the compression of ``D = diag(sqrt(1 + j/n))`` onto the span), mapped back,
    ``Q_C W_C``: independent of the basis ``Q_C`` (for ``Q_C R``, ``R`` orthogonal, the eigenvectors are ``R^T W_C``),
    in ascending order of the Rayleigh quotient of ``D``, each with a canonical sign (:func:`_canonical_signs`). ``D``
    has fixed distinct entries in ``[1, sqrt 2]``, concave in ``j`` so that pair sums such as ``d_a + d_b`` rarely
    coincide (the null space of duplicated rows is spanned by ``e_a - e_b``); a coordinate direction ``e_i`` inside a
    cluster's span (a dead row) is itself one of these eigenvectors.

    All clusters at once with fixed shapes (safe under ``jax.jit``): the columns are sorted by cluster (a
    permutation ``P``), ``B = (QP)^T D (QP)`` is masked to its same-cluster blocks (exact zeros elsewhere, contiguous
    blocks), and one ``eigh`` of that block-diagonal matrix returns each block's eigenvectors supported on its own
    rows (Householder reflectors of a block-diagonal matrix keep the zeros exactly and the tridiagonal solver splits
    at the zero couplings, so no block's error depends on another's). Each eigenvector's block is read off its
    support, the vectors are grouped by block (ascending eigenvalue inside), and ``P^T`` puts the ``i``-th vector of
    a cluster in the cluster's ``i``-th column. No shift separates the blocks: a shift ``s`` would raise the
    backward error of ``eigh`` to ``eps (sqrt 2 + s)`` against within-block gaps of ``~0.4 / k``. Singleton columns
    keep ``q`` bit for bit (an isolated eigenvector is determined up to its sign). Cost: one ``eigh`` and four
    ``n x n`` matmuls.

    Args:
        xp: array namespace.
        q: ``(..., n, n)`` matrix with orthonormal columns.
        cid: ``(..., n)`` cluster id of each column (:func:`_clusters`).

    Returns:
        ``q`` with the columns of multi-column clusters replaced.
    """
    n = q.shape[-1]
    dt = q.dtype
    dev = _device(q)
    d = xp.sqrt(1 + xp.arange(n, dtype=dt, device=dev) / n)
    perm = _permutation(xp, xp.argsort(cid, axis=-1, stable=True), dt)  # columns by (cluster, position)
    qs = matmul(xp, q, perm)
    cs = matmul(xp, cid[..., None, :], perm)[..., 0, :]  # cluster ids, sorted (small integers: exact)
    same = cs[..., :, None] == cs[..., None, :]
    b = matmul(xp, _mT(xp, qs) * d, qs)  # (QP)^T D (QP)
    _, w = xp.linalg.eigh(xp.where(same, (b + _mT(xp, b)) / 2, 0 * b))
    block = xp.round(xp.sum(w * w * cs[..., :, None], axis=-2))  # the block each eigenvector lives in
    w = matmul(xp, w, _permutation(xp, xp.argsort(block, axis=-1, stable=True), dt))
    fill = matmul(xp, matmul(xp, qs, w), _mT(xp, perm))
    multi = xp.sum(xp.astype(cid[..., :, None] == cid[..., None, :], dt), axis=-1) > 1
    return xp.where(multi[..., None, :], _canonical_signs(xp, fill), q)


#: The unit round-off the cluster test assumes when it must be coarser than the arithmetic's (see
#: :func:`cluster_precision`); ``None``: the factors' own dtype.
_CLUSTER_EPS: contextvars.ContextVar[float | None] = contextvars.ContextVar("deva_cluster_eps", default=None)


@contextlib.contextmanager
def cluster_precision(dtype_eps: float | None) -> Iterator[None]:
    """Within the block, the cluster test uses ``tau = cluster_tolerance(n, max(eps(dtype), dtype_eps))``.

    The float32 rule groups eigenvalues at float32's ``tau``; a float64 computation of *that* rule (the
    verifier's reference for a float32 run, on the float32-rounded inputs) runs inside
    ``cluster_precision(numpy.finfo(numpy.float32).eps)``. Host-side only: the tolerance is a Python float read
    when a step is traced or run.

    Args:
        dtype_eps: the unit round-off to assume, or ``None`` for the factors' own.
    """
    token = _CLUSTER_EPS.set(dtype_eps)
    try:
        yield
    finally:
        _CLUSTER_EPS.reset(token)


def _tau(xp: Any, q: Any) -> float:
    """:func:`cluster_tolerance` for the ``(..., n, n)`` basis ``q`` in its dtype (or :func:`cluster_precision`'s)."""
    eps = float(xp.finfo(q.dtype).eps)
    forced = _CLUSTER_EPS.get()
    return cluster_tolerance(q.shape[-1], eps if forced is None else max(eps, float(forced)))


def _canonical_basis(xp: Any, q: Any, w: Any) -> Any:
    """``q`` with every cluster of near-equal (estimated) eigenvalues ``w`` given its canonical basis."""
    return _canonical_cluster_basis(xp, q, _clusters(xp, w, _tau(xp, q)))


def _eigenbasis(xp: Any, factor: Any) -> Any:
    """Eigenvectors of a PSD factor, columns by descending eigenvalue (docs/algorithms.md section 4.2, first call).

    **Deviation from the release:** the released code keeps whatever basis LAPACK returns inside a factor's
    near-degenerate eigenspaces: its null space (one factor of any non-square gradient is rank-deficient) and any
    cluster of eigenvalues closer than ``tau max|w|`` (:func:`cluster_tolerance`; real gradients produce many:
    inputs active in few examples give tiny, nearly equal eigenvalues). That basis is not deterministic (torch's
    ``eigh`` and NumPy's differ by O(1) there), and the trajectory depends on it, because ``V`` (the EMA of
    ``r c^T``) and ``Gamma`` are elementwise in the rotated basis. Here every such cluster gets the canonical basis
    of its span (:func:`_canonical_cluster_basis`), so every backend gets the same basis; with a full-rank factor
    and separated eigenvalues nothing changes.
    """
    w, q = xp.linalg.eigh(factor + EIGH_RIDGE * _eye_like(xp, factor))
    w, q = xp.flip(w, axis=-1), xp.flip(q, axis=-1)
    q = _canonical_signs(xp, q)
    return _canonical_basis(xp, q, w)


def _permutation(xp: Any, order: Any, dtype: Any) -> Any:
    """Matrix ``P`` with ``(Q P)[:, j] = Q[:, order[j]]`` (a gather written as a matmul)."""
    k = order.shape[-1]
    rows = xp.arange(k, device=_device(order))
    return xp.astype(rows[:, None] == order[..., None, :], dtype)


def _refresh_basis(xp: Any, factor: Any, q: Any, v: Any, axis: int) -> tuple:
    """SOAP maintenance: sort by estimated eigenvalues, permute Q and V's axis, one power step + QR.

    The estimates ``diag(Q^T L Q)`` of the current basis are grouped into clusters (:func:`_clusters`, gaps
    ``<= tau max``); the columns are ordered by cluster (descending, as the release orders by estimate), keeping
    their order inside a cluster (the order of estimates closer than ``tau max`` is rounding noise and would
    permute ``V`` differently per backend). After the power step ``Q, R = qr(L Q)`` the columns of each cluster
    span ``span(L q_1..L q_end) minus span(L q_1..L q_start-1)`` (QR keeps nested spans), a well-defined space,
    while the basis QR picks inside it (and with it the individual Rayleigh quotients) is rounding noise wherever
    ``L q_j`` are nearly dependent: each multi-column cluster gets the canonical basis of that span
    (:func:`_canonical_cluster_basis`; not in the release, which keeps the QR's columns). The clusters are decided
    once, on the estimates of the current (well-defined) basis, never on the QR's noise columns. Extra cost per
    refreshed side: one ``eigh`` and five ``n x n`` matmuls, every ``precondition_frequency`` steps.
    """
    est = xp.sum(q * matmul(xp, factor, q), axis=-2)  # diag(Q^T L Q)
    cid = _clusters(xp, est, _tau(xp, q))
    order = xp.argsort(cid, axis=-1, stable=True)
    perm = _permutation(xp, order, q.dtype)
    q = matmul(xp, q, perm)
    cid = matmul(xp, cid[..., None, :], perm)[..., 0, :]  # in the new column order (small integers: exact)
    v = matmul(xp, _mT(xp, perm), v) if axis == -2 else matmul(xp, v, perm)
    q, r = xp.linalg.qr(matmul(xp, factor, q))
    d = xp.linalg.diagonal(r)
    q = q * xp.where(d < 0, -1 + 0 * d, 1 + 0 * d)[..., None, :]
    # Where L q_j is (nearly) dependent on L q_1..L q_(j-1) (a rank-deficient L Q: L's range moved away from the
    # old basis), QR fills position j with a column only rounding decides. |R_jj| = dist(L q_j, span(L q_<j)) is
    # computed to ~eps max|R_ii|, so the test |R_jj| <= tau max|R_ii| is stable; such columns join the last cluster.
    a = xp.abs(d)
    noise = a <= _tau(xp, q) * xp.max(a, axis=-1, keepdims=True)
    last = xp.max(cid, axis=-1, keepdims=True)
    return _canonical_cluster_basis(xp, q, xp.where(noise, last, cid)), v


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

    The parameter does not move on this call (docs/algorithms.md section 4.2). Inside a factor's null space (one side of any
    non-square ``G`` is rank-deficient) and in every cluster of near-equal eigenvalues the basis is the canonical one of ``_canonical_cluster_basis``, not
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
    """One DeVA_Sinf step after the seed (``DeVASchattenNorm.step``, docs/algorithms.md section 4.2 steps 1-14).

    1. ``G~ = Q_L^T G Q_R``; 3. ``M~ <- b1 M~ + (1-b1) G~``;
    4. ``r_i = ||M~_{i,:}||``, ``c_j = ||M~_{:,j}||``; 5. ``V <- b2 V + (1-b2) r c^T``;
    6. ``N = (1-b1) G~ + b1 M~`` (Nesterov) or ``M~``; 7. ``O = msign(N)`` by Newton-Schulz with the
    DeVA repo's Schatten-8 first-step normalisation; 8. ``Gamma_ij = sqrt(r_i c_j)/sqrt(V_ij + eps)``;
    9. ``U = 0.2 sqrt(max(n, m)) (O * Gamma)``; 11. ``dW = Q_L U Q_R^T`` (optionally RMS-normalised);
    14. ``L <- b_s L + (1-b_s) G G^T``, same for R; on refresh steps sort by estimated eigenvalue
    (permuting V), one power iteration + QR, and re-express the momentum in the new basis (V is only
    permuted, SOAP's approximation). Clusters of near-equal estimates, and the QR's noise columns of a
    rank-deficient factor, get a canonical basis of their span (not in the release; see ``_refresh_basis``).

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
        al. 2024) for the preconditioner maintenance; docs/algorithms.md section 4.2.
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
    return deva_sinf_rule(xp, DEVA_SINF_PHASES[deva_sinf_phase(hp, t)], g, state, hp, t, scale)


#: The phases of a DeVA_Sinf step: the first call seeds the factors and bases (the parameter does not move), then
#: plain steps, and a refresh of the eigenbases every ``precondition_frequency`` steps.
DEVA_SINF_PHASES = ("seed", "step", "refresh")


def deva_sinf_phase(hp: Mapping[str, Any], t: Any, ops: Any = HOST) -> Any:
    """Index into :data:`DEVA_SINF_PHASES` of call ``t`` (``t >= 1``): seed at ``t = 1``; step ``k = t - 1``
    refreshes when ``k % precondition_frequency == 0``. ``t`` is a host int, or an int array with ``ops`` its
    namespace (then the index is an array)."""
    f = hp["precondition_frequency"]
    if ops is HOST:
        return 0 if t == 1 else 2 if (t - 1) % f == 0 else 1
    return ops.where(t == 1, 0, ops.where((t - 1) % f == 0, 2, 1))


def _shampoo_beta(hp: Mapping[str, Any], ops: Any) -> Any:
    """:func:`resolve_shampoo_beta`, also for a traced ``shampoo_beta`` (then decided in the graph)."""
    sb = hp["shampoo_beta"]
    if is_concrete_number(sb) or ops is HOST:
        return resolve_shampoo_beta(dict(hp))
    return ops.where(sb < 0, hp["beta2"], sb)


def deva_sinf_rule(xp: Any, phase: str, g: Any, state: Mapping[str, Any], hp: Mapping[str, Any], t: Any, scale: float, ops: Any = HOST) -> tuple:
    """DeVA_Sinf's direction for ``MatrixSpec.direction``: ``(None, seeded state)`` in the seed phase, else
    ``deva_sinf_update`` at ``k = t - 1`` (refreshing the bases in the refresh phase).

    ``t`` is a host int (``ops = HOST``) or a traced float (``ops`` an array namespace: the step factor is then
    computed in the graph and cast to ``g``'s dtype).
    """
    sb = _shampoo_beta(hp, ops)
    if phase == "seed":
        return None, deva_sinf_seed(xp, dict(state), g, sb)
    factor = deva_sinf_step_factor(dict(hp), t - 1, ops)
    if ops is not HOST and hasattr(factor, "dtype"):
        factor = xp.astype(factor, g.dtype)
    return deva_sinf_update(
        xp,
        dict(state),
        g,
        factor,
        beta1=hp["beta1"],
        beta2=hp["beta2"],
        shampoo_beta=sb,
        eps=hp["eps"],
        refresh=phase == "refresh",
        scale=scale,
        **deva_sinf_options(dict(hp)),
    )


def deva_sinf_state_init(xp: Any, like: Any, hp: Mapping[str, Any]) -> dict:
    """``MatrixSpec.init``: :func:`deva_sinf_init` with the spec's ``max_precond_dim``."""
    return deva_sinf_init(xp, like, hp["max_precond_dim"])


def deva_sinf_state_shapes(shape: tuple, hp: Mapping[str, Any]) -> dict:
    """DeVA_Sinf's state layout for an ``(n, m)`` matrix: ``n x n`` / ``m x m`` factors and bases (``None`` on a side
    larger than ``max_precond_dim``), and ``(n, m)`` rotated moments and ``Gamma``."""
    n, m = shape
    mp = hp["max_precond_dim"]

    def sq(k: int) -> tuple | None:
        return (k, k) if k <= mp else None

    return {"L": sq(n), "R": sq(m), "QL": sq(n), "QR": sq(m), "exp_avg": (n, m), "exp_avg_sq": (n, m), "gamma": (n, m)}


def deva_sinf_apply_step(xp: Any, p: Any, delta: Any, lr: Any, weight_decay: Any, scale: float) -> Any:
    """``MatrixSpec.apply``: :func:`deva_sinf_apply` (the shape scale is already in ``delta``)."""
    return deva_sinf_apply(xp, p, delta, lr, weight_decay)


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


#: The verifier's settings: both sides factored (the non-square problems give rank-deficient factors, the replayed
#: digits gradients near-degenerate spectra), a refresh every 4 steps so 20 steps cross four refreshes.
DEVA_SINF_VERIFICATION = Verification(
    hp={"lr": 1e-2, "weight_decay": 1e-2, "precondition_frequency": 4},
    train_lr=2e-2,
    float64=Bound(
        1e-8,
        "float64 with eigh/QR (the Kronecker eigenbases): a backward-stable eigh/QR is exact for A + E, ||E|| ~ eps "
        "||A||, so an eigenvector separated by a gap delta differs between LAPACKs by ~eps ||A|| / delta. Clusters "
        "closer than tau ||A||, tau = sqrt(n eps), get the canonical basis, so delta >= tau ||A|| and the basis (and, "
        "to first order, the update) differs by at most eps / tau = sqrt(eps / n) <= 1.05e-8 for n >= 2.",
    ),
    float32=Bound(
        3e-4,
        "float32 eigh/QR of the Kronecker factors: eigenvector error <= eps / tau = sqrt(eps / n) (1.4e-4 for n = 6, "
        "the smallest factored side of the closed-loop problems), then Newton-Schulz; the float64 reference computes "
        "the float32 rule (same tau).",
    ),
    trajectory_float32=Bound(
        3e-5,
        "measured max 6.6e-6 over 10 seeds against the float32 rule (float32's tau) computed in float64; float32 "
        "eigh/QR of the Kronecker factors, Newton-Schulz (5 matmul rounds per step, each amplifying round-off) and "
        "the sqrt(bc2)/bc1 step factor ~ 4.5 at k = 1",
    ),
)

DEVA_SINF = MatrixSpec(
    name="deva_sinf",
    title="DeVASinf",
    hyperparams=(
        lr_hyper(3e-3),
        beta_hyper("beta1", 0.95, "momentum (kept in the rotated basis)"),
        beta_hyper("beta2", 0.95, "decay of V = EMA(r c^T)"),
        Hyper("shampoo_beta", -1.0, HyperKind.BETA_OR_NEGATIVE, "decay of the Kronecker factors L, R; < 0 means beta2"),
        eps_hyper(1e-8, "added to V inside the sqrt of Gamma"),
        wd_hyper(0.01, "decoupled decay W - lr wd W *after* the step, base lr (as released)"),
        Hyper("precondition_frequency", 10, HyperKind.INT_POS, "refresh the eigenbases every f steps"),
        Hyper("max_precond_dim", 10000, HyperKind.INT_POS, "sides larger than this keep an identity rotation"),
        Hyper("correct_bias", True, HyperKind.BOOL, "step = lr sqrt(1 - b2^k)/(1 - b1^k) (SOAP convention)"),
        Hyper("nesterov", True, HyperKind.BOOL, "msign of (1 - b1) G~ + b1 M~"),
        Hyper("normalize_grads", False, HyperKind.BOOL, "divide dW by its RMS"),
        Hyper("shape_scale", "match_rms_adamw", HyperKind.CHOICE, "scale of O*Gamma (release: 0.2 sqrt(max(n, m)))", SHAPE_SCALES),
        *NS_HYPERS,
    ),
    fallback="deva_linf",
    fallback_defaults={},
    state=("L", "R", "QL", "QR", "exp_avg", "exp_avg_sq", "gamma"),
    init=deva_sinf_state_init,
    state_shapes=deva_sinf_state_shapes,
    direction=deva_sinf_rule,
    apply=deva_sinf_apply_step,
    decay="after",
    direction_includes_scale=True,
    phases=DEVA_SINF_PHASES,
    phase_of=deva_sinf_phase,
    still_phases=("seed",),
    sharding="replicated",
    conventions="first call seeds L, R, Q without moving W; Gamma = sqrt(r c^T)/sqrt(V + eps); U = 0.2 sqrt(max(n,m)) msign(N)*Gamma; step lr sqrt(bc2)/bc1; decay after the step; refresh every f steps (power iteration + QR)",
    source="arXiv 2602.06880; Tsedao/Decoupled-Variance-Adaptation DeVASchattenNorm (released code; SOAP maintenance)",
    check=_deva_sinf_check,
    verification=DEVA_SINF_VERIFICATION,
)
