"""The adapters' explicit per-optimizer classes and functions are the ones ``python -m xpoptim._codegen`` writes from
the specs (as ``tests/test_readme.py`` checks the README's conventions table): run it after changing a spec."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from xpoptim import _codegen
from xpoptim.core import SPECS, builtin_specs


def test_checked_in_files_match_the_specs(capsys: pytest.CaptureFixture) -> None:
    assert _codegen.main(["--check"]) == 0, capsys.readouterr().out + "\nrun: python -m xpoptim._codegen"


def test_a_changed_spec_is_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A new default in a spec makes the check fail and name the files to regenerate (nothing is written)."""
    spec = SPECS["adamw"]
    lr = next(h for h in spec.hyperparams if h.name == "lr")
    changed = dataclasses.replace(spec, hyperparams=tuple(dataclasses.replace(h, default=2e-3) if h is lr else h for h in spec.hyperparams))
    monkeypatch.setitem(SPECS, "adamw", changed)
    assert _codegen.main(["--check"]) == 1
    out = capsys.readouterr().out
    assert "differs: xpoptim/adapters/_array/classes.py" in out and "differs: xpoptim/adapters/_optax_rules.py" in out


def test_public_names_are_plain_definitions() -> None:
    """``class AdamW`` / ``def adamw`` exist in the source (grep, IDEs and type checkers see them), with the spec's
    defaults in their signatures: every shipped rule (a registered one is made at run time)."""
    shipped = builtin_specs()
    from xpoptim.adapters import array, cupy, numpy

    for spec in shipped:
        for module in (array, numpy, cupy):
            cls = getattr(module, spec.title)
            assert f"class {spec.title}(" in inspect.getsource(cls), (module.__name__, spec.title)
        params = inspect.signature(array.__dict__[spec.title].__init__).parameters
        assert {h.name: params[h.name].default for h in spec.hyperparams} == spec.defaults
    optax_adapter = pytest.importorskip("xpoptim.adapters.optax")
    for spec in shipped:
        fn = getattr(optax_adapter, spec.name)
        assert f"def {spec.name}(" in inspect.getsource(fn), spec.name
