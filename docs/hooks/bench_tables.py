"""MkDocs hook: benchmark tables and figures from the committed results under ``benchmarks/results/<machine>/``.

The docs always show the committed run, never numbers copied by hand. A page writes a marker and the build
replaces it:

* ``<!-- xpoptim:bench-rules MACHINE LAYOUT -->``: per rule, the fastest path of each adapter on one layout, with
  its ratio to the peer measured in the same block (``elementwise.json``).
* ``<!-- xpoptim:bench-matrix MACHINE CASE -->``: Muon and DeVA_Sinf steps against their peers (``matrix.json``).
* ``<!-- xpoptim:bench-section MACHINE "HEADING" -->``: the opening of one section of ``summary.md`` (up to its first
  subsection), on a top-level page (its relative links are rewritten from the results folder).

It also publishes the figures under ``benchmarks/results/`` at the same paths in the site (a page links
``benchmarks/results/matrix/demo_loss.png`` relative to itself), without copies that could go stale.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

from xpoptim.core import get_spec

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
_FRAMEWORKS = (("torch", "torch adapter", "torch_fused", "torch.optim.AdamW fused"),
               ("jax", "optax adapter", "optax_adamw", "optax.adamw"),
               ("numpy", "NumPy adapter", "floor", "bandwidth floor"))


def _environment(env: dict) -> str:
    v = env.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "jax", "numpy") if k in v)
    return (f"Measured {env['date_utc']} on `{env['machine']}` ({env['cpu']}, {env['cpu_cores']} cores, "
            f"{env.get('torch_threads', '?')} threads; {libs}).")


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def bench_rules(machine: str, layout: str) -> str:
    """Per rule: the fastest path of each adapter on ``layout``, with its ratio to the same block's peer."""
    data = json.loads((RESULTS / machine / "elementwise.json").read_text())
    res = data["results"]
    header = "| rule | bytes / param | " + " | ".join(f"{name}: fastest path, ms (vs {peer})" for _, name, _, peer in _FRAMEWORKS) + " |"
    rows = [header, "| --- | ---: |" + " --- |" * len(_FRAMEWORKS)]
    for rule in res["rules"]:
        mine = [r for r in res["rows"] if r["kind"] == "ours" and r["rule"] == rule and r["layout"] == layout and not r.get("error")]
        if not mine:
            continue
        cells = []
        for fw, _, ratio, _ in _FRAMEWORKS:
            cand = [r for r in mine if r["framework"] == fw]
            if not cand:
                cells.append("-")
                continue
            best = min(cand, key=lambda r: r["median_ms"])
            path = best["label"].replace("xpoptim ", "")
            cells.append(f"{path}: {_ms(best['median_ms'])} ({best['ratios'][ratio]:.2f}x)")
        title = get_spec(rule).title
        rows.append(f"| `{title}` | {mine[0]['bytes_per_param']} | " + " | ".join(cells) + " |")
    shape = res["layouts"][layout]["shape"]
    spread = []
    for peer in res["peers"]:
        # the peers the ratios use: torch.optim.AdamW(fused=True) and optax.adamw
        if peer["layout"] == layout and peer["kind"] == "peer" and peer["path"] in ("fused", "jit") and peer.get("block_medians_ms"):
            lo, hi = min(peer["block_medians_ms"]), max(peer["block_medians_ms"])
            spread.append(f"{peer['label']} {_ms(lo)}-{_ms(hi)} ms")
    note = (f" The peers, re-measured in every rule's block, ranged over the blocks: {'; '.join(spread)}; a ratio far from"
            " the ratio of bytes moved mostly reflects that spread.") if spread else ""
    return "\n".join(rows) + f"\n\nLayout {layout} ({shape} float32 parameters).{note} " + _environment(data["environment"])


def bench_matrix(machine: str, case: str) -> str:
    """Muon and DeVA_Sinf steps (and their peers) on one matrix case."""
    data = json.loads((RESULTS / machine / "matrix.json").read_text())
    rows = ["| implementation | rule | Newton-Schulz dtype | median ms | first step ms |", "| --- | --- | --- | ---: | ---: |"]
    for r in data["results"]["rows"]:
        if r["case"] == case and r["rule"] in ("muon", "deva_sinf") and not r.get("error"):
            rows.append(f"| {r['label']} | {get_spec(r['rule']).title} | {r['dtype']} | {_ms(r['median_ms'])} | {_ms(r['first_step_ms'])} |")
    return "\n".join(rows) + f"\n\nOne {case} float32 matrix. " + _environment(data["environment"])


def bench_section(machine: str, heading: str) -> str:
    """The opening of one ``## heading`` section of ``summary.md`` (before its subsections), commit references dropped."""
    text = (RESULTS / machine / "summary.md").read_text()
    start = text.index(f"## {heading}")
    body = text[text.index("\n", start) + 1 :]
    end = re.search(r"^##(#)? ", body, re.M)  # up to the next section or the first subsection
    body = body[: end.start()] if end else body
    body = re.sub(r";? ?xpoptim at [0-9a-f]{7,40}( \(uncommitted changes\))?", "", body)
    # Links in summary.md are relative to its folder; the marker is used on top-level pages.
    body = re.sub(r"\]\((?!https?://|#)([^)]+)\)", lambda m: f"](benchmarks/results/{machine}/{m.group(1)})", body)
    return body.strip()


_MARKER = re.compile(r"<!-- xpoptim:(bench-rules|bench-matrix|bench-section) (.*?) -->")
_BUILDERS = {"bench-rules": bench_rules, "bench-matrix": bench_matrix, "bench-section": bench_section}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return _MARKER.sub(lambda m: _BUILDERS[m.group(1)](*shlex.split(m.group(2))), markdown)


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    for png in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files
