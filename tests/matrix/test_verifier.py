"""The verifier (``python -m xpoptim.matrix``): report files, exit status, tolerance policy, and that a wrong rule fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xpoptim import matrix as M
from xpoptim.core import SPECS, get_spec
from xpoptim.core.spec import ElementwiseSpec
from xpoptim.core.verification import verification_of

CELL_KEYS = {"optimizer", "config", "path", "backend", "dtype", "tolerance", "status", "error", "abs_error", "where", "message"}


def test_small_run_writes_wellformed_reports(tmp_path):
    pytest.importorskip("array_api_strict", reason="needs array-api-strict (the second backend of this run)")
    rc = M.main(
        ["--optimizers", "adam,muon", "--backends", "numpy,strict", "--steps", "4", "--out", str(tmp_path), "--no-progress", "--no-variants",
         "--problems", "quadratic,mlp,matrix"]
    )
    assert rc == 0
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert set(data) == {"meta", "cells", "unavailable", "tolerances", "compared", "summary"}
    cells = data["cells"]
    # core on numpy, core on strict, the array adapter on both; two dtypes; two optimizers
    assert {(c["config"], c["path"], c["backend"], c["dtype"]) for c in cells} >= {
        (o, p, b, d) for o in ("adam", "muon") for p in ("core", "array") for b in ("numpy", "array_api_strict") for d in ("float64", "float32")
    } | {(o, "array[op-by-op]", "numpy", d) for o in ("adam", "muon") for d in ("float64", "float32")}
    for c in cells:
        assert CELL_KEYS <= set(c), c
        assert c["status"] == "pass", c
        assert 0 <= c["error"] <= c["tolerance"]
    assert data["summary"] == {"cells": len(cells), "passed": len(cells), "failed": 0, "not_run": 0, "ok": True}
    assert data["meta"]["time_limit"] is None and "not_run" not in data["meta"]
    assert data["meta"]["steps"] == 4 and set(data["meta"]["problems"]) == {"quadratic", "mlp", "matrix"}
    assert {(t["optimizer"], t["dtype"]) for t in data["tolerances"]} == {(o, d) for o in ("adam", "muon") for d in ("float64", "float32")}
    assert all(t["reason"] for t in data["tolerances"])
    md = (tmp_path / "matrix.md").read_text()
    assert md.startswith("# xpoptim equivalence matrix")
    assert "**PASS**" in md
    rows = [line for line in md.splitlines() if line.startswith("| adam |") or line.startswith("| muon |")]
    assert len(rows) == len(cells) + 4 + 4  # one per cell, four per-problem rows, four tolerance-policy rows
    assert "## Tolerance policy" in md and "## Per problem" in md
    for c in cells:  # each cell's error is its worst problem's
        assert set(c["problems"]) == {"quadratic", "mlp", "matrix"}
        assert c["error"] == max(e["error"] for e in c["problems"].values())
        assert c["raw_error"] == max(e["raw_error"] for e in c["problems"].values()) >= c["error"]


def test_cli_entry_point_exit_status(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "xpoptim.matrix", "--optimizers", "sgd", "--backends", "numpy", "--steps", "3", "--no-demo", "--no-adapters", "--no-variants"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "max rel err" in ok.stdout and "sgd" in ok.stdout
    assert "2/2 cells pass" in ok.stdout
    assert "per optimizer (cells passed; worst error / bound per dtype" in ok.stdout
    assert "compared backends: numpy" in ok.stdout and "core " in ok.stdout
    assert "xpoptim.demo" not in ok.stdout + ok.stderr  # the demo runs only with --demo
    version = subprocess.run([sys.executable, "-m", "xpoptim.matrix", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("xpoptim ")
    bad = subprocess.run(
        [sys.executable, "-m", "xpoptim.matrix", "--optimizers", "adam", "--backends", "numpy", "--steps", "3", "--no-demo", "--no-adapters", "--no-variants", "--perturb", "adam"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL adam core/numpy float32" in bad.stdout and "FAIL adam core/numpy float64" in bad.stdout
    usage = subprocess.run([sys.executable, "-m", "xpoptim.matrix", "--backends", "nope", "--no-demo"], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "'nope' is unknown" in usage.stderr


def _scalars_depend_on_t(spec: ElementwiseSpec) -> bool:
    """Whether the rule's step scalars change with t at the verifier's settings. Those that do not are unaffected by
    the off-by-one perturbation: SGD (dampening 0), M-SSD, the -mb rules (no bias correction), DeVA_linf
    (bias_correction=False, as released), and user rules without bias correction (Lion)."""
    hp = spec.validate(**verification_of(spec).hp)
    return spec.rule_scalars(hp, 1) != spec.rule_scalars(hp, 2)


@pytest.mark.parametrize(
    "name", [n for n, s in SPECS.items() if isinstance(s, ElementwiseSpec) and _scalars_depend_on_t(s)]
)
def test_off_by_one_bias_correction_fails_every_dtype(name):
    """A wrong bias correction (step-derived scalars at t + 1) fails in float64 *and* float32."""
    report = M.run([name], backends="numpy", steps=20, adapters=False, variants=False, override={name: M.perturbed(get_spec(name), "step")})
    assert [c["status"] for c in report.cells] == ["FAIL", "FAIL"], report.cells
    assert all(c["error"] > 30 * c["tolerance"] for c in report.cells), report.cells


def test_a_subtle_lr_error_fails_for_every_optimizer():
    """lr 0.1 % too large: the float32 bounds are tight enough to catch it, for every optimizer."""
    override = {n: M.perturbed(s, "lr") for n, s in SPECS.items()}
    report = M.run(None, backends="numpy", dtypes=["float32"], steps=20, adapters=False, variants=False, override=override)
    assert len(report.cells) == len(SPECS)
    passed = [(c["config"], c["error"], c["tolerance"]) for c in report.cells if c["status"] != "FAIL"]
    assert not passed


def test_unperturbed_numpy_float32_passes_at_default_steps():
    """The counterpart of the two tests above: the correct rules pass the same checks."""
    report = M.run(None, backends="numpy", dtypes=["float32"], steps=20, adapters=False, variants=False)
    assert report.ok, [c for c in report.cells if c["status"] != "pass"]


def test_perturbation_kinds():
    with pytest.raises(ValueError, match="kind='step' is invalid for the matrix rule 'muon'"):
        M.perturbed(get_spec("muon"), "step")
    with pytest.raises(ValueError, match="kind='x' is invalid"):
        M.perturbed(get_spec("adam"), "x")
    spec = M.perturbed(get_spec("muon"), "lr")
    assert spec.validate(lr=0.5)["lr"] == pytest.approx(0.5005)


def test_tolerance_policy_is_complete_and_documented():
    for name in SPECS:
        f64, f32 = M.tolerance(name, "float64"), M.tolerance(name, "float32")
        # DeVA_Sinf's float64 bound is derived from its eigen-gap tolerance (eps / tau = sqrt(eps / n) <= 1.05e-8)
        assert f64.bound <= (1.05e-8 if name == "deva_sinf" else 1e-12) and len(f64.reason) > 40
        # at least 3x below a 0.1 % learning-rate error (~1e-3), see the policy's docstring
        assert f64.bound < f32.bound <= 3.4e-4 and len(f32.reason) > 40
    with pytest.raises(ValueError, match="dtype='float16'"):
        M.tolerance("adam", "float16")
    # measured at 20 steps; shorter runs travel less, so the bound scales by 20 / steps
    assert M.tolerance("adam", "float32", 5).bound == pytest.approx(4 * M.tolerance("adam", "float32").bound)
    assert M.tolerance("adam", "float32", 100).bound == M.tolerance("adam", "float32").bound


def test_trajectory_error_locates_the_worst_deviation():
    import numpy as np

    ref = M.Trajectory([{"w": np.zeros((2, 3))}, {"w": np.full((2, 3), 0.5)}, {"w": np.ones((2, 3))}], [0.0, 0.0])
    got = M.Trajectory([{"w": np.zeros((2, 3))}, {"w": np.full((2, 3), 0.5)}, {"w": np.ones((2, 3))}], [0.0, 0.0])
    got.params[2]["w"][1, 2] += 1e-3
    e = M.trajectory_error(got, ref, "toy")
    assert e.error == pytest.approx(1e-3) and (e.param, e.step, e.index) == ("w", 2, (1, 2))
    assert e.where() == "toy/w step 2 index [1, 2]"
    got.params[1]["w"][0, 0] = float("nan")
    assert M.trajectory_error(got, ref).error == float("inf")


def _decay_only(dtype, steps=20, lr=2e-3, wd=1e-2):
    """``p <- p (1 - lr wd) - lr d`` with ``|d| ~ 1e-8`` (a parameter moved by weight decay alone), in ``dtype``."""
    import numpy as np

    rng = np.random.default_rng(0)  # inputs rounded to float32 for both runs, as the verifier's reference does
    p0 = rng.normal(size=(50, 40)).astype(np.float32).astype(dtype)
    ds = [(1e-8 * rng.normal(size=p0.shape)).astype(np.float32).astype(dtype) for _ in range(steps)]
    p, out = p0.copy(), [p0.astype(np.float64)]
    for d in ds:
        p = p * np.asarray(1 - lr * wd, dtype) - np.asarray(lr, dtype) * d
        out.append(p.astype(np.float64))
    return M.Trajectory([{"w": x} for x in out], [])


def test_representation_floor_covers_a_parameter_moved_by_weight_decay_alone():
    """float32 storage of p rounds it by up to eps/2 |p| per step while it travels lr wd |p|: ~3e-3 of the travel
    here, on every backend. The floor accounts for exactly that; a deviation beyond it still counts in full."""
    import numpy as np

    ref, got = _decay_only("float64"), _decay_only("float32")
    ref_stack = np.stack([x["w"] for x in ref.params])
    diff = np.abs(np.stack([x["w"] for x in got.params]) - ref_stack)
    floor = M.representation_floor(ref_stack, "float32")
    assert np.all(diff <= floor)  # the derived floor bounds the storage error
    assert not np.all(diff <= floor / M.ROUNDINGS_PER_STEP)  # one rounding per step would not
    raw = M.trajectory_error(got, ref, "toy")
    assert raw.error > 3e-4  # without it the cell would fail a 1e-4 bound
    assert M.trajectory_error(got, ref, "toy", "float32").error == 0.0
    assert M.trajectory_error(got, ref, "toy", "float32").raw == pytest.approx(raw.error)
    travel = float(np.max(np.abs(ref_stack - ref_stack[0])))
    got.params[20]["w"][3, 4] += 1e-2 * travel  # a real error of 1 % of the travel at the last step
    e = M.trajectory_error(got, ref, "toy", "float32")
    assert (e.step, e.index) == (20, (3, 4))
    # the storage error there (at most the floor, either sign) adds to the injected one before the floor is taken off
    assert 1e-2 - 2 * floor[20, 3, 4] / travel <= e.error <= 1e-2
    # float64 storage: the floor is eps64-sized, nothing of the float32 rounding is excused
    assert M.trajectory_error(got, ref, "toy", "float64").error > 3e-4


def test_bad_arguments_are_refused_with_clear_messages():
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        M.run(["adam"], backends="numpy", steps=0)
    with pytest.raises(ValueError, match="dtypes=.*float16"):
        M.run(["adam"], backends="numpy", dtypes=["float16"])
    with pytest.raises(ValueError, match="optimizers='adamx' is unknown"):
        M.run(["adamx"], backends="numpy")
    with pytest.raises(ValueError, match="problem='nope' is unknown"):
        M.run(["adam"], backends="numpy", problems=["nope"])
    with pytest.raises(ValueError, match="'cuda9' is unknown"):
        M.run(["adam"], backends="numpy,cuda9")


class _Clock:
    """A clock that advances one second at every reading: the time limit is reached after a known number of them."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_time_limit_reports_the_cells_it_did_not_check(monkeypatch):
    monkeypatch.setattr(M, "time", _Clock())
    report = M.run(["sgd", "adam"], backends="numpy", steps=2, adapters=False, variants=False, problems=["quadratic"], time_limit=2.5)
    # sgd's float64 cell starts at t = 2 (before the limit); its float32 cell and everything of adam come after it
    assert [(c["config"], c["dtype"]) for c in report.cells] == [("sgd", "float64")]
    assert report.cells[0]["status"] == "pass"
    assert report.not_run == 3 and report.meta["not_run"] == {"cells": 3, "configs": ["sgd", "adam"]}
    assert not report.ok and not report.failed
    assert report.to_json()["summary"]["not_run"] == 3
    md = M.format_markdown(report)
    assert "**FAIL**, 1 of 1 cells pass; 3 cells not run (time limit 2.5 s)" in md
    assert "## Not run (time limit)" in md and "- `sgd`" in md and "- `adam`" in md


