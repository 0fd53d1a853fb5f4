"""``fedmte.client.request_guard``: the nonces a site accepted, on disk, pruned past twice the window."""

from __future__ import annotations

from pathlib import Path

from fedmte.client.request_guard import SeenNonces

A, B, C = "a" * 32, "b" * 32, "c" * 32


def test_a_nonce_is_accepted_once_also_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs" / "seen-nonces.txt"
    seen = SeenNonces(path, window=600)
    assert seen.remember(A, 1000.0, now=1000.0)
    assert not seen.remember(A, 1000.0, now=1001.0)
    assert not SeenNonces(path, window=600).remember(A, 1000.0, now=1002.0)  # a new process reads the file
    assert A in SeenNonces(path) and B not in SeenNonces(path)


def test_nonces_are_pruned_only_past_twice_the_window(tmp_path: Path) -> None:
    path = tmp_path / "seen.txt"
    seen = SeenNonces(path, window=10)
    for k in range(70):
        assert seen.remember(f"{k:032x}", 100.0, now=100.0)
    assert seen.remember(B, 115.0, now=115.0)  # 15 s later: within 2 * window, nothing pruned
    assert f"{0:032x}" in seen
    assert seen.remember(C, 121.0, now=121.0)  # 21 s after the first 70 were issued: they go
    assert f"{0:032x}" not in seen and B in seen and C in seen
    assert len(path.read_text().splitlines()) == 2


def test_a_torn_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "seen.txt"
    path.write_text(f"{A} 5.0\n{B[:20]}")  # a crash in the middle of the last line
    seen = SeenNonces(path)
    assert A in seen and B not in seen and not seen.remember(A, 5.0, now=6.0)
    assert seen.remember(C, 6.0, now=6.0) and C in seen and A in seen  # on a line of its own
    assert path.read_text().splitlines()[-1] == f"{C} 6.0"
