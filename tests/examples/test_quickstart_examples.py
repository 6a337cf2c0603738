"""The quickstart scripts in examples/ (the ones the README and the getting-started pages show) run as written,
print their progress, and train: the loss they print falls."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NEEDS = {"quickstart_torch.py": ("torch",), "quickstart_jax.py": ("jax", "optax"), "quickstart_numpy.py": ()}


def test_every_quickstart_script_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("quickstart_*.py")) == sorted(NEEDS)


@pytest.mark.parametrize("script", sorted(NEEDS))
def test_quickstart_script_runs_and_the_loss_falls(script):
    for module in NEEDS[script]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{script} needs {module}, which is not installed (pip install xpoptim[torch] / xpoptim[jax])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    losses = [float(v) for v in re.findall(r"^step +\d+ +loss (\S+)$", done.stdout, re.M)]
    assert len(losses) == 4, done.stdout
    assert losses[-1] < 0.5 * losses[0], f"{script} did not train: {losses}"
