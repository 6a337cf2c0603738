"""The peers' suites (torch's generic optimizer tests, optax's alias tests) on xpoptim: every test of a rule outside
the default subset (``_subset.REPRESENTATIVE``) gets the ``peers`` marker, which the default run deselects and
``nox -s peers`` (pytest ``-m peers``) selects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peers._subset import REPRESENTATIVE
from xpoptim.core import SPECS

_HERE = Path(__file__).parent
_OPT_NAME = re.compile(r"opt_name='(\w+)'")


def _rule_of(item: pytest.Item) -> str | None:
    """The registry name of the rule a peer test runs: from torch's test name (``..._<Title>_cpu_<dtype>``) or
    from absl's parameters (``opt_name='...'``)."""
    for name, spec in SPECS.items():
        if f"_{spec.title}_cpu_" in item.name:
            return name
    params = getattr(getattr(item, "obj", None), "__x_params_repr__", "")
    match = _OPT_NAME.search(params or "")
    return match.group(1) if match else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE not in Path(str(item.fspath)).parents:
            continue
        rule = _rule_of(item)
        if rule is not None and rule not in REPRESENTATIVE:
            item.add_marker(pytest.mark.peers)
