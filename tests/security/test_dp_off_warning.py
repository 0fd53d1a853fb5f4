"""Finding 7 (by design): with DP off, a coordinator who picks the weights can reconstruct rows.

Nothing in the code can stop that short of DP, so the commands that turn DP off say so, loudly,
before anything starts: ``fedmte demo --dp off`` and ``fedmte local up --no-dp`` print one line
naming the attacks (ReLU imprint models rebuild rows, a tiny-variance mixture component tests
membership) and that only DP bounds them; the README's threat model says the same. The
commands are driven through typer's runner with the part that would start processes replaced
by a stub that stops at once, so the check stays in the fast lane.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.cli.demo import DP_OFF_WARNING, warn_if_dp_off
from fedmte.protocol.errors import FederationError

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_the_warning_names_the_attacks_and_that_only_dp_bounds_them() -> None:
    for words in ("DP is off", "exact sums", "picks the model weights", "reconstruct rows exactly",
                  "imprint", "membership", "mixture component", "only DP bounds"):
        assert words in DP_OFF_WARNING, words
    assert "\n" not in DP_OFF_WARNING
    console = Console(record=True, width=80, soft_wrap=True)
    assert warn_if_dp_off(False, console) is True
    assert console.export_text().strip() == DP_OFF_WARNING  # one line, however narrow the terminal
    quiet = Console(record=True)
    assert warn_if_dp_off(True, quiet) is False and quiet.export_text() == ""


class Stop(FederationError):
    """Raised by the stub standing in for the part that would start processes."""


def stop(*args: object, **kwargs: object) -> None:
    raise Stop("stopped by the test before any process started")


@pytest.mark.parametrize(("args", "warned"), [(["--no-dp"], True), (["--dp"], False), ([], False)])
def test_local_up_warns_before_starting_when_dp_is_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       args: list[str], warned: bool) -> None:
    import fedmte.trial.local_federation as local_federation

    monkeypatch.setattr(local_federation, "up", stop)
    result = runner.invoke(app, ["local", "up", "--dir", str(tmp_path / "fed"), *args])
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    assert (DP_OFF_WARNING in result.output) is warned, result.output


@pytest.mark.parametrize(("args", "warned"), [(["--dp", "off"], True), (["--dp", "on"], False), ([], False)])
def test_demo_warns_before_running_when_dp_is_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  args: list[str], warned: bool) -> None:
    import fedmte.trial.demo as trial_demo

    monkeypatch.setattr(trial_demo, "run_demo", stop)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), *args])
    assert result.exit_code == 2 and "stopped by the test" in result.output, result.output
    assert (DP_OFF_WARNING in result.output) is warned, result.output


def test_the_readme_threat_model_says_what_dp_off_means() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Threat model: what is protected, and what is not", 1)[1].split("\n## ", 1)[0]
    for words in ("DP off", "picks the weights", "imprint", "exactly", "membership", "Only DP bounds"):
        assert words in section, words
