"""MkDocs hook: relative links from a page to repository files outside ``docs/`` work in the site too.

A page may link ``../benchmarks/results/experiments/deva_trace.png`` or ``../src/xpoptim/matrix.py`` so that it reads
well on GitHub. The site has no such files, so before the Markdown is rendered each relative link whose target lies
outside ``docs/`` and exists in the repository is rewritten: a figure under ``benchmarks/results/`` (published into
the site by ``bench_tables.on_files``) to its path in the site, anything else to its page on GitHub
(``repo_url``/blob/main/...). Links to missing files are left alone, so ``--strict`` still reports them.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"(!?\[[^\]]*\])\(([^)\s#]+)(#[^)\s]*)?(\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~)", re.M)


def _rewrite(target: str, page_dir: str, repo_url: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:|^/", target):
        return None  # absolute URL, mailto:, or site-absolute
    path = posixpath.normpath(posixpath.join("docs", page_dir, target))
    if path.startswith("docs/") or path.startswith("..") or not (ROOT / path).exists():
        return None
    if path.startswith("benchmarks/results/") and path.endswith(".png"):
        return posixpath.relpath(path, page_dir or ".")
    kind = "tree" if (ROOT / path).is_dir() else "blob"
    return f"{repo_url.rstrip('/')}/{kind}/main/{path}"


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    page_dir = posixpath.dirname(page.file.src_uri)
    repo_url = config["repo_url"]

    def fix(m: re.Match) -> str:
        new = _rewrite(m.group(2), page_dir, repo_url)
        if new is None:
            return m.group(0)
        return f"{m.group(1)}({new}{m.group(3) or ''}{m.group(4) or ''})"

    # Leave fenced code alone: rewrite only the text between fences.
    parts = re.split(r"(^(?:```|~~~).*?^(?:```|~~~)[^\n]*$)", markdown, flags=re.M | re.S)
    return "".join(p if _FENCE.match(p) else _LINK.sub(fix, p) for p in parts)
