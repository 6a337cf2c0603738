"""``python -m benchmarks.torch_section``: the torch adapter's targets, side by side, in one interleaved run.

For each layout (A: one large tensor, B: hundreds of medium ones, C: thousands of small ones) one interleaved block
measures, with fresh gradient tensors before every step (the default ``zero_grad()`` loop): torch.optim.AdamW fused
and foreach, heavyball.AdamW (when installed), and our AdamW (default path, and the op-by-op path a machine without a
C compiler runs) and MVN-Grad (default path). Then, each in a fresh process: the first step of our AdamW on one
``Linear(1024, 1024)`` with an empty kernel cache (cold) and with the cache filled (warm), and heavyball's first
step (its ``torch.compile``). Last, the live memory after ``zero_grad()`` of our AdamW and torch.optim.AdamW on the
same MLP. The tables go to stdout and to ``benchmarks/results/<machine>/torch_paths.{md,json}``.

Ratios are taken inside one block, against torch fused AdamW from the same rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from typing import Any

from . import env as envmod
from . import torch_paths
from .elementwise import _try, rule_bytes
from .harness import log, measure_interleaved
from .layouts import layouts_for, make_data
from .targets import elementwise_targets, judge

__all__ = ["main", "first_step", "live_memory"]


def _block(layout, device: str, repeats: int, warmup: int, budget_s: float, skipped: list, op_by_op: bool = True, heavyball: bool = True) -> list[dict]:
    data = make_data(layout)
    arrays, grads = data
    n = layout.n_params
    subjects = [
        _try(torch_paths.peer_adamw, arrays, grads, device, "fused", n, skipped=skipped, label="torch fused"),
        _try(torch_paths.peer_adamw, arrays, grads, device, "foreach", n, skipped=skipped, label="torch foreach"),
        _try(torch_paths.peer_heavyball, arrays, grads, device, n, skipped=skipped, label="heavyball.AdamW") if heavyball else None,
        _try(torch_paths.ours, "adamw", arrays, grads, device, "default", {}, n, 28, {"weight_decay": 0.01}, skipped=skipped, label="ours adamw"),
        _try(torch_paths.ours, "mvngrad", arrays, grads, device, "default", {}, n, rule_bytes("mvngrad"), {}, skipped=skipped, label="ours mvngrad"),
        _try(torch_paths.ours, "adamw", arrays, grads, device, "op by op", {"_c_loop": False}, n, 28, {"weight_decay": 0.01}, skipped=skipped, label="ours adamw op by op")
        if op_by_op
        else None,
        _try(torch_paths.ours_loop_alone, arrays, grads, device, n, skipped=skipped, label="C loop alone") if device == "cpu" else None,
    ]
    subjects = [s for s in subjects if s is not None]
    ms = measure_interleaved(subjects, warmup=warmup, repeats=repeats, budget_s=budget_s, name=layout.name)
    fused = next((m for m in ms if m.label == "torch.optim.AdamW fused" and m.median_s), None)
    alone = next((m for m in ms if m.kind == "floor" and m.median_s), None)
    # The bound a "faster than" target has on this machine: the compiled loop with no per-step work at all.
    bound = f"; the C loop alone: {fused.median_s / alone.median_s:.2f}x" if (fused and alone) else ""
    rows = []
    for m in ms:
        ratio = m.median_s / fused.median_s if (fused and m.median_s) else None
        targets = []
        if m.kind == "ours":
            for t in elementwise_targets(device, m.framework, m.path, m.rule, layout.name):
                value = None if ratio is None else (ratio if t.kind == "at_most" else 1.0 / ratio)
                targets.append(judge(t, value)["target"] + ": " + judge(t, value)["text"] + (bound if t.kind != "at_most" else ""))
        rows.append(
            {
                "layout": layout.name,
                "shape": layout.shape_text,
                "label": m.label if m.kind != "ours" else f"{m.label} {m.rule}",
                "rule": m.rule,
                "median_ms": None if m.median_s is None else m.median_s * 1e3,
                "first_step_ms": None if m.first_s is None else m.first_s * 1e3,
                "vs_fused": ratio,
                "rounds": len(m.samples),
                "targets": targets,
                "error": m.error,
            }
        )
    for s in subjects:
        if s.close is not None:
            s.close()
    del subjects, ms, data
    gc.collect()
    return rows


_FIRST_STEP = """
import os, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
t_torch = time.perf_counter()
{body}
print(repr(result))
"""

_OURS = """
import xpoptim.adapters.torch as xt
t_import = time.perf_counter()
model = torch.nn.Linear(1024, 1024)
model(torch.randn(8, 1024)).sum().backward()
t1 = time.perf_counter()
opt = xt.AdamW(model.parameters(), lr=1e-3)
opt.step()
t2 = time.perf_counter()
result = {{"import_s": t_import - t_torch, "construct_and_first_step_s": t2 - t1,
          "dynamo_loaded": "torch._dynamo" in sys.modules, "inductor_loaded": "torch._inductor" in sys.modules}}
"""

_HEAVYBALL = """
try:
    import heavyball
except ImportError as exc:
    result = {{"error": f"heavyball is not installed: {{exc}}"}}
else:
    model = torch.nn.Linear(1024, 1024)
    model(torch.randn(8, 1024)).sum().backward()
    t1 = time.perf_counter()
    opt = heavyball.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    opt.step()
    t2 = time.perf_counter()
    result = {{"construct_and_first_step_s": t2 - t1}}
