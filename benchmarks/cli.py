"""``python -m benchmarks``: measure our adapters against torch.optim and optax, write tables, JSON and plots."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from .harness import Config, log
from .report import SECTIONS

__all__ = ["main", "parse_args"]

_DEFAULT_RULES = ("adamw", "adam", "mvngrad", "msvag", "deva_linf")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Step time of xpoptim's adapters against torch.optim and optax, measured interleaved in one process. "
            "Results (Markdown, JSON, PNG) go to benchmarks/results/<machine>/."
        ),
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where tensors live (default cpu)")
    ap.add_argument("--only", action="append", default=None, metavar="SECTION", help=f"run only these sections ({', '.join(SECTIONS)}); repeat or comma-separate")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke test, not a measurement)")
    ap.add_argument("--size-scale", type=float, default=1.0, help="multiply every tensor size by this (e.g. 0.01)")
    ap.add_argument("--repeats", type=int, default=None, help="timed interleaved rounds per block (default 12; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per subject after the first (default 3; quick 1)")
    ap.add_argument("--matrix-repeats", type=int, default=None, help="timed rounds for matrix rules after their first step (default 3; quick 2)")
    ap.add_argument("--block-budget", type=float, default=None, help="seconds of timed rounds per block; fewer rounds (>= 3) when a block is slow (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own default); recorded in the results")
    ap.add_argument("--rules", type=_csv, default=None, help=f"elementwise rules (default {','.join(_DEFAULT_RULES)})")
    ap.add_argument("--layouts", type=_csv, default=None, help="layouts among A,B,C (default all)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile paths")
    ap.add_argument("--slow", action="store_true", help="include the slow cases left out by default: optax per-leaf and flatten_by_dtype for every rule on layout C (minutes of XLA compile), DeVA_Sinf on the large and stacked matrices on CPU (eigendecompositions of 4096x4096 factors)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<machine>/)")
    args = ap.parse_args(argv)

    sections: tuple[str, ...] = SECTIONS
    if args.only:
        sections = tuple(s for item in args.only for s in _csv(item))
        bad = [s for s in sections if s not in SECTIONS]
        if bad:
            ap.error(f"--only {','.join(bad)}: expected one of {', '.join(SECTIONS)}")
    layouts = args.layouts or ("A", "B", "C")
    bad = [x for x in layouts if x not in ("A", "B", "C")]
    if bad:
        ap.error(f"--layouts {','.join(bad)}: expected A, B or C")
    if args.size_scale <= 0:
        ap.error(f"--size-scale {args.size_scale}: expected a number > 0")
    rules = args.rules or (("adamw", "mvngrad") if args.quick else _DEFAULT_RULES)
    cfg = Config(
        device=args.device,
        quick=args.quick,
        size_scale=args.size_scale,
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
        repeats=args.repeats if args.repeats is not None else (3 if args.quick else 12),
        matrix_repeats=args.matrix_repeats if args.matrix_repeats is not None else (2 if args.quick else 3),
        block_budget_s=args.block_budget if args.block_budget is not None else (2.0 if args.quick else 5.0),
        threads=args.threads or 0,
        rules=rules,
        layouts=layouts,
        sections=sections,
        torch_compile=not args.no_compile,
        slow=args.slow,
        out=args.out or "",
    )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_args(argv)
    if cfg.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # JAX would otherwise take 75 % of the GPU's memory up front and starve torch and CuPy
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        from xpoptim.core import get_spec

        for r in cfg.rules:
            spec = get_spec(r)
            if spec.kind != "elementwise":
                raise ValueError(f"--rules {r}: {spec.title} is a matrix rule (the matrix section measures it)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cfg.threads = torch.get_num_threads()
        if cfg.device == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    except ImportError:
        pass

    from . import env as envmod
    from .report import write_section, write_summary

    folder = envmod.results_dir(cfg.device, cfg.out)
    env = envmod.environment(cfg.device, cfg.threads)
    env["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
    log(f"xpoptim benchmarks on {env['machine']} ({cfg.device}), torch threads {cfg.threads}, sections {', '.join(cfg.sections)}; results in {folder}")
    load = env.get("load_average_1m")
    if load is not None and load > 0.25 * env["cpu_cores"]:
        log(
            f"warning: load average {load} on {env['cpu_cores']} cores: other processes are running, and every parallel "
            "region of a multi-threaded library then waits for a core (milliseconds): measure on a quiet machine"
        )
    start = time.perf_counter()
    for section in cfg.sections:
        t0 = time.perf_counter()
        mod = __import__(f"benchmarks.{section}_section" if section in ("scaling", "compile", "matrix") else f"benchmarks.{section}", fromlist=["run"])
        res = mod.run(cfg, folder) if section in ("scaling", "elementwise") else mod.run(cfg)
        plots = res.pop("_plots", []) if isinstance(res, dict) else []
        res["section_seconds"] = round(time.perf_counter() - t0, 1)
        try:
            res["load_average_1m_end"] = round(os.getloadavg()[0], 2)
        except OSError:
            pass
        paths = write_section(folder, section, res, env, plots)
        log(f"[{section}] done in {res['section_seconds']:.1f} s: {', '.join(p.name for p in paths)}")
        print((folder / f"{section}.md").read_text())
    summary = write_summary(folder)
    log(f"all done in {time.perf_counter() - start:.1f} s; summary: {summary}")
    return 0
