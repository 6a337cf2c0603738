"""Run the paper experiments: ``python -m benchmarks.experiments [--quick] [--out DIR] [names...]``.

``--check`` lists the committed results that no longer match the code (see ``_provenance``) and exits 1
when there are any, running nothing; ``--stale`` reruns only those. Otherwise every named experiment
(all when none is named) runs in turn. Exits with the number of experiments whose strict claims failed
(0 when all hold); an experiment that cannot run (e.g. a missing framework) counts as a failure.
"""

from __future__ import annotations

import importlib
import sys
import time

from . import EXPERIMENTS
from ._provenance import command, stale_reasons


def stale_experiments(names: list[str]) -> dict[str, list[str]]:
    """Experiment name -> reasons, for those of ``names`` whose committed result is stale."""
    out = {}
    for name in names:
        reasons = stale_reasons(name)
        if reasons:
            out[name] = reasons
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names, passthrough, flags = [], [], set()
    it = iter(argv)
    for a in it:
        if a in ("--check", "--stale"):
            flags.add(a)
        elif a == "--out":
            passthrough += [a, next(it, "")]
        elif a.startswith("-"):
            passthrough.append(a)
        elif a in EXPERIMENTS:
            names.append(a)
        else:
            print(f"unknown experiment {a!r}: expected one of {list(EXPERIMENTS)}")
            return 2
    names = names or list(EXPERIMENTS)
    check, only_stale = "--check" in flags, "--stale" in flags
    if check or only_stale:
        stale = stale_experiments(names)
        for name, reasons in stale.items():
            print(f"{name}: stale; regenerate with `{command(name)}`")
            for r in reasons:
                print(f"    {r}")
        if not stale:
            print("every result matches the current sources")
        if check:
            return 1 if stale else 0
        names = list(stale)
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"===== {name} =====", flush=True)
        rc = importlib.import_module(f"benchmarks.experiments.{name}").main(passthrough)
        print(f"===== {name}: exit {rc} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    print("failed: " + (", ".join(failed) if failed else "none"))
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
