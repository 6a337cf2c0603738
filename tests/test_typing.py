"""``mypy`` is clean on the package (the ``[tool.mypy]`` files of ``pyproject.toml``: every module of ``xpoptim``, the
adapters' explicit classes included, and ``tests/typing/public_api.py``, a file of uses of the torch, optax,
NumPy/CuPy, portable and testing APIs), and it refuses misuse of the explicit signatures. CI runs
``python -m mypy`` from the repository root; this test runs the same check once, with a second file of misuses whose
errors must be exactly the expected ones (a misspelt keyword, a wrong type for a hyperparameter or an option, a
name that does not exist), so a signature loosened to ``Any`` or a name hidden behind a module ``__getattr__``
fails it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

MISUSES = '''
import numpy as np
import torch
from xpoptim import portable, testing
from xpoptim.adapters import numpy as xnp
from xpoptim.adapters import optax as xo
from xpoptim.adapters import torch as xpt

w = np.zeros(3)
xnp.AdamW([w], lrr=1e-3)
xnp.Muon([w], fallback=3)
xo.adamw(beta1="0.9")
xo.scale_by_mvngrad(state_dtype=None, lr=1e-3)
xnp.Lamb([w])
m = torch.nn.Linear(2, 2)
xpt.AdamW(m.parameters(), lrr=1e-3)
xpt.SGD(m.parameters(), lr="0.1")
xpt.Muon(m.parameters(), ns_steps=5.0)
xpt.DeVASinf(m.parameters(), shape_scale=None)
xpt.Adam(3e-4)
xpt.Lamb(m.parameters())
xpt.AdamW(m.parameters()).step(grad_variance=[1.0])
xo.muon(momentum="0.95")
xo.deva_sinf(precondition_frequency=2.5)
xo.lion(1e-4)
portable.from_torch(torch.optim.AdamW(m.parameters()))
testing.assert_backends_agree("adamw", steps="5")
'''

EXPECTED = [
    (10, 'Argument "lrr" to "AdamW" has incompatible type "float"'),
    (11, 'Argument "fallback" to "Muon" has incompatible type "int"'),
    (12, 'Argument "beta1" to "adamw" has incompatible type "str"'),
    (13, 'Unexpected keyword argument "lr" for "scale_by_mvngrad"'),
    (14, 'Module has no attribute "Lamb"'),
    (16, 'Unexpected keyword argument "lrr" for "AdamW"'),
    (17, 'Argument "lr" to "SGD" has incompatible type "str"; expected "float | Tensor"'),
    (18, 'Argument "ns_steps" to "Muon" has incompatible type "float"; expected "int"'),
    (19, 'Argument "shape_scale" to "DeVASinf" has incompatible type "None"; expected "str"'),
    (20, 'Argument 1 to "Adam" has incompatible type "float"'),
    (21, 'Module has no attribute "Lamb"'),
    (22, 'Argument "grad_variance" to "step" of "XPOptimizer" has incompatible type "list[float]"'),
    (23, 'Argument "momentum" to "muon" has incompatible type "str"; expected "float | Array"'),
    (24, 'Argument "precondition_frequency" to "deva_sinf" has incompatible type "float"'),
    (25, 'Module has no attribute "lion"'),
    (26, 'Module has no attribute "from_torch"'),
    (27, 'Argument "steps" to "assert_backends_agree" has incompatible type "str"; expected "int"'),
]


@pytest.mark.slow
def test_mypy_accepts_the_public_api_and_refuses_misuse(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("mypy")
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSES)
    cmd = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "--config-file", str(ROOT / "pyproject.toml")]
    clean = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    bad = subprocess.run([*cmd, str(misuse)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    errors = [line for line in bad.stdout.splitlines() if ": error:" in line]
    assert all(line.startswith(str(misuse)) for line in errors), bad.stdout
    for lineno, text in EXPECTED:
        assert any(f":{lineno}: error: {text}" in line for line in errors), (lineno, text, bad.stdout)
    assert len(errors) == len(EXPECTED), bad.stdout
