"""The verifier reads each rule's settings and bounds from its spec: a rule registered from outside gets cells."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from xpoptim import matrix as M
from xpoptim.core import SPECS, get_spec
from xpoptim.core.verification import DEFAULT_FLOAT32, DEFAULT_FLOAT64, Bound, Verification, verification_of


@pytest.fixture
def registered():
    """A copy of AdamW under a new name, without verifier settings, added to the registry for one test."""
    spec = dataclasses.replace(get_spec("adamw"), name="adamw_copy", title="AdamWCopy", verification=None)
    SPECS[spec.name] = spec
    try:
        yield spec
    finally:
        del SPECS[spec.name]


def test_a_registered_rule_gets_cells_with_the_default_bounds(registered):
    assert [c.label for c in M.select_configs(["adamw_copy"])] == ["adamw_copy"]
    assert M.TOLERANCES[("adamw_copy", "float64")] == DEFAULT_FLOAT64
    assert M.tolerance("adamw_copy", "float32") == DEFAULT_FLOAT32
    report = M.run(["adamw_copy"], backends="numpy", steps=4, adapters=False, problems=["quadratic"])
    assert len(report.cells) == 2 and report.ok, report.cells
    assert ("adamw_copy", "float32") in dict(M.TOLERANCES) and len(M.TOLERANCES) == 2 * len(SPECS)


def test_spec_settings_drive_rows_and_bounds(registered):
    v = Verification(hp={"lr": 3e-3}, variants=(("tight", {"lr": 1e-3}),), float32=Bound(5e-5, "a tighter float32 bound, for this test"))
    SPECS["adamw_copy"] = dataclasses.replace(registered, verification=v)
    rows = {c.label: dict(c.hp) for c in M.select_configs(["adamw_copy"])}
    assert rows == {"adamw_copy": {"lr": 3e-3}, "adamw_copy[tight]": {"lr": 1e-3}}
    assert M.tolerance("adamw_copy", "float32").bound == 5e-5
    assert M.tolerance("adamw_copy", "float64") == DEFAULT_FLOAT64


def test_every_builtin_rule_has_documented_settings():
    for name, spec in SPECS.items():
        v = verification_of(spec)
        for dtype in ("float64", "float32"):
            assert v.bound(dtype).bound > 0 and len(v.bound(dtype).reason) > 40, (name, dtype)
        spec.validate(**dict(v.hp))
        for _, hp in v.variants:
            spec.validate(**dict(hp))


def test_import_does_not_depend_on_a_table_of_names():
    """Importing the verifier after a rule was registered (as a user's package would) works."""
    code = textwrap.dedent(
        """
        import dataclasses
        import xpoptim.core as core
        spec = dataclasses.replace(core.get_spec("adam"), name="lion_like", title="LionLike", verification=None)
        core.SPECS[spec.name] = spec
        import xpoptim.matrix as M
        print([c.label for c in M.CONFIGS if c.optimizer == "lion_like"], M.tolerance("lion_like", "float32").bound)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['lion_like'] 0.0001"
