"""The documentation the code points to exists: every section of docs/algorithms.md that a docstring, comment or
experiment cites has its anchor, and the page keeps its numbered sections."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = (ROOT / "docs" / "algorithms.md").read_text()
# "docs/algorithms.md section 2.3" and "algorithms.md sections 3.4"; the short form "spec 2.3" / "spec section 4" is read too.
CITATION = re.compile(r"(?:algorithms\.md|\bspec)(?: sections?)? (\d+(?:\.\d+)?)")


def _anchors() -> set[str]:
    return set(re.findall(r"\{#sec-([0-9-]+)\}", ALGORITHMS))


# The numbering docstrings cite: sections 0 to 8 and their subsections.
SECTIONS = ["0", "1", "1.1", "1.2", "1.3", "2", *(f"2.{i}" for i in range(1, 7)), "3", *(f"3.{i}" for i in range(1, 10)),
            "4", *(f"4.{i}" for i in range(1, 6)), "5", "5.1", "5.2", "5.3", "6", *(f"6.{i}" for i in range(1, 9)), "7", "8"]


def test_every_numbered_heading_has_its_anchor():
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? .*$", ALGORITHMS, re.M)
    assert headings == SECTIONS, "docs/algorithms.md keeps the numbered sections docstrings cite, in order"
    for number in headings:
        assert re.search(rf"^#{{2,3}} {re.escape(number)}\.? .*\{{#sec-{number.replace('.', '-')}\}}$", ALGORITHMS, re.M), number


def test_every_cited_section_exists():
    anchors = _anchors()
    cited: dict[str, list[str]] = {}
    for folder in ("src", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for number in CITATION.findall(path.read_text()):
                cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    assert cited, "the code cites the algorithms reference"
    missing = {n: files for n, files in cited.items() if n.replace(".", "-") not in anchors}
    assert not missing, f"cited sections missing from docs/algorithms.md: {missing}"


def test_changelog_has_an_entry_for_this_version():
    from xpoptim import __version__

    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), (
        f"CHANGELOG.md needs a '## [{__version__}] - YYYY-MM-DD' entry for the version in src/xpoptim/_version.py"
    )
