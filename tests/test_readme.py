"""The README documents what the code does: set-up commands, every scorer, every statistic."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_opens_with_the_two_setup_commands_that_ci_runs() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert first_block, "the README must open with a bash block of set-up commands"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["pip install -e '.[dev]'", "pytest"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    for command in commands:
        assert f"\n{command}\n" in ci


def test_scorer_and_statistics_tables_are_current() -> None:
    """Regenerate with ``fedmte scorers --markdown`` when a scorer or statistic changes."""
    done = subprocess.run([sys.executable, "-m", "fedmte", "scorers", "--markdown"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for line in done.stdout.strip().splitlines():
        if line.strip():
            assert line in README, f"README is missing or has a stale row: {line}"
