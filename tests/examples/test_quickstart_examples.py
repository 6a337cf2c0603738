"""The quickstart scripts in examples/ and the getting-started pages of the docs run as written.

Each script prints its loss four times and the loss falls; each getting-started page includes its script and shows
that output; every other Python block of a page runs, in order, in one namespace."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PAGES = ROOT / "docs" / "getting-started"
# script -> (the modules it needs, the getting-started page that shows it)
SCRIPTS = {
    "quickstart_torch.py": (("torch",), "torch.md"),
    "quickstart_jax.py": (("jax", "optax"), "jax.md"),
    "quickstart_numpy.py": ((), "numpy.md"),
}
_LOSS = re.compile(r"^step +\d+ +loss (\S+)$", re.M)


def _skip_without(modules: tuple[str, ...], what: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{what} needs {module}, which is not installed (pip install xpoptim[torch] / xpoptim[jax])")


def test_every_quickstart_script_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("quickstart_*.py")) == sorted(SCRIPTS)
    assert sorted(p.name for p in PAGES.glob("*.md")) == sorted(page for _, page in SCRIPTS.values())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_quickstart_script_runs_the_loss_falls_and_the_docs_show_its_output(script):
    needs, page = SCRIPTS[script]
    _skip_without(needs, script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    losses = [float(v) for v in _LOSS.findall(done.stdout)]
    assert len(losses) == 4, done.stdout
    assert losses[-1] < 0.5 * losses[0], f"{script} did not train: {losses}"
    text = (PAGES / page).read_text()
    assert f'--8<-- "examples/{script}"' in text, f"docs/getting-started/{page} must include examples/{script}"
    shown = re.search(r"```text\n(.*?)```", text, re.S)
    assert shown is not None, f"docs/getting-started/{page} shows no output"
    # Printed to 4 decimals; another CPU may round the last digit differently.
    np.testing.assert_allclose([float(v) for v in _LOSS.findall(shown.group(1))], losses, rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_getting_started_page_code_runs(script, capsys):
    needs, page = SCRIPTS[script]
    _skip_without(needs, f"docs/getting-started/{page}")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (PAGES / page).read_text(), re.S) if "--8<--" not in b]
    assert blocks, page
    namespace: dict = {"__name__": "docs_example"}
    for code in blocks:
        exec(compile(code, f"docs/getting-started/{page}", "exec"), namespace)
    assert capsys.readouterr().out.strip(), f"the examples of {page} print what they did"
