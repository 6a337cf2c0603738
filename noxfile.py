"""nox sessions for xpoptim.

pip-based virtualenvs only (uv would ignore this machine's pip configuration and download a multi-GB
CUDA torch). CPU torch is pinned to 2.13.0.

Sessions:
    tests        the full CPU suite with every CPU backend installed together (numpy, strict, torch, jax)
    slow         the tests marked ``slow`` (long compiles, Monte Carlo, multi-process)
    peers        the peers' own suites on every rule: torch's generic optimizer tests and optax's alias tests
                 (tests/peers/; the default run keeps one rule of each kind)
    isolation    one per backend (numpy, strict, torch, jax): installs only that backend and proves the core
                 and the NumPy path run without the others
    matrix       the cross-backend verifier; writes its report under benchmarks/results/matrix/
    gpu          CuPy + CUDA torch + GPU JAX; skips with a message when there is no CUDA device
    bench        the benchmarks (python -m benchmarks); results under benchmarks/results/<machine>/
    experiments  the paper experiments; results under benchmarks/results/experiments/
    docs         the documentation site (mkdocs build --strict, warnings as errors) into a temporary folder
    extension    every generic test suite on rules registered from user files (default examples/lion.py)

``tests``, ``slow``, ``matrix``, ``bench`` and ``experiments`` install the same heavy packages, so they share
one environment (``.nox/_shared-cpu``), created once and refreshed when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
TORCH_CPU = "torch==2.13.0"
SHARED = ROOT / ".nox" / "_shared-cpu"


def _shared_python(session: nox.Session) -> str:
    """Create (once) the shared CPU environment with every CPU backend and return its python."""
    stamp_value = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    python = SHARED / "bin" / "python"
    stamp = SHARED / ".xpoptim-stamp"
    if not (python.exists() and stamp.exists() and stamp.read_text() == stamp_value):
        if SHARED.exists():
            shutil.rmtree(SHARED)
        session.run("python", "-m", "virtualenv", str(SHARED), external=True)
        session.run(str(python), "-m", "pip", "install", TORCH_CPU, external=True)
        session.run(str(python), "-m", "pip", "install", "-e", f"{ROOT}[all,test]", external=True)
        stamp.write_text(stamp_value)
    else:
        session.log(f"reusing {SHARED}")
    return str(python)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The default CPU suite, every CPU backend in one environment."""
    py = _shared_python(session)
    session.run(py, "-m", "pytest", *session.posargs, external=True)


@nox.session(venv_backend="none")
def slow(session: nox.Session) -> None:
    """Tests marked slow (long compiles, Monte Carlo, multi-process)."""
    py = _shared_python(session)
    session.run(py, "-m", "pytest", "-m", "slow", *session.posargs, external=True)


@nox.session(venv_backend="none")
def peers(session: nox.Session) -> None:
    """torch's generic optimizer tests and optax's alias tests (tests/peers/) on every xpoptim rule."""
    py = _shared_python(session)
    session.run(py, "-m", "pytest", "tests/peers", "-m", "not slow and not gpu", *session.posargs, external=True)


@nox.session
@nox.parametrize("backend", ["numpy", "strict", "torch", "jax"])
def isolation(session: nox.Session, backend: str) -> None:
    """Install one backend alone; the core, the NumPy path and that backend's tests must pass."""
    extra = {"numpy": [], "strict": ["array-api-strict"], "torch": [TORCH_CPU], "jax": ["jax", "optax"]}[backend]
    if extra:
        session.install(*extra)
    # numpy-only: nothing but numpy, array-api-compat and the test runner (no scipy: erf falls back to math.erf).
    session.install("-e", ".", "pytest", "hypothesis", *([] if backend == "numpy" else ["scipy"]))
    session.env["XPOPTIM_BACKENDS"] = "numpy" if backend == "numpy" else f"numpy,{backend}"
    folders = ["tests/core", "tests/array_adapter"]
    folders += {"torch": ["tests/torch_adapter"], "jax": ["tests/optax_adapter"]}.get(backend, [])
    session.run("python", "-m", "pytest", *[f for f in folders if (ROOT / f).exists()], *session.posargs)
    session.run("python", "-m", "xpoptim.matrix", "--no-demo", "--out", str(session.create_tmp()))


@nox.session(venv_backend="none")
def matrix(session: nox.Session) -> None:
    """Run the cross-backend verifier and write its report under benchmarks/results/matrix/."""
    py = _shared_python(session)
    session.run(py, "-m", "xpoptim.matrix", "--out", "benchmarks/results/matrix", *session.posargs, external=True)


def _has_cuda() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@nox.session
def gpu(session: nox.Session) -> None:
    """CuPy + CUDA torch + GPU JAX: GPU tests, the verifier on GPU backends, the GPU benchmarks."""
    if not _has_cuda():
        session.skip("no CUDA device (nvidia-smi -L failed): the gpu session needs an NVIDIA GPU and driver")
    session.install("cupy-cuda12x", "torch", "jax[cuda12]", "optax", "array-api-strict", "scipy", "pytest", "hypothesis")
    session.install("-e", ".")
    session.run("python", "-m", "pytest", "-m", "gpu or not slow", *session.posargs)
    session.run("python", "-m", "xpoptim.matrix", "--out", "benchmarks/results/matrix-gpu")
    session.run("python", "-m", "benchmarks", "--device", "cuda")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """The benchmark suite (ratios against torch.optim and optax, measured in one run)."""
    py = _shared_python(session)
    session.run(py, "-m", "benchmarks", *session.posargs, external=True)


@nox.session(venv_backend="none")
def experiments(session: nox.Session) -> None:
    """The paper experiments (each at most ~10 minutes on 2 cores)."""
    py = _shared_python(session)
    folder = ROOT / "benchmarks" / "experiments"
    names = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    wanted = session.posargs or names
    failed = []
    for name in wanted:
        # Run every experiment even when one fails a paper claim, then report them together.
        session.log(f"experiment {name}")
        result = subprocess.run([py, "-m", f"benchmarks.experiments.{name}"], cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
        if result.returncode != 0:
            failed.append(name)
    if failed:
        session.error(f"paper claims failed in: {', '.join(failed)} (see benchmarks/results/experiments/)")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors (the API pages read the sources; no framework needed)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(session.create_tmp()), *session.posargs)


@nox.session(venv_backend="none")
def extension(session: nox.Session) -> None:
    """Every generic test suite on rules registered from user files (default: ``examples/lion.py``).

    ``nox -s extension -- my_rule.py other_rule.py`` imports each file before collection
    (``--xpoptim-rules``) and runs the tests whose id names one of the rules it registered.
    """
    py = _shared_python(session)
    files = session.posargs or ["examples/lion.py"]
    args = [a for f in files for a in ("--xpoptim-rules", f)]
    session.run(py, "-m", "pytest", *args, "--xpoptim-user-rules-only", "-m", "not gpu", "tests", external=True)
