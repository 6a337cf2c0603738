"""MkDocs hook: tables generated from the core specs, so the docs cannot drift from the code.

A page writes a marker and the build replaces it:

* ``<!-- xpoptim:conventions -->``: the conventions table (``xpoptim._docs.conventions_table``, the README's).
* ``<!-- xpoptim:hyperparams NAME -->``: name, default, allowed values and meaning of every hyperparameter of
  the optimizer ``NAME`` (registry name).
* ``<!-- xpoptim:memory -->``: the state each rule keeps, counted by allocating it with
  ``xpoptim.core.functional.init`` for sample shapes.

Benchmark tables, read from the committed results under ``benchmarks/results/<machine>/`` (so the docs always show
the committed run, never numbers copied by hand):

* ``<!-- xpoptim:bench-rules MACHINE LAYOUT -->``: per rule, the fastest path of each adapter on one layout, with
  its ratio to the peer measured in the same block (``elementwise.json``).
* ``<!-- xpoptim:bench-matrix MACHINE CASE -->``: Muon and DeVA_Sinf steps against their peers (``matrix.json``).
* ``<!-- xpoptim:bench-section MACHINE "HEADING" -->``: one section of ``summary.md`` (up to its first subsection), on a
  top-level page (its relative links are rewritten from the results folder).

After the build it checks that the API reference covers every public name: each string in the ``__all__`` of a
documented module (read from the source, so no framework is imported) must be rendered somewhere under ``api/``,
else the build fails.

It also publishes the figures under ``benchmarks/results/`` at the same paths in the site (a page links
``benchmarks/results/matrix/demo_loss.png`` relative to itself), so the docs show the committed results without
copies that could go stale.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
from mkdocs.structure.files import File, Files

from xpoptim._docs import conventions_table
from xpoptim.core import SPECS, get_spec
from xpoptim.core import functional as F

_ALLOWED = {
    "lr": ">= 0",
    "beta": "0 <= x < 1",
    "beta_open": "0 < x < 1",
    "nonneg": ">= 0",
    "positive": "> 0",
    "bool": "True / False",
    "int_pos": "integer >= 1",
    "any": "see meaning",
}


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def hyperparams_table(name: str) -> str:
    """Markdown table of one optimizer's hyperparameters, from its spec."""
    spec = get_spec(name)
    rows = ["| hyperparameter | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for h in spec.hyperparams:
        allowed = " / ".join(repr(c) for c in h.choices) if h.kind == "choice" else _ALLOWED[h.kind]
        rows.append(f"| `{h.name}` | `{_fmt(h.default)}` | {allowed} | {h.doc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def _state_elements(spec, shape: tuple) -> tuple[list[str], int]:
    state = F.init(spec, np.zeros(shape, np.float32))
    names = [k for k, v in state.items() if v is not None]
    return names, sum(int(np.prod(v.shape)) for v in state.values() if v is not None)


def memory_table() -> str:
    """State kept per parameter element (float32 state: 4 bytes per element), counted from ``functional.init``."""
    rows = [
        "| optimizer | state tensors | state elements per parameter element |",
        "| --- | --- | --- |",
    ]
    for spec in SPECS.values():
        if spec.kind == "elementwise":
            names, n = _state_elements(spec, (1000,))
            per = f"{n / 1000:g}"
        else:
            names, _ = _state_elements(spec, (64, 64))
            shapes = [(512, 512), (256, 1024)]
            counts = [_state_elements(spec, s)[1] / (s[0] * s[1]) for s in shapes]
            per = ", ".join(f"{c:g} for a {s[0]}x{s[1]} matrix" for c, s in zip(counts, shapes))
            per += f"; other parameters: the {get_spec(spec.fallback).title} fallback's"
        rows.append(f"| `{spec.title}` | {', '.join(f'`{n}`' for n in names)} | {per} |")
    return "\n".join(rows)


ROOT = Path(__file__).resolve().parents[1]
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


_MARKER = re.compile(r"<!-- xpoptim:([a-z-]+)(?: (.*?))? -->")


def _replace(match: re.Match) -> str:
    kind, args = match.group(1), shlex.split(match.group(2) or "")
    if kind == "conventions":
        return conventions_table()
    if kind == "memory":
        return memory_table()
    if kind == "hyperparams":
        return hyperparams_table(*args)
    if kind == "bench-rules":
        return bench_rules(*args)
    if kind == "bench-matrix":
        return bench_matrix(*args)
    if kind == "bench-section":
        return bench_section(*args)
    raise ValueError(f"unknown docs marker {match.group(0)!r}")


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    return _MARKER.sub(_replace, markdown)


def on_files(files: Files, config: dict, **kwargs: object) -> Files:
    for png in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        rel = png.relative_to(ROOT).as_posix()
        files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files


#: The modules of the API reference, by source file. Names built at import time (one optimizer class or alias per
#: spec) are not string literals in ``__all__`` and are listed on the pages in words.
API_MODULES = {
    "xpoptim.core": "src/xpoptim/core/__init__.py",
    "xpoptim.adapters.torch": "src/xpoptim/adapters/torch.py",
    "xpoptim.adapters.optax": "src/xpoptim/adapters/optax.py",
    "xpoptim.adapters.numpy": "src/xpoptim/adapters/numpy.py",
    "xpoptim.adapters.cupy": "src/xpoptim/adapters/cupy.py",
    "xpoptim.adapters.array": "src/xpoptim/adapters/array.py",
    "xpoptim.matrix": "src/xpoptim/matrix.py",
    "xpoptim.testing": "src/xpoptim/testing.py",
}
_rendered: set[str] = set()
log = logging.getLogger("mkdocs.plugins.xpoptim")


def public_names(source: str) -> list[str]:
    """The string literals of a module's ``__all__`` (starred, generated entries are skipped)."""
    for node in ast.parse((ROOT / source).read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def on_page_content(html: str, page: object, **kwargs: object) -> str:
    if page.file.src_uri.startswith("api/"):
        _rendered.update(re.findall(r'id="(xpoptim\.[\w.]+)"', html))
    return html


def on_post_build(config: dict, **kwargs: object) -> None:
    suffixes = {r.rsplit(".", 1)[-1] for r in _rendered}
    for module, source in API_MODULES.items():
        missing = [n for n in public_names(source) if f"{module}.{n}" not in _rendered and n not in suffixes]
        if missing:
            log.warning(f"API reference: {module} exports {missing}, which no page under api/ renders")
