"""A verifier that cannot pass by checking nothing: a named backend that is not installed, and a run with no cell.

"Not installed" is simulated honestly: a subprocess whose import system refuses ``torch`` (as a machine
without torch would), so the real discovery code runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from xpoptim import matrix as M
from xpoptim.testing import assert_backends_agree

_BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError("No module named 'torch'", name="torch")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let torch through")
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XPOPTIM_BACKENDS", None)
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600)


def test_assert_backends_agree_refuses_a_named_backend_that_is_not_installed():
    out = _run(
        """
        from xpoptim.testing import assert_backends_agree
        try:
            assert_backends_agree("mvngrad", backends="numpy,torch", steps=2, adapters=False)
        except ValueError as exc:
            print("REFUSED:", exc)
        else:
            print("RETURNED")
        try:
            assert_backends_agree(lambda xp, dtype, device: [xp.asarray([1.0], dtype=dtype)], backends=["torch"])
        except ValueError as exc:
            print("REFUSED:", exc)
        else:
            print("RETURNED")
        """
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("REFUSED:") for line in lines), out.stdout
    assert "'torch' was named but cannot run here" in lines[0] and "not installed (torch)" in lines[0]


def test_cli_refuses_a_named_backend_that_is_not_installed():
    out = _run(
        """
        import sys
        from xpoptim.matrix import main
        sys.exit(main(["--backends", "torch", "--no-progress", "--optimizers", "sgd", "--steps", "2"]))
        """
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "'torch' was named but cannot run here" in out.stderr and "not installed (torch)" in out.stderr
    assert "cells pass" not in out.stdout


def test_an_unnamed_missing_backend_is_reported_not_fatal():
    """Without a selection, a framework that is absent is listed as not available and the rest runs."""
    out = _run(
        """
        from xpoptim import matrix as M
        r = M.run(["sgd"], steps=2, adapters=False, variants=False, problems=["quadratic"])
        print(sorted(r.compared["backends"]), r.unavailable.get("torch-cpu"))
        """
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "torch-cpu" not in out.stdout.split("]")[0] and "not installed (torch)" in out.stdout


def test_zero_cells_is_not_a_pass(capsys):
    report = M.run([], backends="numpy", steps=2)
    assert report.cells == [] and not report.ok
    assert M.main(["--optimizers", "", "--backends", "numpy", "--no-progress", "--steps", "2"]) == 1
    assert "no cell was checked" in capsys.readouterr().err


def test_report_lists_what_was_compared():
    pytest.importorskip("array_api_strict", reason="needs array-api-strict (the second backend of this run)")
    report = M.run(["adam"], backends="numpy,strict", steps=2, variants=False, problems=["quadratic"])
    assert report.compared["backends"] == ["numpy", "array_api_strict"]
    assert report.compared["paths"]["core"] == ["numpy", "array_api_strict"]
    assert report.compared["paths"]["array"] == ["numpy", "array_api_strict"]
    text = M.format_compared(report)
    assert "compared backends: numpy, array_api_strict" in text and "array[op-by-op]" in text
    assert "## What was compared" in M.format_markdown(report)


def test_assert_backends_agree_with_no_dtype_compares_nothing():
    with pytest.raises(AssertionError, match="nothing was compared"):
        assert_backends_agree(lambda xp, dtype, device: [xp.asarray([1.0], dtype=dtype)], backends="numpy", dtypes=())


def test_digits_without_scikit_learn_says_so():
    """The digits problem needs scikit-learn: named explicitly without it, the run refuses with the reason."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "sklearn":
                    raise ImportError("No module named 'sklearn'", name="sklearn")
                return None

        sys.meta_path.insert(0, Blocker())
        import xpoptim.matrix as M  # importing the verifier needs no scikit-learn
        try:
            M.run(["sgd"], backends="numpy", steps=2, adapters=False, problems=["digits"])
        except ValueError as exc:
            print("REFUSED:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("REFUSED:") and "'digits' cannot be built here" in out.stdout and "scikit-learn" in out.stdout
