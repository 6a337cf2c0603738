"""DeVA_Sinf's Kronecker eigenbases are the same on every backend, also for rank-deficient factors.

For a non-square gradient one Kronecker factor (``G G^T`` or ``G^T G``) is rank-deficient, and the basis LAPACK
returns inside its null space is arbitrary (torch's ``eigh`` differs from NumPy's by O(1) there; measured before
the fix: float64 trajectories of 12x5 / 5x12 / 64x32 problems differed by 1.5e-3..4.5e-3 between torch and
NumPy). The trajectory depends on that basis (``V`` is elementwise in the rotated basis), so the core replaces
the null columns with a canonical basis of the null space (``core/deva.py``, ``_canonical_cluster_basis``), at the
seed and after each refresh's QR. The reference (``tests/references/optimizers.py``) implements the same
convention independently (compression of ``D`` onto the null columns, explicit loop).
"""

from __future__ import annotations

import numpy as np
import pytest
from _core_cases import rel_error
from references import run_reference
from references.backends import to_numpy

from xpoptim.core import functional as F
from xpoptim.core import get_spec
from xpoptim.core import deva as D

F64_RTOL = 1e-12  # the library's float64 cross-backend promise (measured: <= 2.5e-15 here)


def _problem(shape, steps, dead_rows=(), seed=0):
    """Noisy quadratic ``g = h (theta - theta*) + noise`` with optional rows that never get a gradient."""
    rng = np.random.default_rng(seed)
    theta0, target = rng.standard_normal(shape), rng.standard_normal(shape)
    h = rng.uniform(0.2, 3.0, size=shape)
    noise = 0.5 * rng.standard_normal((steps, *shape))
    for r in dead_rows:
        h[..., r, :] = 0.0
        noise[..., r, :] = 0.0

    def grad(theta, t):
        return h * (theta - target) + noise[t - 1]

    return theta0, grad


def _run_core(backend, theta0, grad, steps, hp):
    spec = get_spec("deva_sinf")
    hp = spec.validate(**hp)
    p = backend.asarray(theta0, "float64")
    state = F.init(spec, p, hp)
    traj = [theta0]
    for t in range(1, steps + 1):
        g = grad(to_numpy(p), t)
        p, state = F.step(spec, p, backend.asarray(g, "float64"), state, hp, t)
        traj.append(to_numpy(p))
    return np.stack(traj)


# (id, shape, hp, dead rows). f = 2 refreshes at k = 2, 4, 6. With shampoo_beta = 0 the factor is the current
# gradient's alone, so it stays rank-deficient at every refresh and the QR returns noise columns there (without
# the refresh canonicalisation torch and NumPy differ by 5e-3..7.5e-3 on these two).
RANK_DEFICIENT = [
    ("tall", (12, 5), dict(lr=0.01, precondition_frequency=2), ()),
    ("wide", (5, 12), dict(lr=0.01, precondition_frequency=2), ()),
    ("stack", (2, 12, 5), dict(lr=0.01, precondition_frequency=2), ()),
    ("dead-rows", (12, 5), dict(lr=0.01, precondition_frequency=2), (0, 3)),
    ("sb0-tall", (12, 5), dict(lr=0.01, precondition_frequency=2, shampoo_beta=0.0), ()),
    ("sb0-wide-f1", (5, 12), dict(lr=0.01, precondition_frequency=1, shampoo_beta=0.0), ()),
]
STEPS = 7


@pytest.mark.parametrize("cid,shape,hp,dead", RANK_DEFICIENT, ids=[c[0] for c in RANK_DEFICIENT])
def test_rank_deficient_trajectories_agree_across_backends(cid, shape, hp, dead, backend):
    """Every backend's float64 trajectory matches the independent reference to 1e-12 (it was ~1e-3 on torch)."""
    theta0, grad = _problem(shape, STEPS, dead)
    ref = run_reference("deva_sinf", theta0, grad, STEPS, hp)
    err = rel_error(_run_core(backend, theta0, grad, STEPS, hp), ref)
    assert err <= F64_RTOL, f"{cid} on {backend.name}: relative error {err:.2e}"


