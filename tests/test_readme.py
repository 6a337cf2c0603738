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
