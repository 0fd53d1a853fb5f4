"""The CLI starts light: ``fedmte --help`` and ``fedmte scorers`` load no torch, flwr,
transformers or scikit-learn; commands import what they need when they run.

Each check runs in a fresh interpreter, since this test process has long imported all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "flwr", "transformers", "sklearn")

PROBE = """
import json, sys
from fedmte.cli import app
try:
    app(sys.argv[1:], prog_name="fedmte")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["scorers"], ["demo", "--help"], ["local", "up", "--help"],
                                  ["model", "pack", "--help"], ["features", "--help"]],
                         ids=lambda args: " ".join(args))
def test_help_and_scorers_import_nothing_heavy(args: list[str]) -> None:
    result = _probe(*args)
    assert result["code"] in (0, None), result
    assert result["heavy"] == [], f"fedmte {' '.join(args)} imported {result['heavy']}"


def test_import_fedmte_loads_no_heavy_package() -> None:
    code = "import sys, fedmte; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY + ("numpy", "scipy"),)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_lazy_package_attributes_resolve() -> None:
    import fedmte
    from fedmte.api import score
    from fedmte.protocol.scorers import SCORERS

    assert fedmte.score is score
    assert fedmte.SCORERS is SCORERS
    assert set(fedmte.__all__) <= set(dir(fedmte))
    with pytest.raises(AttributeError):
        fedmte.no_such_name  # noqa: B018


def test_demo_option_defaults_match_the_demo() -> None:
    """fedmte.cli.demo writes these out so that --help need not import the demo."""
    from fedmte.cli import demo as cli_demo
    from fedmte.trial import demo

    assert (cli_demo.DEFAULT_OUT, cli_demo.MIN_SITES, cli_demo.MAX_SITES) == (demo.DEFAULT_OUT, demo.MIN_SITES, demo.MAX_SITES)
