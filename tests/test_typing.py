"""``mypy`` is clean on the public API (the ``[tool.mypy]`` files of ``pyproject.toml``: the core, the array and
optax adapters' public modules and generated classes, and ``tests/typing/public_api.py``, a file of uses), and it
refuses misuse of the explicit signatures. CI runs ``python -m mypy`` from the repository root; this test runs the
same check once, with a second file of misuses whose errors must be exactly the expected ones."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

MISUSES = '''
import numpy as np
from xpoptim.adapters import numpy as xnp
from xpoptim.adapters import optax as xo

w = np.zeros(3)
xnp.AdamW([w], lrr=1e-3)
xnp.Muon([w], fallback=3)
xo.adamw(beta1="0.9")
xo.scale_by_mvngrad(state_dtype=None, lr=1e-3)
xnp.Lamb([w])
'''

EXPECTED = [
    (7, 'Argument "lrr" to "AdamW" has incompatible type "float"'),
    (8, 'Argument "fallback" to "Muon" has incompatible type "int"'),
    (9, 'Argument "beta1" to "adamw" has incompatible type "str"'),
    (10, 'Unexpected keyword argument "lr" for "scale_by_mvngrad"'),
    (11, 'Module has no attribute "Lamb"'),
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
