"""``core/`` is pure array-API math: it never imports torch, jax, jaxlib, cupy or optax.

Two checks: (1) a subprocess in which those modules cannot be imported (a meta-path finder that raises
ImportError, installed before anything else) imports ``xpoptim.core`` and runs every optimizer, elementwise and
matrix, for a few steps on NumPy arrays; (2) a static scan of every file in ``core/`` for imports of them.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import xpoptim.core

BLOCKED = ("torch", "jax", "jaxlib", "cupy", "cupyx", "optax")
CORE_DIR = pathlib.Path(xpoptim.core.__file__).parent

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this process (core purity test)")
            return None

    sys.meta_path.insert(0, Blocker())
    for blocked_name in BLOCKED:  # the finder must really block
        try:
            __import__(blocked_name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the blocker let {{blocked_name}} through")

    import warnings
    warnings.simplefilter("error", RuntimeWarning)
    import numpy as np
    import xpoptim.core as core
    from xpoptim.core import SPECS, functional, minibatch_variance

    rng = np.random.default_rng(0)
    ran = []
    for name, spec in SPECS.items():
        settings = [{{}}]
        if name in ("adam_star", "adam_star_mb"):
            settings.append({{"adaptation": "erf"}})
        shapes = [(3, 4, 4), (4, 6)] if spec.kind == "matrix" else [(5,), (2, 3)]
        for extra in settings:
            for shape in shapes:
                hp = spec.validate(**extra)
                p = rng.standard_normal(shape)
                state = functional.init(spec, p, hp)
                for t in range(1, 4):
                    if getattr(spec, "extras", ()):
                        pe = rng.standard_normal((4, *shape))
                        g, extras = pe.mean(axis=0), (minibatch_variance(np, pe),)
                    else:
                        g, extras = rng.standard_normal(shape), ()
                    p, state = functional.step(spec, p, g, state, hp, t, extras=extras)
                assert np.all(np.isfinite(p)), name
                ran.append(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("RAN", " ".join(sorted(set(ran))))
    """
)


def test_core_runs_with_torch_jax_cupy_optax_blocked():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=set(BLOCKED))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = proc.stdout.split("RAN", 1)[1].split()
    assert sorted(ran) == sorted(xpoptim.core.BUILTIN)  # the child process imports no user rule file


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.append((node.lineno, str(node.args[0].value)))
    return found


#: The one dynamic import of a GPU module the core may do: ``erf`` of a CuPy array dispatches to
#: ``cupyx.scipy.special`` (docs/algorithms.md section 0: erf is not in the standard). It runs only when a CuPy array is
#: already in hand, i.e. the caller has imported cupy; the subprocess test above proves it is never reached
#: otherwise.
ALLOWED_DYNAMIC = {("_backend.py", "cupyx.scipy.special")}


def test_no_file_in_core_imports_a_framework():
    files = sorted(CORE_DIR.glob("*.py"))
    assert len(files) >= 10, files
    bad = []
    for f in files:
        for lineno, mod in _imports(f):
            if mod.split(".")[0] in BLOCKED and (f.name, mod) not in ALLOWED_DYNAMIC:
                bad.append(f"{f.name}:{lineno}: {mod}")
    assert not bad, bad


def test_the_scan_finds_imports(tmp_path):
    """The scanner itself must see static and dynamic imports (else the purity scan proves nothing)."""
    f = tmp_path / "mod.py"
    f.write_text("def f():\n    import torch\nfrom jax import numpy\nimport importlib\n"
                 "importlib.import_module('cupy')\n")
    mods = [m for _, m in _imports(f)]
    assert {"torch", "jax", "cupy"} <= set(mods)
