"""Markdown tables, JSON files and PNG plots from the sections' results.

Every section writes ``<section>.json`` (its results plus the environment they were measured in) and
``<section>.md``; ``summary.md`` then gathers every section found in the folder, each with its own date, so a
partial re-run (``--only matrix``) refreshes one section and keeps the others.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .env import describe

__all__ = ["write_section", "write_summary", "markdown", "SECTIONS"]

SECTIONS = ("elementwise", "matrix", "scaling", "compile")

_TITLES = {
    "adam": "Adam",
    "adamw": "AdamW",
    "mvngrad": "MVN-Grad",
    "msvag": "M-SVAG",
    "deva_linf": "DeVA_linf",
    "muon": "Muon",
    "deva_sinf": "DeVA_Sinf",
    "newton_schulz": "Newton-Schulz",
    "copy": "copy",
}


def _title(rule: str) -> str:
    return _TITLES.get(rule, rule)


def _ms(x: float | None, digits: int | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if digits is None:
        digits = 3 if x < 10 else (2 if x < 100 else 1)
    return f"{x:.{digits}f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _skipped(skipped: list[dict]) -> str:
    if not skipped:
        return ""
    seen: dict[str, str] = {}
    for s in skipped:
        seen.setdefault(s["reason"], s["label"])
    lines = [f"- skipped: {label}{' (and others)' if sum(1 for x in skipped if x['reason'] == reason) > 1 else ''}: {reason}" for reason, label in seen.items()]
    return "\nSkipped paths:\n\n" + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Elementwise
# ----------------------------------------------------------------------------------------------


def _row_name(r: dict) -> str:
    if r["kind"] == "ours":
        return f"{r['label']} · {_title(r['rule'])}"
    return r["label"]


def elementwise_md(res: dict, env: dict, plots: list[str] | None = None) -> str:
    layouts = res["layouts"]
    names = list(layouts)
    out = ["## Elementwise step, ms per step (median)", ""]
    out.append(
        "Layouts: " + "; ".join(f"{k} = {v['shape']} ({v['n_params']:,} float32 params)" for k, v in layouts.items()) + ". "
        f"{res['warmup']} warm-up steps, up to {res['repeats']} interleaved rounds per block (one block per rule, "
        "the peers re-measured in each block; a peer's number below is the median of its block medians)."
    )
    out.append("")
    # wide table
    order: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for p in res["peers"]:
        name = _row_name(p)
        if name not in order:
            order.append(name)
        cells[(name, p["layout"])] = _ms(p["median_ms"]) if p["median_ms"] is not None else ("failed" if p.get("error") else "-")
    ours = sorted(res["rows"], key=lambda r: (res["rules"].index(r["rule"]) if r["rule"] in res["rules"] else 99))
    for r in ours:
        name = _row_name(r)
        if name not in order:
            order.append(name)
        cells[(name, r["layout"])] = _ms(r["median_ms"]) if r["median_ms"] is not None else ("failed" if r.get("error") else "-")
    out.append(_table(["implementation"] + names, [[n] + [cells.get((n, l), "-") for l in names] for n in order]))
    out.append("")
    for p in plots or []:
        out.append(f"![{p}]({p})")
        out.append("")
    # floor
    floor_rows = []
    for p in res["peers"]:
        if p["kind"] == "floor" and p["median_ms"]:
            gbps = p["gbps"]
            floor_rows.append([p["label"], p["layout"], _ms(p["median_ms"]), f"{gbps:.1f}" if gbps else "-", _ms(p["median_ms"] * 36 / 28)])
    if floor_rows:
        out.append("### Bandwidth floor")
        out.append("")
        out.append(
            "Moving the same bytes an ideal single-pass step moves (28 bytes per float32 parameter for a rule with two "
            "state buffers: read p, g, m, v; write p, m, v; 36 for three, MVN-Grad) three ways: a plain copy (torch "
            "`copy_`), an in-place pass over one buffer (torch `mul_`: like an optimizer it writes what it read, so on CPU "
            "it pays no read-for-ownership of a fresh destination) and, on CPU, NumPy's one-thread `copyto`. GB/s counts "
            "read + write bytes. The `vs floor` ratios use the fastest of them in the same block, scaled to the rule's "
            "bytes per parameter."
        )
        out.append("")
        out.append(_table(["floor", "layout", "28 B/param, ms", "GB/s", "36 B/param, ms"], floor_rows, "llrrr"))
        out.append("")
    # targets
    trows = []
    for r in res["rows"]:
        for t in r.get("targets", []):
            trows.append([_row_name(r), r["layout"], t["target"], _ratio(t["value"]) if t["value"] is not None else "-", t["text"]])
    if trows:
        out.append("### Targets (each row: met, or missed by how much)")
        out.append("")
        out.append(
            "Ratios are step-time ratios (ours / peer; below 1 is faster) or speedups (peer / ours) for the `>=` targets, "
            "taken against the peer measured in the same block."
        )
        out.append("")
        out.append(_table(["implementation", "layout", "target", "measured", "status"], trows, "lllrl"))
        out.append("")
        best = _best_per_target(res["rows"])
        if best:
            out.append("Best path per target: " + "; ".join(best) + ".")
            out.append("")
    # detail
    out.append("### Detail")
    out.append("")
    for lay in names:
        rows = []
        for p in res["peers"]:
            if p["layout"] == lay:
                rows.append([p["label"], "AdamW" if p["rule"] == "adamw" else p["rule"], str(int(p["bytes_per_param"])), _ms(p["median_ms"]), "-", f"{p['gbps']:.1f}" if p.get("gbps") else "-", _ms(p["first_step_ms"]), "", "", "", p.get("error") or ""])
        for r in ours:
            if r["layout"] != lay:
                continue
            rr = r["ratios"]
            iqr = f"{_ms(r['p25_ms'])}-{_ms(r['p75_ms'])}" if r["p25_ms"] is not None else "-"
            rows.append([r["label"], _title(r["rule"]), str(int(r["bytes_per_param"])), _ms(r["median_ms"]), iqr, f"{r['gbps']:.1f}" if r.get("gbps") else "-", _ms(r["first_step_ms"]), _ratio(rr.get("torch_fused")), _ratio(rr.get("optax_adamw")), _ratio(rr.get("floor")), r.get("error") or ""])
        out.append(f"Layout {lay} ({layouts[lay]['shape']}):")
        out.append("")
        out.append(_table(["implementation", "rule", "B/param", "median ms", "p25-p75 ms", "GB/s", "first step ms", "vs torch fused", "vs optax.adamw", "vs floor", "note"], rows, "llrrrrrrrrl"))
        out.append("")
    out.append(_skipped(res.get("skipped", [])))
    return "\n".join(out)


def _best_per_target(rows: list[dict]) -> list[str]:
    best: dict[tuple[str, str, str], tuple[float, dict, dict]] = {}
    for r in rows:
        for t in r.get("targets", []):
            if t["value"] is None:
                continue
            key = (t["id"], r["layout"], r["rule"])
            score = t["value"] if t["target"].startswith("<=") else -t["value"]
            if key not in best or score < best[key][0]:
                best[key] = (score, r, t)
    out = []
    for (_, lay, rule), (_, r, t) in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        out.append(f"{_title(rule)} {lay} {t['target']}: {r['label']} {t['text']}")
    return out


# ----------------------------------------------------------------------------------------------
# Matrix
# ----------------------------------------------------------------------------------------------


def matrix_md(res: dict, env: dict) -> str:
    out = ["## Matrix rules, ms per step (median)", ""]
    out.append(
        "Newton-Schulz: 5 quintic steps. Steps: Muon (lr 1e-3, momentum 0.95, Nesterov) and DeVA_Sinf with default "
        "settings, float32 parameters; the dtype column is the dtype Newton-Schulz runs in (torch.optim.Muon always uses "
        "bf16; optax.contrib.muon runs in the parameters' dtype, so its bf16 row has bf16 parameters). A stack "
        "`k x (n, m)` is k separate parameters of one shape (the adapters may batch them). DeVA_Sinf's median is the "
        "steady step; its first step (seeding the preconditioner: eigendecompositions) is in 'first step' and the "
        "slowest timed step (a basis refresh every `precondition_frequency` steps) in 'max'."
    )
    out.append("")
    rows = []
    for r in res["rows"]:
        ratio = r.get("vs_torch_muon")
        tgt = r.get("target")
        rows.append([r["case"], r["label"], _title(r["rule"]), r.get("dtype", "-"), _ms(r["median_ms"]), _ms(r.get("max_ms")), _ms(r["first_step_ms"]), f"{r['tflops']:.3g}" if r.get("tflops") else "-", _ratio(ratio), tgt["text"] if tgt else "", r.get("error") or ""])
    out.append(_table(["shape", "implementation", "rule", "dtype", "median ms", "max ms", "first step ms", "TFLOP/s (NS)", "vs torch.optim.Muon", "target (< 1x)", "note"], rows, "lllrrrrrrll"))
    out.append("")
    out.append(_skipped(res.get("skipped", [])))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Scaling
# ----------------------------------------------------------------------------------------------


def scaling_md(res: dict, env: dict, plots: list[str]) -> str:
    out = ["## Scaling (AdamW, ms per step, median)", ""]
    for part, title, key in (("params", "against parameter count (one tensor)", "n_params"), ("tensors", f"against tensor count ({res.get('tensors_total', 0):,} params in total)", "count")):
        data = res.get(part, [])
        if not data:
            continue
        xs = sorted({d[key] for d in data})
        labels = []
        for d in data:
            if d["label"] not in labels:
                labels.append(d["label"])
        cells = {(d["label"], d[key]): d for d in data}
        head = [f"{x / 2**20:g}M" if key == "n_params" else str(x) for x in xs]
        rows = [[lab] + [_ms(cells[(lab, x)]["median_ms"]) if (lab, x) in cells else "-" for x in xs] for lab in labels]
        out.append(f"### Step time {title}")
        out.append("")
        out.append(_table(["implementation"] + head, rows))
        out.append("")
    for p in plots:
        out.append(f"![{p}]({p})")
        out.append("")
    out.append(_skipped(res.get("skipped", [])))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Compile / memory
# ----------------------------------------------------------------------------------------------


def compile_md(res: dict, env: dict) -> str:
    out = ["## First-step cost and peak memory (AdamW)", ""]
    out.append(
        "Each path is built fresh (torch.compile and JAX caches cleared first) on its layout's parameters and gradients, "
        "which exist before the measured region. 'construct' is building the optimizer; 'first step' includes tracing "
        "and compilation; 'steady' is the median of the next steps. Peak memory per parameter covers construction and "
        f"the first steps, measured as: {res.get('memory_method', '?')}. Resident memory also counts allocator caches "
        "and, for JAX on CPU, compiled code, so small layouts overstate it; compare paths, not absolute bytes. An ideal "
        "AdamW keeps 8 bytes of state per float32 parameter."
    )
    out.append("")
    rows = []
    for r in res["rows"]:
        rows.append([r["layout"], r["label"], _ms(r.get("construct_ms")), _ms(r.get("first_step_ms")), _ms(r.get("steady_ms")), "-" if r.get("bytes_per_param_peak") is None else f"{r['bytes_per_param_peak']:.1f}", r.get("error") or ""])
    out.append(_table(["layout", "implementation", "construct ms", "first step ms", "steady ms", "peak bytes / param", "note"], rows, "llrrrrl"))
    out.append("")
    out.append(_skipped(res.get("skipped", [])))
    return "\n".join(out)


def markdown(section: str, res: dict, env: dict, plots: list[str] | None = None) -> str:
    body = {
        "elementwise": lambda: elementwise_md(res, env, plots),
        "matrix": lambda: matrix_md(res, env),
        "scaling": lambda: scaling_md(res, env, plots or []),
        "compile": lambda: compile_md(res, env),
    }[section]()
    return body + "\n" + describe(env) + "\n"


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_section(folder: Path, section: str, res: dict, env: dict, plots: list[str] | None = None) -> list[Path]:
    """Write ``<section>.json`` and ``<section>.md``; returns the paths."""
    payload = {"section": section, "environment": env, "results": res, "plots": plots or []}
    jpath = folder / f"{section}.json"
    jpath.write_text(json.dumps(_clean(payload), indent=1, allow_nan=False) + "\n")
    mpath = folder / f"{section}.md"
    mpath.write_text(markdown(section, res, env, plots))
    return [jpath, mpath]


def _targets_at_a_glance(folder: Path) -> str:
    rows = []
    ew = folder / "elementwise.json"
    if ew.exists():
        res = json.loads(ew.read_text())["results"]
        best: dict[tuple[str, str, str], tuple[float, dict, dict]] = {}
        for r in res["rows"]:
            for t in r.get("targets", []):
                if t["value"] is None:
                    continue
                key = (t["target"], r["layout"], r["rule"])
                score = t["value"] if t["target"].startswith("<=") else -t["value"]
                if key not in best or score < best[key][0]:
                    best[key] = (score, r, t)
        for (target, lay, rule), (_, r, t) in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
            rows.append([f"{_title(rule)}, layout {lay}", target, r["label"], _ratio(t["value"]), "met" if t["met"] else f"missed by {t['missed_by']:.2f}x"])
    mx = folder / "matrix.json"
    if mx.exists():
        res = json.loads(mx.read_text())["results"]
        for r in res["rows"]:
            t = r.get("target")
            if t:
                rows.append([f"Muon, {r['case']}", t["target"], f"{r['label']}", _ratio(t["value"]), "met" if t["met"] else f"missed by {t['missed_by']:.2f}x"])
    if not rows:
        return ""
    return _table(["case", "target", "best path", "measured", "status"], rows, "lllrl")


def write_summary(folder: Path) -> Path:
    """``summary.md``: every section present in ``folder``, in the usual order."""
    parts = ["# xpoptim benchmarks", ""]
    glance = _targets_at_a_glance(folder)
    if glance:
        parts += ["## Targets at a glance (best path per target)", "", glance, ""]
    first_env = None
    for section in SECTIONS:
        jpath = folder / f"{section}.json"
        if not jpath.exists():
            continue
        payload = json.loads(jpath.read_text())
        first_env = first_env or payload["environment"]
        parts.append(markdown(section, payload["results"], payload["environment"], payload.get("plots")))
    if first_env is None:
        parts.append("No results yet.")
    path = folder / "summary.md"
    path.write_text("\n".join(parts) + "\n")
    return path
