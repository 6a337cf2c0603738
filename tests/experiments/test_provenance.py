"""The committed experiment results match the current sources (fast; part of the default run).

Every experiment's ``benchmarks/results/experiments/<name>.json`` records a SHA-256 of the code of
the files its numbers depend on (the syntax tree without docstrings). When one of them changes, the committed numbers may no
longer be what the code gives: the test fails, naming the changed files and the command that
regenerates the result (``python -m benchmarks.experiments --stale`` regenerates every stale one).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # ``benchmarks`` lives at the repository root, not in the installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("matplotlib")

from benchmarks.experiments import EXPERIMENTS  # noqa: E402
from benchmarks.experiments._provenance import RESULTS, command, declared_sources, code_sha256, stale_reasons  # noqa: E402


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_committed_result_is_current(name):
    reasons = stale_reasons(name)
    assert not reasons, (
        f"benchmarks/results/experiments/{name}.md is stale: " + "; ".join(reasons)
        + f". Regenerate it with `{command(name)}` (or every stale result with `python -m benchmarks.experiments --stale`)"
    )


def test_declared_sources_exist():
    for name in EXPERIMENTS:
        for path in declared_sources(name):
            assert code_sha256(path) != "missing", f"{name} declares {path}, which does not exist"


def _copy(name: str, tmp_path: Path) -> dict:
    shutil.copy(RESULTS / f"{name}.json", tmp_path / f"{name}.json")
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_stale_detection(tmp_path):
    """A changed source, a changed dependency list and a quick run are each reported, naming the file."""
    name = EXPERIMENTS[0]
    record = _copy(name, tmp_path)
    assert stale_reasons(name, tmp_path) == []
    path = f"benchmarks/experiments/{name}.py"
    changed = dict(record, sources=dict(record["sources"], **{path: "0" * 64}))
    (tmp_path / f"{name}.json").write_text(json.dumps(changed))
    assert any(r.startswith(f"{path} changed") for r in stale_reasons(name, tmp_path))
    fewer = dict(record, sources={k: v for k, v in record["sources"].items() if k != path})
    (tmp_path / f"{name}.json").write_text(json.dumps(fewer))
    assert stale_reasons(name, tmp_path) == [f"{path} is a dependency now but was not recorded"]
    (tmp_path / f"{name}.json").write_text(json.dumps(dict(record, quick=True)))
    assert stale_reasons(name, tmp_path) == [f"{name}.json was written by a --quick run"]
    (tmp_path / f"{name}.json").unlink()
    assert stale_reasons(name, tmp_path) == [f"{name}.json is missing"]


def test_check_command_lists_stale(tmp_path, capsys, monkeypatch):
    """``python -m benchmarks.experiments --check`` exits 1 and prints the regeneration command."""
    import benchmarks.experiments.__main__ as cli
    from benchmarks.experiments import _provenance

    name = EXPERIMENTS[0]
    record = _copy(name, tmp_path)
    (tmp_path / f"{name}.json").write_text(json.dumps(dict(record, quick=True)))
    monkeypatch.setattr(cli, "stale_reasons", lambda n: _provenance.stale_reasons(n, tmp_path))
    assert cli.main(["--check", name]) == 1
    assert f"regenerate with `{command(name)}`" in capsys.readouterr().out
    _copy(name, tmp_path)
    assert cli.main(["--check", name]) == 0


def test_every_figure_is_in_the_docs():
    """docs/experiments.md shows every committed figure, and every figure it shows exists."""
    import re

    doc = (ROOT / "docs" / "experiments.md").read_text()
    shown = set(re.findall(r"\.\./benchmarks/results/experiments/([\w.-]+\.png)", doc))
    committed = {p.name for p in RESULTS.glob("*.png")}
    assert shown == committed, f"in the results but not the docs: {sorted(committed - shown)}; in the docs only: {sorted(shown - committed)}"
