"""MkDocs hook: the API reference covers every public name, and no page keeps an unknown ``xpoptim:`` marker.

After the build, each string in the ``__all__`` of a documented module (read from the source, so no framework is
imported) must be rendered somewhere under ``api/``; a missing one is a warning, which fails ``mkdocs build --strict``.
Listed last in ``mkdocs.yml``, so every marker the other hooks know has been replaced when this one looks.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: The modules of the API reference, by source file. Names built at import time (one optimizer class or alias per
#: spec) are not string literals in ``__all__`` and are listed on the pages in words.
API_MODULES = {
    "xpoptim.core": "src/xpoptim/core/__init__.py",
    "xpoptim.adapters.torch": "src/xpoptim/adapters/torch.py",
    "xpoptim.adapters.optax": "src/xpoptim/adapters/optax.py",
    "xpoptim.adapters.numpy": "src/xpoptim/adapters/numpy.py",
    "xpoptim.adapters.cupy": "src/xpoptim/adapters/cupy.py",
    "xpoptim.adapters.array": "src/xpoptim/adapters/array.py",
    "xpoptim.portable": "src/xpoptim/portable/__init__.py",
    "xpoptim.matrix": "src/xpoptim/matrix.py",
    "xpoptim.testing": "src/xpoptim/testing.py",
}
_rendered: set[str] = set()
log = logging.getLogger("mkdocs.plugins.xpoptim")
_LEFTOVER = re.compile(r"<!-- xpoptim:[^>]*-->")


def public_names(source: str) -> list[str]:
    """The string literals of a module's ``__all__`` (starred, generated entries are skipped)."""
    for node in ast.parse((ROOT / source).read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def on_pre_build(**kwargs: Any) -> None:
    _rendered.clear()


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    for marker in _LEFTOVER.findall(markdown):
        log.warning(f"{page.file.src_uri}: unknown docs marker {marker}")
    return markdown


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri.startswith("api/"):
        _rendered.update(re.findall(r'id="(xpoptim\.[\w.]+)"', html))
    return html


def on_post_build(**kwargs: Any) -> None:
    suffixes = {r.rsplit(".", 1)[-1] for r in _rendered}
    for module, source in API_MODULES.items():
        missing = [n for n in public_names(source) if f"{module}.{n}" not in _rendered and n not in suffixes]
        if missing:
            log.warning(f"API reference: {module} exports {missing}, which no page under api/ renders")
