"""Run every experiment in turn: ``python -m benchmarks.experiments [--quick] [--out DIR] [names...]``.

Exits with the number of experiments whose strict claims failed (0 when all hold); an experiment that
cannot run (e.g. a missing framework for ``real_data``) counts as a failure.
"""

from __future__ import annotations

import importlib
import sys
import time

from . import EXPERIMENTS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in argv if a in EXPERIMENTS] or list(EXPERIMENTS)
    passthrough = [a for a in argv if a not in EXPERIMENTS]
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
