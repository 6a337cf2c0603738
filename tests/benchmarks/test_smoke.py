"""Smoke test of the benchmark suite: the CLI runs every section on tiny sizes and writes files that parse.

No timing is asserted anywhere (the numbers of a tiny run on a shared machine mean nothing); this only proves
that ``python -m benchmarks`` works end to end and that its outputs are well formed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import xpoptim

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("torch", reason="the benchmark suite needs torch (its peers are torch.optim optimizers)")
pytest.importorskip("optax", reason="the benchmark suite needs jax and optax (its peers include optax.adamw)")
pytest.importorskip("matplotlib", reason="the benchmark suite draws its plots with matplotlib")


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--rules", "adamw", "--layouts", "C", "--no-compile")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for section in ("elementwise", "matrix", "scaling", "compile"):
        payload = json.loads((tmp_path / f"{section}.json").read_text())
        assert payload["section"] == section
        env = payload["environment"]
        assert env["machine"] and env["cpu"] and env["versions"]["numpy"]
        assert env["versions"]["xpoptim"] == xpoptim.__version__  # the code measured, whatever metadata is on the path
        assert (tmp_path / f"{section}.md").read_text().startswith("## ")
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# xpoptim benchmarks")

    ew = json.loads((tmp_path / "elementwise.json").read_text())["results"]
    peers = {p["label"]: p for p in ew["peers"]}
    assert peers["torch.optim.AdamW fused"]["median_ms"] > 0
    assert peers["optax.adamw jit"]["median_ms"] > 0
    assert peers["copy floor (torch copy_)"]["gbps"] > 0
    # Every path of ours either produced a measurement or says why it was skipped.
    measured = {r["label"] for r in ew["rows"] if r["median_ms"]}
    assert measured or ew["skipped"], "no path of ours was measured and none says why"
    for r in ew["rows"]:
        if r["median_ms"]:
            assert r["ratios"]["torch_fused"] > 0 and r["ratios"]["floor"] > 0
            for t in r["targets"]:
                assert t["met"] in (True, False) and t["text"]
    for s in ew["skipped"]:
        assert s["reason"]

    mx = json.loads((tmp_path / "matrix.json").read_text())["results"]
    assert any(r["label"].startswith("torch.optim.Muon") and r["median_ms"] for r in mx["rows"])

    for section in ("elementwise", "scaling"):
        payload = json.loads((tmp_path / f"{section}.json").read_text())
        assert payload["plots"], f"the {section} section draws its plots"
        for name in payload["plots"]:
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in (tmp_path / f"{section}.md").read_text()

    cp = json.loads((tmp_path / "compile.json").read_text())["results"]
    assert cp["rows"] and all("first_step_ms" in r or "error" in r for r in cp["rows"])


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--only", "everything")
    assert proc.returncode == 2
    assert "--only everything" in proc.stderr
    proc = _run(tmp_path, "--rules", "muon", "--only", "elementwise")
    assert proc.returncode == 2
    assert "matrix rule" in proc.stderr
