"""Independent float64 references for the test suite.

Written directly from ``docs/algorithms.md`` pseudo-code as plain NumPy loops over steps. Nothing here
imports ``xpoptim``: a reference must share no code with what it tests. ``backends`` holds the array-backend
harness used by ``tests/conftest.py``.
"""

from .optimizers import REFERENCES, kappa_reference, ns_reference, run_reference

__all__ = ["REFERENCES", "kappa_reference", "ns_reference", "run_reference"]