def test_reference_null_convention_is_not_vacuous():
    """The null-basis convention changes the trajectory: a different (rotated) null basis in the reference
    moves it by far more than round-off, so the agreement above is a real test."""
    theta0, grad = _problem((12, 5), STEPS)
    hp = dict(lr=0.01, precondition_frequency=2)
    a = run_reference("deva_sinf", theta0, grad, STEPS, hp)
    from references import optimizers as R

    fill = R._DevaSinfMatrix._fill_null
    rng = np.random.default_rng(5)

    def rotated(self, Q, null):
        Q = fill(self, Q, null)
        if len(null) > 1:
            W, _ = np.linalg.qr(rng.standard_normal((len(null), len(null))))
            Q = Q.copy()
            Q[:, null] = Q[:, null] @ W
        return Q

    R._DevaSinfMatrix._fill_null = rotated
    try:
        b = run_reference("deva_sinf", theta0, grad, STEPS, hp)
    finally:
        R._DevaSinfMatrix._fill_null = fill
    assert rel_error(b, a) > 1e-4


def _factor(backend, shape, seed=0):
    g = np.random.default_rng(seed).standard_normal(shape)
    return backend.asarray(0.05 * g @ np.swapaxes(g, -1, -2), "float64")


def _orthogonal(rng, k):
    w, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return w


@pytest.mark.parametrize("shape", [(12, 5), (2, 7, 3), (6, 1)])
def test_rotated_null_basis_gives_the_same_canonical_basis(shape, backend):
    """Rotate eigh's null columns by a random orthogonal matrix: the canonical basis does not change."""
    xp = backend.xp
    lf = _factor(backend, shape)
    n, r = shape[-2], shape[-1]
    w, q = xp.linalg.eigh(lf + D.EIGH_RIDGE * xp.eye(n, dtype=lf.dtype))
    w, q = xp.flip(w, axis=-1), D._canonical_signs(xp, xp.flip(q, axis=-1))
    cid = D._clusters(xp, w, D._tau(xp, q))
    null = to_numpy(cid) == np.max(to_numpy(cid), axis=-1, keepdims=True)  # the last cluster: the null space
    assert np.array_equal(null, np.broadcast_to(np.arange(n) >= r, null.shape))
    q_np = to_numpy(q)
    rng = np.random.default_rng(1)
    rot = q_np.copy()
    for idx in np.ndindex(*q_np.shape[:-2]):
        rot[idx][:, r:] = q_np[idx][:, r:] @ _orthogonal(rng, n - r)
    base = to_numpy(D._canonical_cluster_basis(xp, q, cid))
    other = to_numpy(D._canonical_cluster_basis(xp, backend.asarray(rot, "float64"), cid))
    assert np.max(np.abs(base - other)) <= 1e-12
    # and it is the eigenbasis the seed uses
    assert np.max(np.abs(to_numpy(D._eigenbasis(xp, lf)) - base)) <= 1e-12
    # still an orthonormal eigenbasis of the factor
    eye = np.eye(n)
    assert np.max(np.abs(np.swapaxes(base, -1, -2) @ base - eye)) <= 1e-12
    lam = np.swapaxes(base, -1, -2) @ to_numpy(lf) @ base
    assert np.max(np.abs(lam - lam * eye)) <= 1e-12 * np.max(np.abs(lam))


def test_canonical_basis_is_the_same_on_every_backend(backend):
    """The seed basis of a rank-deficient factor equals NumPy's (column signs included)."""
    import array_api_compat.numpy as xnp

    g = np.random.default_rng(3).standard_normal((2, 12, 5))
    lf = 0.05 * g @ np.swapaxes(g, -1, -2)
    ref = D._eigenbasis(xnp, lf)
    out = to_numpy(D._eigenbasis(backend.xp, backend.asarray(lf, "float64")))
    assert np.max(np.abs(out - ref)) <= 1e-12


