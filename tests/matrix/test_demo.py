"""The torch-vs-JAX demo: a smoke test and the agreement it shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xpoptim import demo


def test_sparkline():
    assert demo.sparkline([0, 1, 2, 3]) == "▁▃▆█"
    assert demo.sparkline([]) == ""
    assert len(demo.sparkline(np.arange(500), width=60)) == 60


def test_demo_runs_and_curves_agree(tmp_path):
    pytest.importorskip("torch", reason="needs torch for the torch side of the demo")
    pytest.importorskip("optax", reason="needs jax and optax for the JAX side of the demo")
    lines = []
    res = demo.run("adamw", {"lr": 3e-3}, steps=12, png=tmp_path / "demo.png", out=lines.append)
    assert res["frameworks"] == ["torch", "jax"]
    assert res["losses"]["torch"].shape == (12,)
    # float32, two autodiffs, two matmul implementations: agreement to ~1e-6 in the loss
    assert res["max_abs_diff"] < 1e-4
    # ... while the optimizer did move the model
    assert res["losses"]["torch"][-1] < res["losses"]["torch"][0] - 0.05
    text = "\n".join(lines)
    assert "max |loss difference| over 12 steps" in text and "test accuracy: torch" in text
    pytest.importorskip("matplotlib", reason="needs matplotlib for the figure")
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_numpy_side_matches_torch():
    """The NumPy stand-in (hand-written backprop, array adapter) trains to the torch curve."""
    pytest.importorskip("torch", reason="needs torch as the reference")
    x_tr, y_tr, x_te, y_te, _ = demo.load_data()
    params = demo.init_params(n_in=x_tr.shape[1])
    idx = demo.batches(len(x_tr), 32, 8)
    lt, _ = demo.train_torch("mvngrad", {"lr": 1e-2}, (x_tr, y_tr, x_te, y_te), params, idx)
    ln, _ = demo.train_numpy("mvngrad", {"lr": 1e-2}, (x_tr, y_tr, x_te, y_te), params, idx)
    np.testing.assert_allclose(ln, lt, rtol=1e-5)


@pytest.mark.parametrize("present", [(), ("torch",)])
def test_demo_without_the_frameworks_says_what_it_would_compare(monkeypatch, present):
    """Without torch/JAX the NumPy array adapter stands in, and the demo says what it would show."""
    if "torch" in present:
        pytest.importorskip("torch", reason="needs torch for the torch side")
    real = demo._available
    monkeypatch.setattr(demo, "_available", lambda m: real(m) and any(f"adapters.{p}" in m for p in (*present, "array")))
    lines = []
    res = demo.run("adamw", {"lr": 3e-3}, steps=6, out=lines.append)
    text = "\n".join(lines)
    if present:
        assert res["frameworks"] == ["torch", "numpy"] and res["max_abs_diff"] < 1e-4
        assert "jax not installed: comparing PyTorch (torch.optim adapter) with NumPy (array adapter) instead" in text
    else:
        assert res["frameworks"] == ["numpy"] and res["max_abs_diff"] is None
        assert "torch and jax not installed" in text and "nothing to compare against" in text
    assert "pip install torch jax optax" in text


def test_demo_cli_writes_its_png_by_default(tmp_path, monkeypatch, capsys):
    """``python -m xpoptim.demo`` writes ``xpoptim-demo.png`` when matplotlib is installed; ``--no-png`` writes nothing."""
    pytest.importorskip("matplotlib", reason="needs matplotlib for the figure")
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--optimizer", "adamw", "--steps", "3", "--no-png"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert demo.main(["--optimizer", "adamw", "--steps", "3"]) == 0
    assert (tmp_path / demo.DEFAULT_PNG).stat().st_size > 1000
    assert f"wrote {demo.DEFAULT_PNG}" in capsys.readouterr().out


def test_demo_trains_on_digits_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn", reason="needs scikit-learn for the digits data")
    x_tr, y_tr, x_te, y_te, source = demo.load_data()
    assert "digits" in source and len(x_tr) + len(x_te) == 1797 and x_tr.shape[1] == 64


def test_verifier_demo_writes_its_png_without_out(tmp_path, monkeypatch):
    """``python -m xpoptim.matrix --demo`` without ``--out`` writes the demo's figure into the current folder."""
    pytest.importorskip("matplotlib", reason="needs matplotlib for the figure")
    from xpoptim import matrix

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "run", lambda png=None, **kw: calls.append(png) or {})
    calls: list = []
    rc = matrix.main(["--optimizers", "sgd", "--backends", "numpy", "--dtypes", "float64", "--no-adapters", "--no-variants", "--no-progress", "--demo"])
    assert rc == 0 and calls == [Path(demo.DEFAULT_PNG)]
