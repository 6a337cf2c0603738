"""Generate the README's conventions table from the core specs (so the docs cannot drift).

Run ``python -m xpoptim._docs`` to print it; ``tests/test_readme.py`` checks the README holds exactly
this table between the ``<!-- conventions:begin -->`` and ``<!-- conventions:end -->`` markers.
"""

from __future__ import annotations

from xpoptim.core import MatrixSpec, builtin_specs


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _cell(text: str) -> str:
    """A Markdown table cell: a literal ``|`` (as in ``|m|``) is escaped so it does not end the cell."""
    return text.replace("|", "\\|")


def conventions_table() -> str:
    """Markdown table of the shipped optimizers (rules registered by a user's code are left out): optimizer,
    defaults, conventions (eps, bias correction, weight decay), source."""
    lines = [
        "| optimizer | defaults | conventions (eps, bias correction, weight decay) | source |",
        "| --- | --- | --- | --- |",
    ]
    for spec in builtin_specs():
        defaults = ", ".join(f"{h.name}={_fmt(h.default)}" for h in spec.hyperparams)
        extra = f"; non-matrix params: {spec.fallback}" if isinstance(spec, MatrixSpec) else ""
        cells = (f"`{spec.title}`", defaults, f"{spec.conventions}{extra}", spec.source)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(conventions_table())
