"""Provenance of the committed results: which sources a result was computed from, and whether it is stale.

Every experiment writes ``<name>.json`` next to its Markdown summary with the commit it ran at and a
SHA-256 of the code of every source file its numbers depend on: the experiment script, ``_common.py`` and
the core modules whose rules it runs (each script's ``SOURCES``; the smoke tests check that list against
the core files a quick run actually executes). The hash of a Python file is taken over its syntax tree
without docstrings (:func:`code_sha256`), so a reworded docstring or comment, or a reformatting, leaves a
result current while any change to what the code computes makes it stale. The adapters are not listed:
they hold no math, and the test suite and the verifier hold them to the core rule. A result is *stale*
when any of those files changed since it was written, when the list itself changed, or when it was
written by a ``--quick`` run. ``python -m benchmarks.experiments --check`` lists stale results and
``python -m benchmarks.experiments --stale`` reruns only those.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: Repository root (the folder holding ``benchmarks/`` and ``src/``).
REPO = Path(__file__).resolve().parents[2]
#: Default results folder.
RESULTS = REPO / "benchmarks" / "results" / "experiments"
#: Sources every experiment depends on besides its own script.
COMMON_SOURCES = ("benchmarks/experiments/_common.py",)


def sources_of(name: str, declared: Iterable[str]) -> tuple[str, ...]:
    """The full, sorted dependency list of experiment ``name``: its script, ``_common.py`` and ``declared``."""
    return tuple(sorted({f"benchmarks/experiments/{name}.py", *COMMON_SOURCES, *declared}))


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` with the docstring of every module, class and function removed (``pass`` where it was alone)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_sha256(rel: str) -> str:
    """SHA-256 of the code of repository file ``rel`` (``"missing"`` when it does not exist).

    A Python file is hashed as its syntax tree without docstrings (``ast.dump``: comments, blank lines and
    formatting do not count; every name, literal and operation does); any other file as its exact bytes.
    """
    path = REPO / rel
    if not path.is_file():
        return "missing"
    data = path.read_bytes()
    if path.suffix == ".py":
        data = ast.dump(_without_docstrings(ast.parse(data, filename=rel))).encode()
    return hashlib.sha256(data).hexdigest()


def git_commit() -> str:
    """The checked-out commit (``"unknown"`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def uncommitted(paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` whose working-tree bytes differ from the checked-out commit."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line[3:] for line in out.stdout.splitlines() if line.strip())


def provenance(name: str, declared: Iterable[str]) -> dict[str, Any]:
    """The provenance record of a run of experiment ``name`` at the current sources."""
    paths = sources_of(name, declared)
    return {
        "commit": git_commit(),
        "uncommitted_sources": uncommitted(paths),
        "sources": {p: code_sha256(p) for p in paths},
    }


def declared_sources(name: str) -> tuple[str, ...]:
    """The full dependency list of experiment ``name`` as its script declares it now."""
    mod = importlib.import_module(f"benchmarks.experiments.{name}")
    return sources_of(name, getattr(mod, "SOURCES", ()))


def command(name: str) -> str:
    """The command that regenerates the result of experiment ``name``."""
    return f"python -m benchmarks.experiments {name}"


def stale_reasons(name: str, results: Path = RESULTS) -> list[str]:
    """Why the committed result of experiment ``name`` no longer matches the code (empty when it does)."""
    path = results / f"{name}.json"
    if not path.is_file():
        return [f"{path.name} is missing"]
    try:
        record = json.loads(path.read_text())
        recorded = record["sources"]
        quick = record["quick"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{path.name} is not a provenance record ({exc!r})"]
    reasons = []
    if quick:
        reasons.append(f"{path.name} was written by a --quick run")
    want = declared_sources(name)
    for p in sorted(set(want) - set(recorded)):
        reasons.append(f"{p} is a dependency now but was not recorded")
    for p in sorted(set(recorded) - set(want)):
        reasons.append(f"{p} was recorded but is no longer a dependency")
    for p in want:
        if p in recorded and recorded[p] != code_sha256(p):
            reasons.append(f"{p} changed (recorded sha256 {recorded[p][:12]}, now {code_sha256(p)[:12]})")
    return reasons


def executed_library_files(fn: Callable[[], Any]) -> tuple[Any, set[str]]:
    """Run ``fn()`` and return its result and the core files (``src/xpoptim/core``) whose functions ran.

    Module-level code (imports) and package ``__init__.py`` files (name lookups such as ``get_spec``) do
    not count: a result depends on the core modules whose functions compute it.
    """
    root = str(REPO / "src" / "xpoptim" / "core")
    seen: set[str] = set()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            f = code.co_filename
            if f.startswith(root) and code.co_name != "<module>" and not f.endswith("__init__.py"):
                seen.add(f)

    old = sys.getprofile()
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(old)
        threading.setprofile(None)  # type: ignore[arg-type]
    return result, {str(Path(f).resolve().relative_to(REPO)) for f in seen}
