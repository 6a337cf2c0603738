"""Scaling: AdamW step time against parameter count (one tensor) and against tensor count (fixed total size).

Each point is one interleaved block of: torch.optim.AdamW foreach and fused, optax.adamw under jit, our torch
adapter (default path and torch.compile), our optax adapter (per leaf and flat), our array adapter, and the copy floor.
Plots (PNG, log-log) are written next to the tables.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from . import array_paths, jax_paths, torch_paths
from .elementwise import _try
from .harness import Config, log, measure_interleaved
from .layouts import Layout, make_data

__all__ = ["run", "points_for"]

M = 2**20
POINTS = {
    "cpu": {"params": [1 * M, 2 * M, 4 * M, 8 * M, 16 * M], "tensors_total": 2 * M, "tensors": [1, 8, 64, 512, 2048]},
    "cuda": {"params": [1 * M, 2 * M, 4 * M, 8 * M, 16 * M, 32 * M, 64 * M], "tensors_total": 8 * M, "tensors": [1, 16, 256, 4096]},
}
QUICK = {"params": [2**12, 2**14], "tensors_total": 2**12, "tensors": [1, 16]}


def points_for(device: str, quick: bool, size_scale: float = 1.0) -> dict:
    """Parameter counts and tensor counts to measure (sizes times ``size_scale``)."""
    if quick:
        return dict(QUICK)
    pts = POINTS[device]
    return {
        "params": [max(16, int(n * size_scale)) for n in pts["params"]],
        "tensors_total": max(16 * pts["tensors"][-1], int(pts["tensors_total"] * size_scale)),
        "tensors": list(pts["tensors"]),
    }


def _subjects(layout: Layout, data, cfg: Config, skipped: list) -> list:
    arrays, grads = data
    n = layout.n_params
    dev = cfg.device
    out = [
        _try(torch_paths.peer_adamw, arrays, grads, dev, "foreach", n, skipped=skipped, label="torch.optim.AdamW foreach"),
        _try(torch_paths.peer_adamw, arrays, grads, dev, "fused", n, skipped=skipped, label="torch.optim.AdamW fused"),
        _try(jax_paths.peer_adamw, arrays, grads, dev, n, skipped=skipped, label="optax.adamw jit"),
        _try(torch_paths.copy_floor, n, dev, 28, skipped=skipped, label="copy floor"),
        _try(torch_paths.inplace_floor, n, dev, 28, skipped=skipped, label="in-place floor"),
    ]
    hp = {"weight_decay": 0.01}
    for path, options in torch_paths.ours_paths():
        if path in ("default", "torch.compile") and (cfg.torch_compile or not options.get("compile")):
            out.append(_try(torch_paths.ours, "adamw", arrays, grads, dev, path, options, n, 28, hp, skipped=skipped, label=f"xpoptim torch {path}"))
    for path, options in jax_paths.ours_paths():
        if path != "flatten_by_dtype":  # its compile grows with the leaf count (see the elementwise section)
            out.append(_try(jax_paths.ours, "adamw", arrays, grads, dev, path, options, n, 28, hp, skipped=skipped, label=f"xpoptim optax {path}"))
    for path, options in array_paths.ours_paths(dev)[:1]:
        out.append(_try(array_paths.ours, "adamw", arrays, grads, dev, n, 28, hp, options, path, skipped=skipped, label=f"xpoptim array {path}"))
    return [s for s in out if s is not None]


def _measure(layout: Layout, cfg: Config, skipped: list, key: str) -> list[dict]:
    data = make_data(layout)
    subjects = _subjects(layout, data, cfg, skipped)
    ms = measure_interleaved(subjects, warmup=max(1, cfg.warmup - 1), repeats=max(3, cfg.repeats // 2), budget_s=cfg.block_budget_s / 2, name=f"{key} {layout.shape_text}")
    rows = []
    for m in ms:
        rows.append({"count": layout.count, "size": layout.size, **m.to_json()})
        if m.median_s:
            log(f"    {m.label:<40} {m.median_s * 1e3:9.3f} ms")
    subjects.clear()
    del data, ms
    gc.collect()
    return rows


def run(cfg: Config, folder: Path) -> dict[str, Any]:
    """Run the scaling section and draw its plots into ``folder``."""
    pts = points_for(cfg.device, cfg.quick, cfg.size_scale)
    skipped: list[dict] = []
    params_rows: list[dict] = []
    for n in pts["params"]:
        layout = Layout(f"1x{n}", 1, n)
        log(f"[scaling] one tensor of {n:,} params")
        params_rows += _measure(layout, cfg, skipped, "params")
    tensor_rows: list[dict] = []
    total = pts["tensors_total"]
    for k in pts["tensors"]:
        layout = Layout(f"{k}x{total // k}", k, total // k)
        log(f"[scaling] {k} tensors of {total // k:,} params")
        tensor_rows += _measure(layout, cfg, skipped, "tensors")
    res = {"params": params_rows, "tensors": tensor_rows, "tensors_total": total, "skipped": _dedupe(skipped)}
    res["_plots"] = plot(res, folder, cfg.device)
    return res


def _dedupe(skipped: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in skipped:
        key = (s["label"], s["reason"])
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


_STYLE = {
    "peer": {"linestyle": "--", "marker": "s"},
    "floor": {"linestyle": ":", "marker": "", "color": "black"},
    "ours": {"linestyle": "-", "marker": "o"},
}


def _short(n: int) -> str:
    for unit, div in (("M", 2**20), ("k", 2**10)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def plot(res: dict, folder: Path, device: str) -> list[str]:
    """``scaling_params.png`` and ``scaling_tensors.png`` (log-log); returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log(f"  skipped: plots: matplotlib is not installed ({exc})")
        return []
    written = []
    for part, xkey, xlabel, fname in (
        ("params", "n_params", "parameters (one float32 tensor)", "scaling_params.png"),
        ("tensors", "count", f"tensors ({res['tensors_total']:,} float32 parameters in total)", "scaling_tensors.png"),
    ):
        rows = [r for r in res.get(part, []) if r["median_ms"] is not None]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 5))
        labels = []
        for r in rows:
            if r["label"] not in labels:
                labels.append(r["label"])
        for lab in labels:
            pts = sorted((r[xkey], r["median_ms"], r["kind"]) for r in rows if r["label"] == lab)
            style = dict(_STYLE.get(pts[0][2], {}))
            if lab.startswith("in-place"):
                style.update(color="dimgray", linestyle="-.")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=lab, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({r[xkey] for r in rows})
        ax.set_xticks(xs)
        ax.set_xticklabels([_short(x) if part == "params" else str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per AdamW step (median)")
        ax.set_title(f"AdamW step time vs {'parameter' if part == 'params' else 'tensor'} count ({device})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written
