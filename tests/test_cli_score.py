"""``fedmte score`` on an npz file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedmte
from tests.datasets import make

DATA = make("cli", n=70, d=5, classes=3, seed=41)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmte", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    path = tmp_path / "feats.npz"
    np.savez(path, features=DATA.features, labels=DATA.labels, source_probs=DATA.source_probs)
    return path


def test_json_output_equals_the_api(npz: Path) -> None:
    done = run("score", str(npz), "--scorers", "logme,leep,gbc", "--sites", "3", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    want = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=["logme", "leep", "gbc"])
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-10)


def test_table_output_lists_every_default_scorer(npz: Path) -> None:
    done = run("score", str(npz))
    assert done.returncode == 0, done.stderr
    for name in fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs):
        assert name in done.stdout


def test_errors_are_one_line_with_exit_code_2(npz: Path, tmp_path: Path) -> None:
    done = run("score", str(npz), "--scorers", "knn")
    assert done.returncode == 2 and "knn cannot be federated" in done.stderr and "Traceback" not in done.stderr
    missing = run("score", str(tmp_path / "nope.npz"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.ones(3))
    done = run("score", str(bad))
    assert done.returncode == 2 and "must hold 'labels' and 'features'" in done.stderr
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, features=np.array([object()], dtype=object), labels=np.array([0, 1]))
    done = run("score", str(pickled))
    assert done.returncode == 2 and "not a readable .npz of plain arrays" in done.stderr