"""


def first_step(threads: int) -> dict[str, Any]:
    """Construction + first step of one ``Linear(1024, 1024)``, each in a fresh process: ours with an empty kernel
    cache (cold: the C compiler runs), ours again with that cache (warm), and heavyball.AdamW (torch.compile)."""
    out: dict[str, Any] = {}
    cache = tempfile.mkdtemp(prefix="xpoptim-bench-first-step-")
    src_env = dict(os.environ, XPOPTIM_CACHE_DIR=cache)
    for name, body in (("ours_cold", _OURS), ("ours_warm", _OURS), ("heavyball", _HEAVYBALL)):
        code = textwrap.dedent(_FIRST_STEP).format(threads=threads, body=textwrap.dedent(body).format())
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=src_env, timeout=900)
        if proc.returncode != 0:
            out[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        else:
            out[name] = eval(proc.stdout.strip().splitlines()[-1], {"__builtins__": {}})  # a dict literal we printed
        log(f"  first step {name}: {out[name]}")
    return out


def _live_bytes() -> int:
    import warnings

    import torch

    gc.collect()
    seen: set = set()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)]
    for t in objs:
        st = t.untyped_storage()
        if st.data_ptr() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def live_memory(width: int = 2048, depth: int = 4) -> dict[str, Any]:
    """Live tensor bytes after ``zero_grad()`` (three steps of a ``depth``-layer MLP of ``width``), ours and
    torch.optim.AdamW's, relative to the parameters' bytes."""
    import torch

    import xpoptim.adapters.torch as xt

    out: dict[str, Any] = {}
    base = _live_bytes()
    for name, make in (("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3)), ("xpoptim AdamW", lambda ps: xt.AdamW(ps, lr=1e-3))):
        torch.manual_seed(0)
        layers = [torch.nn.Linear(width, width) for _ in range(depth)]
        model = torch.nn.Sequential(*layers)
        opt = make(model.parameters())
        x = torch.randn(4, width)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        opt.zero_grad()
        live = _live_bytes() - base - x.numel() * 4
        n = sum(p.numel() for p in model.parameters())
        out[name] = {"params": n, "live_MiB": live / 2**20, "bytes_per_param": live / n}
        log(f"  live after zero_grad, {name}: {live / 2**20:.1f} MiB ({live / n:.1f} B/param)")
        del model, opt, layers, x
        gc.collect()
    return out


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    lines = [
        "# torch adapter: default loop (fresh gradients every step), interleaved",
        "",
        f"torch threads {res['threads']}; {res['environment'].get('cpu', '')}; load average at start "
        f"{res['environment'].get('load_average_1m')} on {res['environment'].get('cpu_cores')} cores.",
        "",
        "| layout | subject | median ms | x torch fused | first step ms | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['layout']} ({r['shape']}) | {r['label']} | {_fmt(r['median_ms'], '.3f')} | {_fmt(r['vs_fused'])} | "
            f"{_fmt(r['first_step_ms'], '.1f')} | {'; '.join(r['targets']) or (r['error'] or '')} |"
        )
    if res["skipped"]:
        lines += ["", "Not measured:", ""] + [f"- {s['label']}: {s['reason']}" for s in res["skipped"]]
    fs = res.get("first_step") or {}
    if fs:
        lines += ["", "## First step (construction + first step, one Linear(1024, 1024), fresh process)", ""]
        for k, v in fs.items():
            lines.append(f"- {k}: {v}")
    mem = res.get("memory") or {}
    if mem:
        lines += ["", "## Live memory after zero_grad()", ""]
        for k, v in mem.items():
            lines.append(f"- {k}: {v['live_MiB']:.1f} MiB for {v['params']:,} parameters ({v['bytes_per_param']:.1f} B/param)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.torch_section", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--layouts", default="A,B,C")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--block-budget", type=float, default=20.0, help="seconds of timed rounds per layout")
    ap.add_argument("--size-scale", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-first-step", action="store_true")
    ap.add_argument("--op-by-op-layouts", default="A,B,C", help="layouts on which the op-by-op path is measured too")
    ap.add_argument("--heavyball-layouts", default="A,B,C", help="layouts on which heavyball.AdamW is measured (its first step compiles for minutes on thousands of tensors)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    environment = envmod.environment(args.device, args.threads)
    skipped: list = []
    rows: list = []
    names = tuple(x.strip() for x in args.layouts.split(",") if x.strip())
    for layout in layouts_for(args.device, names, size_scale=args.size_scale, quick=args.quick):
        log(f"[torch] layout {layout.name} = {layout.shape_text} ({layout.n_params:,} params)")
        block = _block(
            layout, args.device, args.repeats, args.warmup, args.block_budget, skipped,
            layout.name in args.op_by_op_layouts.split(","), layout.name in args.heavyball_layouts.split(","),
        )
        for r in block:
            log(f"    {r['label']:<40} {_fmt(r['median_ms'], '9.3f')} ms  x fused {_fmt(r['vs_fused'])}  first {_fmt(r['first_step_ms'], '.1f')} ms  {'; '.join(r['targets'])} {r['error'] or ''}")
        rows += block
    res: dict[str, Any] = {"threads": args.threads, "device": args.device, "environment": environment, "rows": rows, "skipped": skipped}
    if not args.skip_first_step and args.device == "cpu":
        res["first_step"] = first_step(args.threads)
    if args.device == "cpu":
        res["memory"] = live_memory(width=256 if args.quick else 2048)
    folder = envmod.results_dir(args.device, args.out)
    (folder / "torch_paths.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    text = markdown(res)
    (folder / "torch_paths.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
