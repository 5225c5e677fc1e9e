"""The README is the user's manual: its test command is what CI runs, and its report schema is current."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smarttrim_cli.profiling.report import schema_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```\n(.*?)\n```", README, re.S)
    test_cmds = [b.strip() for b in blocks if "pytest" in b and "pip install" in b]
    assert len(test_cmds) == 1, test_cmds
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmds[0] in ci.splitlines()


def test_readme_carries_the_current_profile_schema():
    start, end = "<!-- profile-schema:start -->\n", "\n<!-- profile-schema:end -->"
    block = README[README.index(start) + len(start):README.index(end)]
    assert block.strip() == schema_markdown().strip(), (
        "README's report table is stale: regenerate it with\n"
        "python -c \"from smarttrim_cli.profiling.report import schema_markdown; print(schema_markdown())\"")


def test_every_command_in_the_readme_exists():
    from typer.testing import CliRunner

    from smarttrim_cli.cli import app

    used = set(re.findall(r"^smarttrim (\w+)", README, re.M))
    assert {"attach", "finetune", "profile", "export", "demo"} <= used
    for cmd in used:
        r = CliRunner().invoke(app, [cmd, "--help"])
        assert r.exit_code == 0, (cmd, r.output)


def _listed_commands(help_text: str) -> set[str]:
    """Command names in the rich help's Commands panel (a line '│ name   description')."""
    panel = help_text[help_text.index("Commands"):]
    return set(re.findall(r"^│ (\w+) ", panel, re.M))


@pytest.mark.parametrize("module", ["smarttrim_cli", "smarttrim_cli.cli"])
def test_help_lists_every_command_the_readme_documents(module):
    documented = set(re.findall(r"^### `smarttrim (\w+)", README, re.M))
    assert documented == {"attach", "finetune", "profile", "compare", "export", "demo"}
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "120"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _listed_commands(r.stdout) == documented, r.stdout
