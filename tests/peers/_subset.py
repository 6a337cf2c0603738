"""The default run's subset of the peers' suites: the first registered rule of each kind (plain elementwise,
elementwise with an extra per-element input, matrix). ``nox -s peers`` (pytest ``-m peers``) runs every rule."""

from __future__ import annotations

from xpoptim.core import SPECS
from xpoptim.core.spec import MatrixSpec


def kind(name: str) -> str:
    """``"matrix"``, ``"extras"`` (a rule with an extra input such as ``grad_variance``) or ``"elementwise"``."""
    spec = SPECS[name]
    if isinstance(spec, MatrixSpec):
        return "matrix"
    return "extras" if getattr(spec, "extras", ()) else "elementwise"


def _representative() -> tuple[str, ...]:
    first: dict[str, str] = {}
    for name in SPECS:
        first.setdefault(kind(name), name)
    return tuple(first.values())


#: Registry names of the default subset.
REPRESENTATIVE: tuple[str, ...] = _representative()
