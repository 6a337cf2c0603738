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
#: reference, the optax inject_hyperparams contract.
SUBSET = [
    "tests/core/test_core_trajectories.py::test_float64_trajectory_matches_reference",
    "tests/core/test_core_trajectories.py::test_float32_trajectory_within_measured_bound",
    "tests/array_adapter/test_array_trajectories.py::test_trajectory_matches_core",
    "tests/torch_adapter/test_torch_trajectories.py::test_trajectory_equals_core_functional",
    "tests/optax_adapter/test_optax_core_parity.py::test_elementwise_trajectory_matches_core_and_reference",
    "tests/optax_adapter/test_optax_contract.py::test_inject_hyperparams_equivalence",
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
    proc, res = _run(tmp_path, "--xpoptim-rules", "examples/lion.py", "--xpoptim-rules", str(rule),
                     "-k", "lion or signum_noref", *SUBSET)
    out = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "xpoptim user rules: lion, signum_noref" in proc.stdout, out
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