def test_cli_time_limit_fails_and_says_what_was_not_checked(capsys):
    rc = M.main(["--optimizers", "sgd", "--backends", "numpy", "--steps", "2", "--no-progress", "--no-adapters", "--no-variants", "--time-limit", "1e-9"])
    out = capsys.readouterr()
    assert rc == 1
    assert "stopped at the time limit: not checked: sgd\n" in out.err
    assert "no cell was checked" not in out.err  # the selection was not empty: the time ran out
    assert "0/0 cells pass" in out.out and "2 cells not run (time limit 1e-09 s)" in out.out


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_time_limit_must_be_a_positive_number_of_seconds(bad):
    with pytest.raises(ValueError, match=r"time_limit=.* is invalid: expected a finite number of seconds > 0"):
        M.run(["sgd"], backends="numpy", steps=2, time_limit=bad)


def test_adapters_are_checked_when_installed():
    pytest.importorskip("torch", reason="needs torch (the torch.optim adapter)")
    pytest.importorskip("optax", reason="needs jax and optax (the optax adapter)")
    report = M.run(["muon", "msvag_mb"], backends="numpy,torch,jax", steps=4, problems=["matrix", "quadratic"], variants=False)
    paths = {(c["config"], c["path"], c["backend"]) for c in report.cells}
    for opt in ("muon", "msvag_mb"):
        assert {(opt, "torch.optim", "torch-cpu"), (opt, "optax", "jax-cpu"), (opt, "array", "numpy"), (opt, "array.functional", "jax-cpu")} <= paths
    assert report.ok, report.failed