def test_dead_rows_get_coordinate_vectors(backend):
    """A row with no gradient is a coordinate direction e_i of the null space; the canonical basis keeps it."""
    g = np.random.default_rng(4).standard_normal((6, 3))
    g[1] = 0.0
    g[4] = 0.0
    q = to_numpy(D._eigenbasis(backend.xp, backend.asarray(g @ g.T, "float64")))
    hits = [np.max(np.abs(np.abs(q[:, j]) - np.eye(6)[:, i])) for i in (1, 4) for j in range(3, 6)]
    assert sum(h <= 1e-12 for h in hits) == 2


def test_zero_factor_gives_the_identity(backend):
    """An all-zero seed gradient: every column is null, the canonical basis is the identity (no NaN)."""
    xp = backend.xp
    z = backend.asarray(np.zeros((2, 5, 5)), "float64")
    assert np.array_equal(to_numpy(D._eigenbasis(xp, z)), np.broadcast_to(np.eye(5), (2, 5, 5)))
    q, _ = D._refresh_basis(xp, z, backend.asarray(np.broadcast_to(np.eye(5), (2, 5, 5)).copy(), "float64"),
                            backend.asarray(np.zeros((2, 5, 4)), "float64"), axis=-2)
    assert np.array_equal(to_numpy(q), np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_full_rank_seed_is_plain_eigh(backend):
    """Full-rank factors: no column is null and the basis is eigh's (descending, signs fixed), bit for bit."""
    xp = backend.xp
    lf = _factor(backend, (2, 6, 9))  # 6x6 of rank 6
    w, q = xp.linalg.eigh(lf + D.EIGH_RIDGE * xp.eye(6, dtype=lf.dtype))
    cid = to_numpy(D._clusters(xp, xp.flip(w, axis=-1), D._tau(xp, lf)))
    assert np.array_equal(cid, np.broadcast_to(np.arange(6.0), cid.shape))  # six singleton clusters
    plain = D._canonical_signs(xp, xp.flip(q, axis=-1))
    assert np.array_equal(to_numpy(D._eigenbasis(xp, lf)), to_numpy(plain))
    # and it is NumPy's plain eigh up to column signs, to round-off
    _, qn = np.linalg.eigh(to_numpy(lf))
    qn = qn[..., ::-1]
    qq = to_numpy(plain)
    assert np.max(np.abs(np.abs(np.swapaxes(qq, -1, -2) @ qn) - np.eye(6))) <= 1e-12


def test_full_rank_refresh_is_plain_power_step(backend):
    """Full-rank factor at a refresh: sort, power step, QR, R-diagonal signs, nothing replaced."""
    xp = backend.xp
    rng = np.random.default_rng(6)
    g = rng.standard_normal((7, 9))
    lf = g @ g.T
    q0 = _orthogonal(rng, 7)
    v0 = rng.uniform(size=(7, 9))
    q, v = D._refresh_basis(xp, backend.asarray(lf, "float64"), backend.asarray(q0, "float64"),
                            backend.asarray(v0, "float64"), axis=-2)
    order = np.argsort(-np.einsum("ij,ij->j", q0, lf @ q0), kind="stable")
    qe, re = np.linalg.qr(lf @ q0[:, order])
    qe = qe * np.sign(np.diag(re))
    assert np.max(np.abs(to_numpy(q) - qe)) <= 1e-12
    assert np.array_equal(to_numpy(v), v0[order, :])


def test_seed_and_refresh_trace_under_jax_jit():
    """Fixed shapes only: ``deva_sinf_seed`` and ``deva_sinf_update(refresh=True)`` compile under jax.jit and
    give the eager NumPy numbers (rank-deficient factors on both sides)."""
    jax = pytest.importorskip("jax", reason="needs jax for the jit test")
    jax.config.update("jax_enable_x64", True)
    import array_api_compat.numpy as xnp
    import jax.numpy as jnp

    rng = np.random.default_rng(7)
    g1, g2 = rng.standard_normal((2, 12, 5)), rng.standard_normal((2, 12, 5))
    kw = dict(beta1=0.95, beta2=0.95, shampoo_beta=0.0, eps=1e-8, refresh=True, scale=0.2 * np.sqrt(12))

    def both(xp, a, b):
        st = D.deva_sinf_init(xp, a)
        st = D.deva_sinf_seed(xp, st, a, 0.0)
        delta, st = D.deva_sinf_update(xp, st, b, 1.0, **kw)
        return delta, st["QL"], st["QR"]

    want = both(xnp, g1, g2)
    got = jax.jit(lambda a, b: both(jnp, a, b))(jnp.asarray(g1), jnp.asarray(g2))
    for w, o in zip(want, got):
        assert np.max(np.abs(np.asarray(o) - w)) <= 1e-12 * max(1.0, np.max(np.abs(w)))


def _clustered_factor(n=9, seed=8):
    """``U diag(w) U^T`` with two near-degenerate clusters (relative gaps 1e-13, far below ``tau``)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.array([1.0, 0.6, 0.6 * (1 - 1e-13), 0.6 * (1 - 2e-13), 0.3, 1e-2, 1e-2 + 1e-15, 1e-2 + 3e-15, 0.0])[:n]
    return (u * w) @ u.T, u, w


def test_near_degenerate_clusters_get_one_canonical_basis(backend):
    """Eigenvalues closer than ``tau max|w|`` (not only zeros) are one cluster: a rotated basis inside a cluster gives
    the same columns, on every backend, and the result is still an orthonormal eigenbasis to round-off."""
    xp = backend.xp
    a, _, w = _clustered_factor()
    n = a.shape[0]
    lf = backend.asarray(a, "float64")
    q = to_numpy(D._eigenbasis(xp, lf))
    # clusters {1.0}, {0.6 x3}, {0.3}, {1e-2 x3}, {0}: separated clusters are 1e-2 apart (error ~ eps / 1e-2)
    cid = to_numpy(D._clusters(xp, backend.asarray(np.sort(w)[::-1], "float64"), D.cluster_tolerance(n, np.finfo(np.float64).eps)))
    assert cid.tolist() == [0, 1, 1, 1, 2, 3, 3, 3, 4]
    rng = np.random.default_rng(2)
    rot = q.copy()
    rot[:, 1:4] = q[:, 1:4] @ _orthogonal(rng, 3)
    rot[:, 5:8] = q[:, 5:8] @ _orthogonal(rng, 3)
    again = to_numpy(D._canonical_cluster_basis(xp, backend.asarray(rot, "float64"), backend.asarray(cid, "float64")))
    assert np.max(np.abs(again - q)) <= 1e-12
    import array_api_compat.numpy as xnp

    assert np.max(np.abs(to_numpy(D._eigenbasis(xnp, a)) - q)) <= 1e-12  # the same basis as NumPy's
    assert np.max(np.abs(q.T @ q - np.eye(n))) <= 1e-12
    lam = q.T @ a @ q
    assert np.max(np.abs(lam - np.diag(np.diag(lam)))) <= 1e-12


def test_cluster_tolerance_is_sqrt_n_eps():
    assert D.cluster_tolerance(64, np.finfo(np.float64).eps) == pytest.approx(np.sqrt(64 * np.finfo(np.float64).eps))
    assert D.cluster_tolerance(64, np.finfo(np.float32).eps) == pytest.approx(2.76e-3, rel=1e-2)
    with D.cluster_precision(float(np.finfo(np.float32).eps)):
        import array_api_compat.numpy as xnp

        assert D._tau(xnp, np.eye(64)) == pytest.approx(D.cluster_tolerance(64, np.finfo(np.float32).eps))
    assert D._tau(xnp, np.eye(64)) == pytest.approx(D.cluster_tolerance(64, np.finfo(np.float64).eps))
