"""Smoke tests of the paper experiments (``benchmarks/experiments``) in their ``--quick`` mode.

Each script runs at tiny sizes into a temporary folder; the tests check that its figures and Markdown
summary are written and that every claim was evaluated. Exact identities that hold at any size
(factor curves, kappa anchors, the MVN-Grad variance-gap identity, the spike limits) must PASS; the
paper's qualitative findings need the full sizes and are only required to have been checked.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # ``benchmarks`` lives at the repository root, not in the installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")


def _claims(md: Path) -> list[tuple[str, str]]:
    rows = []
    for line in md.read_text().splitlines():
        m = re.match(r"\| (.+?) \| (PASS|FAIL|REPORT \(holds\)|REPORT \(does not hold\)) \|", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


def _run(module: str, tmp_path: Path) -> tuple[int, list]:
    """Run ``module --quick``; check its outputs exist and that it declares every library file it executes."""
    import importlib
    import json

    from benchmarks.experiments._provenance import declared_sources, executed_library_files

    mod = importlib.import_module(f"benchmarks.experiments.{module}")
    rc, executed = executed_library_files(lambda: mod.main(["--quick", "--out", str(tmp_path)]))
    md = tmp_path / f"{module}.md"
    assert md.exists()
    undeclared = executed - set(declared_sources(module))
    assert not undeclared, f"{module} runs functions of {sorted(undeclared)}: add them to its SOURCES"
    record = json.loads((tmp_path / f"{module}.json").read_text())
    assert record["quick"] is True and set(record["sources"]) == set(declared_sources(module))
    return rc, _claims(md)


def test_bvn_cdf_matches_scipy():
    from scipy.stats import multivariate_normal

    from benchmarks.experiments.bh_quadratics import bvn_cdf

    rng = np.random.default_rng(0)
    h, k, r = rng.normal(size=6) * 2, rng.normal(size=6) * 2, rng.uniform(-0.95, 0.95, 6)
    h[0] = 0.0  # the nudged zero
    ref = [multivariate_normal(mean=[0, 0], cov=[[1, ri], [ri, 1]]).cdf([hi, ki]) for hi, ki, ri in zip(h, k, r)]
    np.testing.assert_allclose(bvn_cdf(h, k, r), ref, atol=1e-7)


def test_report_fails_on_strict_claim(tmp_path):
    from benchmarks.experiments._common import Report

    rep = Report("dummy", "dummy", tmp_path, quick=True)
    rep.check("reported", False, "x", strict=False)
    assert rep.finish() == 0
    rep.check("strict", False, "x")
    assert rep.finish() == 1
    assert ("strict", "FAIL") in _claims(tmp_path / "dummy.md")


def test_bh_quadratics_quick(tmp_path):
    rc, claims = _run("bh_quadratics", tmp_path)
    assert (tmp_path / "bh_quadratics.png").exists()
    assert len(claims) == 5 and rc in (0, 1)
    assert claims[0][1] == "PASS"  # noise-free GD >> sign descent holds at any size


def test_bh_factors_quick(tmp_path):
    rc, claims = _run("bh_factors", tmp_path)
    assert rc == 0 and len(claims) == 8
    assert all(s == "PASS" for _, s in claims)


def test_deva_trace_quick(tmp_path):
    rc, claims = _run("deva_trace", tmp_path)
    assert (tmp_path / "deva_trace.png").exists()
    assert len(claims) == 5 and rc in (0, 1)


def test_mvngrad_theory_quick(tmp_path):
    rc, claims = _run("mvngrad_theory", tmp_path)
    assert rc == 0, claims
    assert (tmp_path / "mvngrad_spike.png").exists() and (tmp_path / "mvngrad_lowvar.png").exists()
    strict = [s for _, s in claims if s in ("PASS", "FAIL")]
    assert len(strict) == 5 and all(s == "PASS" for s in strict)


def test_real_data_quick(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("optax")
    pytest.importorskip("sklearn")
    rc, claims = _run("real_data", tmp_path)
    assert rc == 0, claims
    assert (tmp_path / "real_data_digits.png").exists() and (tmp_path / "real_data_digits_test.png").exists()
    assert [s for _, s in claims if s in ("PASS", "FAIL")] == ["PASS"]  # torch == JAX to rounding
    assert len(claims) == 4  # three MVN-Grad REPORT rows


def test_soap_on_diagonal_gradients_is_adam():
    """SOAP's eigenbases of diagonal gradients are signed coordinate axes, so SOAP is Adam there.

    Reference: Adam written here with SOAP's conventions (first call only seeds the preconditioner,
    step ``lr sqrt(1 - b2^k) / (1 - b1^k) m / (sqrt(v) + eps)``), elementwise on the diagonals.
    """
    from benchmarks.experiments.deva_trace import soap_run

    rng = np.random.default_rng(3)
    steps, n = 24, 5  # compare the first half, where the lr schedule factor is 1
    diags = rng.uniform(0.5, 2.0, (steps, 2, n)) * rng.choice([-1.0, 1.0], (steps, 2, n))
    x0 = rng.standard_normal((2, n, n))
    traj = soap_run(x0, lambda x, t: np.stack([np.diag(d) for d in diags[t]]), lambda x: x.copy(), steps,
                    lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, frequency=3)
    x = x0.copy()
    m = np.zeros_like(diags[0])
    v = np.zeros_like(diags[0])
    for t in range(1, steps // 2):  # t = 0 seeds the preconditioner only
        g, k = diags[t], t
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        step = 0.05 * np.sqrt(1 - 0.99**k) / (1 - 0.9**k) * m / (np.sqrt(v) + 1e-8)
        x = x - np.stack([np.diag(s) for s in step])
        # The refreshed bases (QR) are signed permutations up to ~1e-17 off-pattern entries; there v = 0, so
        # those entries pass as 1e-17 / eps = 1e-9, times lr: <= 1e-10 per step off the diagonal.
        np.testing.assert_allclose(traj[t + 1], x, rtol=1e-12, atol=1e-9)


def test_null_basis_keeps_the_range_and_orthonormality():
    """The random null-space basis changes only the null columns and stays orthonormal."""
    from benchmarks.experiments.deva_trace import null_basis

    rng = np.random.default_rng(0)
    g = rng.standard_normal((1, 9, 3)) @ rng.standard_normal((1, 3, 9))  # rank 3
    f = g @ np.swapaxes(g, -1, -2)
    w, q = np.linalg.eigh(f)
    q = q[..., ::-1]
    r = null_basis("random", f, q, [0], 0)
    np.testing.assert_allclose(r[0, :, :3], q[0, :, :3])
    np.testing.assert_allclose(r[0].T @ r[0], np.eye(9), atol=1e-12)
    assert np.abs(r[0, :, 3:] - q[0, :, 3:]).max() > 0.1
    np.testing.assert_allclose(r[0, :, 3:] @ r[0, :, 3:].T, q[0, :, 3:] @ q[0, :, 3:].T, atol=1e-12)  # same span


def test_bh_digits_quick(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    rc, claims = _run("bh_digits", tmp_path)
    assert rc == 0 and (tmp_path / "bh_digits.png").exists()
    assert len(claims) == 6 and all(s.startswith("REPORT") for _, s in claims)


def test_mvngrad_digits_quick(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    rc, claims = _run("mvngrad_digits", tmp_path)
    assert rc == 0 and (tmp_path / "mvngrad_digits_batch.png").exists() and (tmp_path / "mvngrad_digits_grid.png").exists()
    assert len(claims) == 7 and all(s.startswith("REPORT") for _, s in claims)


def test_deva_lr_sweep_quick(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    rc, claims = _run("deva_lr_sweep", tmp_path)
    assert rc == 0 and (tmp_path / "deva_lr_sweep.png").exists()
    assert len(claims) == 4 and all(s.startswith("REPORT") for _, s in claims)


def test_charlm_quick(tmp_path):
    pytest.importorskip("torch")
    rc, claims = _run("charlm", tmp_path)
    assert rc == 0 and (tmp_path / "charlm.png").exists()
    assert len(claims) == 1 and claims[0][1].startswith("REPORT")  # quick: Adam, MVN-Grad, Muon only


def test_charlm_text_is_deterministic_and_split_by_seed():
    from benchmarks.experiments.charlm import make_text

    a, b = make_text(2000, 1), make_text(2000, 2)
    assert a == make_text(2000, 1) and len(a) == 2000 and a != b
    assert set(a) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .")


def test_digits_protocol_split_and_seeds():
    """The split has the stated sizes and uses every image once; tuning and evaluation seeds never overlap."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from benchmarks.experiments import _digits as D

    data = D.load()
    assert tuple(len(data[k][0]) for k in ("train", "val", "test")) == D.SPLIT
    x, _ = load_digits(return_X_y=True)
    joined = np.concatenate([data[k][0] for k in ("train", "val", "test")])
    key = lambda a: sorted(map(tuple, np.round(a, 9)))  # noqa: E731  (the multiset of images)
    assert key(joined) == key(x / 16.0 - 0.5)
    assert not set(D.TUNING_SEEDS) & set(D.EVAL_SEEDS) and len(D.EVAL_SEEDS) >= 8


def test_compare_and_mean_se():
    from benchmarks.experiments._digits import compare, mean_se

    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and abs(se - np.std([1, 2, 3, 4], ddof=1) / 2) < 1e-15
    assert compare([10.0, 10.2, 9.8], [9.0, 9.2, 8.8])[2] == "better"
    assert compare([9.0, 9.2, 8.8], [10.0, 10.2, 9.8])[2] == "worse"
    assert compare([10.0, 11.0, 9.0], [10.1, 11.1, 9.1])[2] == "tie"
