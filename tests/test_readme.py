"""The README's promises that can drift: the set-up commands, .ci/run, and the conventions table."""

from __future__ import annotations

import re
from pathlib import Path

from xpoptim._docs import conventions_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None, "README must open with a bash block holding the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    assert README.index("```bash") < 200, "the set-up commands must open the README"
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert "xpoptim.matrix" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _setup_commands()[1] in ci.splitlines()


def test_conventions_table_is_generated_from_the_specs():
    body = re.search(r"<!-- conventions:begin -->\n(.*?)\n<!-- conventions:end -->", README, re.S)
    assert body is not None
    assert body.group(1) == conventions_table(), "regenerate with: python -m xpoptim._docs"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_examples_run():
    """Every Python example in the README runs as written (torch, optax, NumPy and the verifier)."""
    blocks = _python_blocks()
    assert len(blocks) >= 4
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})


REPO = "https://github.com/xpoptim/xpoptim"
RAW = "https://raw.githubusercontent.com/xpoptim/xpoptim/main/"
DOCS = "https://xpoptim.github.io/xpoptim/"


def _link_targets(text: str) -> list[str]:
    inline = re.findall(r"\]\(([^)\s]+)\)", text)
    reference = re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, re.M)
    html = re.findall(r"""(?:src|href)=["']([^"']+)["']""", text)
    return inline + reference + html


def test_readme_links_are_absolute_and_resolve_in_the_repository():
    """The README is the package index's long description: no relative link or image (they break there), and every
    link into the repository or the docs site names a file that exists."""
    targets = _link_targets(README)
    assert targets, "the README links to its documentation and pictures"
    for url in targets:
        assert url.startswith("https://"), f"relative or non-https link in the README: {url}"
        if url.startswith(RAW):
            path = url[len(RAW) :]
        elif url.startswith(f"{REPO}/blob/main/") or url.startswith(f"{REPO}/tree/main/"):
            path = url[len(REPO) + len("/blob/main/") :]
        elif url.startswith(DOCS):
            page = url[len(DOCS) :].strip("/") or "index"
            path = f"docs/{page}.md"
        else:
            continue
        assert (ROOT / path).exists(), f"{url} points at {path}, which is not in the repository"


def test_readme_examples_are_the_scripts_in_examples():
    """Each quickstart script (run by tests/examples) appears in the README as written, docstring aside."""
    blocks = _python_blocks()
    for script in sorted((ROOT / "examples").glob("quickstart_*.py")):
        text = script.read_text()
        body = text[text.index('"""', 3) + 3 :].strip("\n") + "\n"
        assert body in blocks, f"the README's example differs from {script.relative_to(ROOT)}"
