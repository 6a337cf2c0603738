"""MkDocs hook: tables generated from the core specs, so the docs cannot drift from the code.

A page writes a marker and the build replaces it:

* ``<!-- xpoptim:conventions -->``: the conventions table (``xpoptim._docs.conventions_table``, the README's).
* ``<!-- xpoptim:hyperparams NAME -->``: name, default, allowed values and meaning of every hyperparameter of
  the optimizer ``NAME`` (registry name).
* ``<!-- xpoptim:memory -->``: the state each rule keeps, counted by allocating it with
  ``xpoptim.core.functional.init`` for sample shapes.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from xpoptim._docs import conventions_table
from xpoptim.core import SPECS, get_spec
from xpoptim.core import functional as F

def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def hyperparams_table(name: str) -> str:
    """Markdown table of one optimizer's hyperparameters, from its spec."""
    spec = get_spec(name)
    rows = ["| hyperparameter | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for h in spec.hyperparams:
        allowed = h.allowed().replace("|", chr(92) + "|")  # the spec's own words, as in its error messages
        rows.append(f"| `{h.name}` | `{_fmt(h.default)}` | {allowed} | {h.doc.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def _state_elements(spec: Any, shape: tuple) -> tuple[list[str], int]:
    state = F.init(spec, np.zeros(shape, np.float32))
    names = [k for k, v in state.items() if v is not None]
    return names, sum(int(np.prod(v.shape)) for v in state.values() if v is not None)


def memory_table() -> str:
    """State kept per parameter element (float32 state: 4 bytes per element), counted from ``functional.init``."""
    rows = [
        "| optimizer | state tensors | state elements per parameter element |",
        "| --- | --- | --- |",
    ]
    for spec in SPECS.values():
        if spec.kind == "elementwise":
            names, n = _state_elements(spec, (1000,))
            per = f"{n / 1000:g}"
        else:
            names, _ = _state_elements(spec, (64, 64))
            shapes = [(512, 512), (256, 1024)]
            counts = [_state_elements(spec, s)[1] / (s[0] * s[1]) for s in shapes]
            per = ", ".join(f"{c:g} for a {s[0]}x{s[1]} matrix" for c, s in zip(counts, shapes))
            per += f"; other parameters: the {get_spec(spec.fallback).title} fallback's"
        rows.append(f"| `{spec.title}` | {', '.join(f'`{n}`' for n in names)} | {per} |")
    return "\n".join(rows)


_MARKER = re.compile(r"<!-- xpoptim:(conventions|memory|hyperparams)(?: ([a-z_]+))? -->")


def _replace(match: re.Match) -> str:
    kind, arg = match.group(1), match.group(2)
    if kind == "conventions":
        return conventions_table()
    if kind == "memory":
        return memory_table()
    return hyperparams_table(arg)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return _MARKER.sub(_replace, markdown)
