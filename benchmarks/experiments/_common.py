"""Shared plumbing for the experiment scripts: output folder, claim bookkeeping, Markdown summary, provenance."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

from ._provenance import RESULTS, command, provenance

matplotlib.use("Agg")


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Common command line: ``--quick`` (tiny sizes for smoke tests) and ``--out DIR``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke tests")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS})")
    return p.parse_args(argv)


@dataclasses.dataclass
class Claim:
    """One checked claim: ``strict`` claims fail the run, the others are reported only."""

    name: str
    passed: bool
    detail: str
    strict: bool = True
    source: str = ""

    @property
    def status(self) -> str:
        if self.strict:
            return "PASS" if self.passed else "FAIL"
        return "REPORT (holds)" if self.passed else "REPORT (does not hold)"


class Report:
    """Collects claims, notes and figures of one experiment and writes its Markdown summary.

    Args:
        name: the experiment's module name (file stem of the summary).
        title: heading of the summary.
        out: output folder.
        quick: whether this is a ``--quick`` run (written into the summary).
        sources: repository paths of the library modules the numbers depend on (the script and
            ``_common.py`` are added); their SHA-256 go into ``<name>.json`` (see ``_provenance``).
    """

    def __init__(self, name: str, title: str, out: Path | None, quick: bool, sources: tuple[str, ...] = ()) -> None:
        self.name, self.title, self.quick = name, title, quick
        self.sources = tuple(sources)
        self.provenance = provenance(name, self.sources)  # the sources as this run read them
        self.out = Path(out) if out is not None else RESULTS
        self.out.mkdir(parents=True, exist_ok=True)
        self.claims: list[Claim] = []
        self.sections: list[str] = []
        self.figures: list[tuple[str, str]] = []
        self.t0 = time.perf_counter()

    def note(self, text: str) -> None:
        """A paragraph for the summary (also printed)."""
        print(text)
        self.sections.append(text)

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        """A Markdown table for the summary (also printed)."""
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            lines.append("| " + " | ".join(_cell(_fmt(x)) for x in r) + " |")
        text = "\n".join(lines)
        print(text)
        self.sections.append(text)

    def check(self, name: str, passed: bool, detail: str, *, strict: bool = True, source: str = "") -> bool:
        """Record a claim and print ``PASS/FAIL`` (or ``REPORT``) with the numbers behind it."""
        c = Claim(name, bool(passed), detail, strict, source)
        self.claims.append(c)
        print(f"[{c.status}] {name}: {detail}" + (f"  ({source})" if source else ""))
        return c.passed

    def savefig(self, fig: Any, stem: str, caption: str) -> Path:
        """Save a matplotlib figure as ``<out>/<stem>.png`` and list it in the summary."""
        path = self.out / f"{stem}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.figures.append((path.name, caption))
        print(f"wrote {path}")
        return path

    @property
    def failed(self) -> list[Claim]:
        return [c for c in self.claims if c.strict and not c.passed]

    def finish(self) -> int:
        """Write ``<out>/<name>.md`` and ``<out>/<name>.json``; return the exit code (1 if a strict claim failed)."""
        elapsed = time.perf_counter() - self.t0
        prov = self.provenance
        if provenance(self.name, self.sources)["sources"] != prov["sources"]:
            print(f"{self.name}: a source file changed during the run; the result records the sources as they were at its start")
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        cmd = command(self.name) + (" --quick" if self.quick else "")
        lines = [f"# {self.title}", ""]
        lines.append(
            f"Run: `{cmd}` in {elapsed:.1f} s on {platform.machine()} ({os.cpu_count()} logical CPUs), Python "
            f"{platform.python_version()}, {date}, at commit `{prov['commit']}`"
            + (f" with uncommitted changes to {', '.join(prov['uncommitted_sources'])}" if prov["uncommitted_sources"] else "")
            + "."
        )
        if self.quick:
            lines.append("")
            lines.append("**Quick mode** (tiny sizes for the smoke tests): the numbers are not the experiment's.")
        lines += ["", "## Claims", "", "| claim | status | numbers | source |", "|---|---|---|---|"]
        for c in self.claims:
            lines.append(f"| {_cell(c.name)} | {c.status} | {_cell(c.detail)} | {_cell(c.source)} |")
        lines += [
            "",
            "PASS/FAIL: a claim of the paper (or an exact identity) that fails the run when it does not hold. "
            "REPORT: an expectation that rests on our own reconstruction of a protocol or a stand-in problem; "
            "reported, never failed.",
        ]
        for s in self.sections:
            lines += ["", s]
        if self.figures:
            lines += ["", "## Figures"]
            for fname, cap in self.figures:
                lines += ["", f"![{cap}]({fname})", "", f"*{cap}*"]
        lines += ["", "## Provenance", "", f"Sources (SHA-256 of the exact bytes; the result is stale when one changes, see `{self.name}.json`):", ""]
        lines += [f"- `{p}` `{h[:16]}`" for p, h in prov["sources"].items()]
        path = self.out / f"{self.name}.md"
        path.write_text("\n".join(lines) + "\n")
        record = {
            "experiment": self.name,
            "command": cmd,
            "quick": self.quick,
            "date": date,
            "elapsed_s": round(elapsed, 1),
            **prov,
            "claims": [{"name": c.name, "status": c.status, "numbers": c.detail, "source": c.source} for c in self.claims],
        }
        (self.out / f"{self.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}  ({elapsed:.1f} s)")
        n_fail = len(self.failed)
        print(f"{self.name}: {sum(c.passed for c in self.claims)}/{len(self.claims)} claims hold; {n_fail} strict failure(s)")
        return 1 if n_fail else 0


def _cell(text: str) -> str:
    """Escape the pipes of a Markdown table cell."""
    return str(text).replace("|", "\\|")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def run_main(main: Any) -> None:
    """``sys.exit(main())`` for ``python -m``."""
    sys.exit(main())


@contextlib.contextmanager
def one_thread_per_framework(jax_x64: bool = False) -> Iterator[None]:
    """Run an experiment with one thread per framework, and give the process its settings back afterwards.

    The models are small: more threads gain nothing, and on a shared CPU oversubscribed thread pools make every
    operation many times slower. torch's intra-op threads are set to 1; JAX's CPU client gets
    ``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` through ``XLA_FLAGS`` (read once, when
    JAX first starts a backend: a process that already runs JAX keeps its own); ``jax_x64`` turns on float64 in
    JAX. torch's thread count, ``XLA_FLAGS`` and JAX's float64 flag are restored on exit, so a script's ``main``
    can be called inside another program (the smoke tests call it in the test process) without changing it.
    """
    import torch

    threads = torch.get_num_threads()
    had_flags = "XLA_FLAGS" in os.environ
    flags = os.environ.get("XLA_FLAGS")
    x64 = None
    torch.set_num_threads(1)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    try:
        if jax_x64:
            import jax

            x64 = bool(jax.config.jax_enable_x64)
            jax.config.update("jax_enable_x64", True)
        yield
    finally:
        torch.set_num_threads(threads)
        if had_flags:
            os.environ["XLA_FLAGS"] = flags  # type: ignore[assignment]
        else:
            os.environ.pop("XLA_FLAGS", None)
        if x64 is not None:
            import jax

            jax.config.update("jax_enable_x64", x64)