def test_optax_layout_matters():
    """Muon on a non-square matrix: handing optax the torch (out, in) layout untransposed changes the shape scale."""
    pytest.importorskip("optax", reason="needs jax and optax (the optax adapter)")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xpoptim.adapters import optax as xo

    w = np.random.default_rng(0).normal(size=(6, 10))  # torch layout (out, in)
    g = np.random.default_rng(1).normal(size=(6, 10))
    tx = xo.create("muon", lr=0.1, weight_decay=0.0)
    flax = jnp.asarray(w.T)
    upd_ok, _ = tx.update(jnp.asarray(g.T), tx.init(flax), flax)
    upd_wrong, _ = tx.update(jnp.asarray(g), tx.init(jnp.asarray(w)), jnp.asarray(w))
    # same direction, different shape scale sqrt(max(1, fan_out/fan_in)): 1 for (in=10, out=6) vs sqrt(10/6)
    ratio = np.linalg.norm(np.asarray(upd_wrong)) / np.linalg.norm(np.asarray(upd_ok))
    assert ratio == pytest.approx(np.sqrt(10 / 6), rel=1e-6)
    del jax


def test_simple_progress_bar_without_tqdm(capsys):
    bar = M._SimpleBar(4)
    bar.set_postfix_str("adam core/numpy float32")
    bar.update(1)
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "[###############...............] 2/4" in err and "adam core/numpy float32" in err and err.endswith("\n")


@pytest.mark.slow
def test_torch_compiled_path_matches():
    """The torch adapter under torch.compile (compile=True) gives the core's numbers (slow: compiles)."""
    pytest.importorskip("torch", reason="needs torch")
    report = M.run(["adamw", "msvag_mb", "adam_star[erf]"], backends="torch", steps=6, problems=["quadratic"], torch_compile=True)
    assert {c["path"] for c in report.cells} == {"core", "torch.optim", "torch.optim[compile]"}
    assert report.ok, report.failed
