"""A rule added from outside the package is tested by xpoptim's own generic suites, with nothing but the user's file.

``python -m pytest --xpoptim-rules examples/lion.py`` imports the file before collection (``tests/conftest.py``);
every suite that runs "each optimizer" reads the registry (``tests/registry_cases.py``), so Lion gets trajectory
tests against the reference it registers on every array backend, the torch adapter's paths, the optax adapter
and the NumPy adapter. Here a representative subset runs in a child process (the registry of this process stays the
built-in one) and its per-test results are read from a JUnit report. ``nox -s extension`` runs every generic suite
on Lion.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: One test per suite kind: core trajectories against the registered reference (float64 and float32, every
#: backend), the NumPy adapter against the core, the torch adapter against the core, optax against the core and the
#: reference, the optax inject_hyperparams contract and mixed dtypes, and a run moved torch -> JAX -> NumPy -> torch
#: through portable state files.
SUBSET = [
    "tests/core/test_core_trajectories.py::test_float64_trajectory_matches_reference",
    "tests/core/test_core_trajectories.py::test_float32_trajectory_within_measured_bound",
    "tests/array_adapter/test_array_trajectories.py::test_trajectory_matches_core",
    "tests/torch_adapter/test_torch_trajectories.py::test_trajectory_equals_core_functional",
    "tests/optax_adapter/test_optax_core_parity.py::test_elementwise_trajectory_matches_core_and_reference",
    "tests/optax_adapter/test_optax_contract.py::test_inject_hyperparams_equivalence",
    "tests/optax_adapter/test_optax_contract.py::test_mixed_dtypes",
    "tests/portable/test_portable_continuation.py::test_torch_jax_numpy_torch_continues_the_run",
]

#: A rule without a float64 reference: the suites that compare against one must say so, not pass silently.
NO_REFERENCE_RULE = textwrap.dedent(
    '''
    from xpoptim.core import ElementwiseSpec, beta_hyper, lr_hyper, register, wd_hyper

    def signum_direction(xp, g, exp_avg, beta):
        m = beta * exp_avg + (1 - beta) * g
        return xp.sign(m), m

    register(ElementwiseSpec(
        name="signum_noref", title="SignumNoRef",
        hyperparams=(lr_hyper(1e-3), beta_hyper("beta", 0.9, "momentum"), wd_hyper(0.0)), state=("exp_avg",),
        scalars=lambda hp, t, ops=None: {"beta": hp["beta"]}, direction=signum_direction, weight_decay="decoupled",
        conventions="sign of an EMA of the gradient", source="a test rule",
    ))
    '''
)


#: A rule without state (signSGD, Bernstein et al. 2018: ``p <- p - lr sign(g)``), with its float64 reference: the
#: adapters keep nothing per element for it but its step count.
STATELESS_RULE = textwrap.dedent(
    '''
    import numpy as np
    from xpoptim.core import ElementwiseSpec, lr_hyper, register, wd_hyper
    from xpoptim.core.verification import Verification

    def signsgd_reference(theta0, grad_fn, steps, hp, *, maximize=False, layout="out_in"):
        p = np.array(theta0, dtype=np.float64)
        out = [p.copy()]
        for t in range(1, steps + 1):
            g = np.asarray(grad_fn(p.copy(), t), dtype=np.float64)
            g = -g if maximize else g
            p = p - hp["lr"] * (np.sign(g) + hp["weight_decay"] * p)
            out.append(p.copy())
        return np.stack(out)

    register(ElementwiseSpec(
        name="signsgd_stateless", title="SignSGDStateless", hyperparams=(lr_hyper(1e-3), wd_hyper(0.0)), state=(),
        scalars=lambda hp, t, ops=None: {}, direction=lambda xp, g: (xp.sign(g),), weight_decay="decoupled",
        conventions="sign of the gradient, no state", source="Bernstein et al. 2018, signSGD",
        verification=Verification(hp={"lr": 1e-2, "weight_decay": 1e-2}, reference=signsgd_reference),
    ))
    '''
)


def _run(tmp_path: pathlib.Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.xml"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XPOPTIM_RULES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    results: dict = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
                    results.setdefault(f"{outcome}-messages", []).append(child.get("message", ""))
            results.setdefault(outcome, []).append(case.get("name"))
    return proc, results


def test_the_generic_suites_run_on_a_rule_registered_from_a_user_file(tmp_path):
    rule = tmp_path / "signum_noref.py"
    rule.write_text(NO_REFERENCE_RULE)
    stateless = tmp_path / "signsgd_stateless.py"
    stateless.write_text(STATELESS_RULE)
    proc, res = _run(tmp_path, "--xpoptim-rules", "examples/lion.py", "--xpoptim-rules", str(rule),
                     "--xpoptim-rules", str(stateless), "-k", "lion or signum_noref or signsgd_stateless", *SUBSET)
    out = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "xpoptim user rules: lion, signum_noref, signsgd_stateless" in proc.stdout, out
    assert proc.returncode == 0, out
    assert not res.get("failure") and not res.get("error"), out
    lion = [n for n in res.get("passed", []) if "lion" in n]
    # float64 + float32 core trajectories on every installed backend, both structures of the NumPy adapter on each
    # array namespace, torch, optax parity, optax inject: at least one of each kind ran and passed.
    for test in SUBSET:
        kind = test.rsplit("::", 1)[1]
        assert any(n.startswith(kind) for n in lion), (kind, out)
    assert len(lion) >= 12, (len(lion), out)
    # The rule without a reference: its adapter tests run against the core, its reference comparisons are skipped
    # with the reason.
    noref_passed = [n for n in res.get("passed", []) if "signum_noref" in n]
    noref_skipped = [n for n in res.get("skipped", []) if "signum_noref" in n]
    assert any(n.startswith("test_trajectory_equals_core_functional") for n in noref_passed), out
    assert any(n.startswith("test_float64_trajectory_matches_reference") for n in noref_skipped), out
    assert any("registers no independent float64 reference" in m for m in res.get("skipped-messages", [])), out
    # The rule without state: every suite of the subset ran and passed (its reference included).
    stateless_passed = [n for n in res.get("passed", []) if "signsgd_stateless" in n]
    for test in SUBSET:
        kind = test.rsplit("::", 1)[1]
        assert any(n.startswith(kind) for n in stateless_passed), (kind, out)


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "no such file"), ("x = 1\n", "registered no new optimizer")],
    ids=["missing-file", "registers-nothing"],
)
def test_a_rule_file_that_registers_nothing_is_a_usage_error(tmp_path, content, match):
    rule = tmp_path / "rule.py"
    if content is not None:
        rule.write_text(content)
    proc, _ = _run(tmp_path, "--xpoptim-rules", str(rule), "--collect-only", "tests/examples/test_lion.py")
    assert proc.returncode != 0
    assert match in proc.stderr + proc.stdout, proc.stderr[-2000:]
