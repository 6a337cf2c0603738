"""Elementwise step time on layouts A, B, C: our adapters against torch.optim, optax and the copy floor.

For each layout the peers (torch.optim.AdamW forloop / foreach / fused, optax.adamw under jit, the copy
floor) are built once; then, rule by rule, our paths for that rule are built and measured interleaved with
the peers (one block per rule), so every ratio compares numbers taken in the same rounds.
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path
from typing import Any

from . import array_paths, jax_paths, torch_paths
from .harness import Config, Measurement, Skip, Subject, log, measure_interleaved
from .layouts import Layout, bytes_per_param, layouts_for, make_data
from .targets import elementwise_targets, judge

__all__ = ["run", "rule_bytes", "build_peers", "build_ours"]


def rule_bytes(rule: str) -> int:
    """Ideal bytes per float32 parameter for ``rule`` (28 for two state buffers, 36 for three)."""
    from xpoptim.core import get_spec

    spec = get_spec(rule)
    return bytes_per_param(len(spec.state), len(spec.extras))


def _hp(rule: str) -> dict:
    """Hyperparameters used in the benchmark: defaults (lr set by the builders), AdamW-like decay where it exists."""
    return {"weight_decay": 0.01} if rule == "adamw" else {}


def _try(builder, *args, skipped: list, label: str, **kw) -> Subject | None:
    try:
        return builder(*args, **kw)
    except Skip as exc:
        skipped.append({"label": label, "reason": str(exc)})
        log(f"  skipped: {label}: {exc}")
        return None
    except Exception as exc:  # a builder that crashes is a skipped row with the error, never a crashed run
        reason = f"construction failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        skipped.append({"label": label, "reason": reason})
        log(f"  skipped: {label}: {reason}")
        return None


def build_peers(layout: Layout, data, cfg: Config, skipped: list) -> list[Subject]:
    """torch.optim.AdamW forloop / foreach / fused, heavyball.AdamW, optax.adamw jit, the floors (copy, in-place;
    NumPy's copy on CPU)."""
    arrays, grads = data
    n = layout.n_params
    out = []
    for impl in ("forloop", "foreach", "fused"):
        out.append(_try(torch_paths.peer_adamw, arrays, grads, cfg.device, impl, n, skipped=skipped, label=f"torch.optim.AdamW {impl}"))
    out.append(_try(torch_paths.peer_heavyball, arrays, grads, cfg.device, n, skipped=skipped, label="heavyball.AdamW"))
    out.append(_try(jax_paths.peer_adamw, arrays, grads, cfg.device, n, skipped=skipped, label="optax.adamw jit"))
    out.append(_try(torch_paths.copy_floor, n, cfg.device, 28, skipped=skipped, label="copy floor"))
    out.append(_try(torch_paths.inplace_floor, n, cfg.device, 28, skipped=skipped, label="in-place floor"))
    if cfg.device == "cpu":
        out.append(_try(array_paths.numpy_copy, n, 28, skipped=skipped, label="numpy copy"))
    return [s for s in out if s is not None]


def build_ours(rule: str, layout: Layout, data, cfg: Config, skipped: list) -> list[Subject]:
    """Our rule through every adapter path: torch (each path), optax (each path), NumPy / CuPy."""
    arrays, grads = data
    n, bpp, hp = layout.n_params, rule_bytes(rule), _hp(rule)
    out = []
    paths = torch_paths.ours_paths()
    if not paths:  # no adapter: record why
        out.append(_try(torch_paths.ours, rule, arrays, grads, cfg.device, "eager", {}, n, bpp, skipped=skipped, label=f"xpoptim torch {rule}"))
    for path, options in paths:
        if not cfg.torch_compile and options.get("compile"):
            skipped.append({"label": f"xpoptim torch {path} {rule}", "reason": "--no-compile"})
            continue
        out.append(_try(torch_paths.ours, rule, arrays, grads, cfg.device, path, options, n, bpp, hp, skipped=skipped, label=f"xpoptim torch {path} {rule}"))
    paths = jax_paths.ours_paths()
    if not paths:  # no adapter: record why
        out.append(_try(jax_paths.ours, rule, arrays, grads, cfg.device, "per-leaf", {}, n, bpp, skipped=skipped, label=f"xpoptim optax {rule}"))
    for path, options in paths:
        if path in ("per-leaf", "flatten_by_dtype") and layout.count >= 1000 and rule != cfg.rules[0] and not cfg.slow:
            skipped.append({"label": f"xpoptim optax {path} {rule} on {layout.name}", "reason": f"its XLA compile grows with the leaf count (tens of seconds to minutes with thousands of leaves): measured for {cfg.rules[0]} only (--slow for every rule)"})
            continue
        out.append(_try(jax_paths.ours, rule, arrays, grads, cfg.device, path, options, n, bpp, hp, skipped=skipped, label=f"xpoptim optax {path} {rule}"))
    for path, options in array_paths.ours_paths(cfg.device):
        out.append(_try(array_paths.ours, rule, arrays, grads, cfg.device, n, bpp, hp, options, path, skipped=skipped, label=f"xpoptim array {path} {rule}"))
    return [s for s in out if s is not None]


def _close(subjects: list[Subject]) -> None:
    for s in subjects:
        if s.close is not None:
            s.close()
    subjects.clear()
    gc.collect()


def _find(ms: list[Measurement], label: str) -> Measurement | None:
    for m in ms:
        if m.label == label and m.median_s:
            return m
    return None


def references(ms: list[Measurement]) -> dict[str, Measurement | None]:
    """The peers every ratio is taken against, from one block."""
    floors = [m for m in ms if m.kind == "floor" and m.median_s]
    return {
        "torch_fused": _find(ms, "torch.optim.AdamW fused"),
        "optax_adamw": _find(ms, "optax.adamw jit"),
        # the floor is the fastest way of moving the bytes in the block: torch's copy_ (multi-threaded), its in-place
        # mul_ (no read-for-ownership of a fresh destination on CPU), or NumPy's one-thread copyto
        "floor": min(floors, key=lambda m: m.median_s / m.bytes_per_param) if floors else None,
    }


def ratios(m: Measurement, refs: dict[str, Measurement | None]) -> dict[str, float | None]:
    """Time ratios ``m / ref`` (``< 1``: we are faster); the floor is scaled to ``m``'s bytes per parameter."""
    out: dict[str, float | None] = {}
    med = m.median_s
    for key, ref in refs.items():
        if med is None or ref is None or ref.median_s is None:
            out[key] = None
            continue
        base = ref.median_s
        if key == "floor":
            base = ref.median_s * (m.bytes_per_param / ref.bytes_per_param)
        out[key] = med / base
    return out


def judge_row(device: str, m: Measurement, layout: str, r: dict) -> list[dict]:
    """Judge one of our rows against the targets that apply to it."""
    out = []
    for t in elementwise_targets(device, m.framework, m.path, m.rule, layout):
        ratio = r.get(t.against)
        value = None if ratio is None else (ratio if t.kind == "at_most" else 1.0 / ratio)
        out.append({"id": t.name, **judge(t, value)})
    return out


def run(cfg: Config, folder: Path | None = None) -> dict[str, Any]:
    """Run the elementwise section (plots into ``folder`` when given); returns the JSON-able results."""
    layouts = layouts_for(cfg.device, cfg.layouts, size_scale=cfg.size_scale, quick=cfg.quick)
    rows: list[dict] = []
    peers_out: list[dict] = []
    skipped: list[dict] = []
    for layout in layouts:
        log(f"[elementwise] layout {layout.name} = {layout.shape_text} ({layout.n_params:,} params)")
        data = make_data(layout)
        peers = build_peers(layout, data, cfg, skipped)
        peer_runs: dict[str, list[Measurement]] = {}
        for rule in cfg.rules:
            ours = build_ours(rule, layout, data, cfg, skipped)
            log(f"  block {rule}: {len(peers)} peers + {len(ours)} paths")
            ms = measure_interleaved(peers + ours, warmup=cfg.warmup, repeats=cfg.repeats, budget_s=cfg.block_budget_s, name=f"{layout.name}/{rule}")
            refs = references(ms)
            for m in ms[: len(peers)]:
                peer_runs.setdefault(m.label, []).append(m)
            for m in ms[len(peers) :]:
                r = ratios(m, refs)
                rows.append({"layout": layout.name, "shape": layout.shape_text, **m.to_json(), "ratios": r, "targets": judge_row(cfg.device, m, layout.name, r)})
                if m.median_s:
                    targets = "; ".join(f"target {t['target']}: {t['text']}" for t in rows[-1]["targets"])
                    log(f"    {m.label:<34} {rule:<10} {m.median_s * 1e3:9.3f} ms  vs fused {_fmt(r['torch_fused'])}  vs optax {_fmt(r['optax_adamw'])}  vs floor {_fmt(r['floor'])}  {targets}")
            _close(ours)
            del ms
        for label, runs in peer_runs.items():
            peers_out.append(_merge_peer(layout, runs))
        for p in peers_out[-len(peer_runs) :]:
            if p["median_ms"] is not None:
                log(f"    {p['label']:<45} {p['median_ms']:9.3f} ms (median over {p['blocks']} blocks)")
        _close(peers)
        del data
        gc.collect()
    res = {
        "layouts": {l.name: {"count": l.count, "size": l.size, "n_params": l.n_params, "shape": l.shape_text} for l in layouts},
        "rules": list(cfg.rules),
        "peers": peers_out,
        "rows": rows,
        "skipped": skipped,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
    }
    if folder is not None:
        res["_plots"] = plot(res, folder, cfg.device)
    return res


def plot(res: dict, folder: Path, device: str, rule: str = "adamw") -> list[str]:
    """``elementwise_adamw.png``: horizontal bars of ms per step for every AdamW path and peer, one panel per layout."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log(f"  skipped: plots: matplotlib is not installed ({exc})")
        return []
    layouts = list(res["layouts"])
    entries = {lay: [] for lay in layouts}
    for p in res["peers"]:
        if p["median_ms"] and p["rule"] in ("adamw", "copy"):
            entries[p["layout"]].append((p["label"], p["median_ms"], p["kind"]))
    for r in res["rows"]:
        if r["median_ms"] and r["rule"] == rule:
            entries[r["layout"]].append((r["label"], r["median_ms"], r["kind"]))
    if not any(entries.values()):
        return []
    colors = {"peer": "tab:gray", "floor": "black", "ours": "tab:blue"}
    fig, axes = plt.subplots(1, len(layouts), figsize=(4.2 * len(layouts), 0.32 * max(len(v) for v in entries.values()) + 1.6), sharey=False)
    axes = [axes] if len(layouts) == 1 else list(axes)
    for ax, lay in zip(axes, layouts):
        items = entries[lay]
        ax.barh(range(len(items)), [x[1] for x in items], color=[colors.get(x[2], "tab:blue") for x in items])
        ax.set_yticks(range(len(items)))
        ax.set_yticklabels([x[0] for x in items], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per step (median, log scale)")
        ax.set_title(f"{lay} = {res['layouts'][lay]['shape']}", fontsize=9)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.suptitle(f"AdamW step time ({device}); gray: peers, black: copy floor, blue: xpoptim", fontsize=10)
    fig.tight_layout()
    name = f"elementwise_{rule}.png"
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return [name]


def _fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:6.2f}x"


def _merge_peer(layout: Layout, runs: list[Measurement]) -> dict:
    """A peer measured in several blocks: the median of its block medians (each block's ratios use its own)."""
    meds = [m.median_s for m in runs if m.median_s]
    first = runs[0].to_json()
    errors = [m.error for m in runs if m.error]
    first.update(
        {
            "layout": layout.name,
            "shape": layout.shape_text,
            "median_ms": statistics.median(meds) * 1e3 if meds else None,
            "block_medians_ms": [m * 1e3 for m in meds],
            "blocks": len(meds),
            "samples": sum(len(m.samples) for m in runs),
            "gbps": (runs[0].bytes_per_param * runs[0].n_params / statistics.median(meds) / 1e9) if meds else None,
            "error": errors[0] if errors else None,
        }
    )
    for k in ("p25_ms", "p75_ms", "min_ms"):
        first.pop(k, None)
    return first
