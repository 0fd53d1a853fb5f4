"""The Flower pin is defined once and checked loudly: a Flower upgrade must fail at start-up."""

from __future__ import annotations

import tomllib
from pathlib import Path

import flwr
import pytest

from fedmte import flower_pin
from fedmte.flower_pin import FLWR_PINNED, FlowerVersionError, check_flwr_internals

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_flower_is_the_pinned_one_with_every_internal_in_place() -> None:
    assert flwr.__version__ == FLWR_PINNED
    check_flwr_internals()


def test_pyproject_and_the_app_bundle_pin_the_same_flower() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    bundle = tomllib.loads((flower_pin.FAB_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    assert f"flwr=={FLWR_PINNED}" in [d.split("#")[0].strip() for d in project["project"]["dependencies"]]
    assert f"flwr=={FLWR_PINNED}" in bundle["project"]["dependencies"]


def test_another_flower_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "9.9.9")
    with pytest.raises(FlowerVersionError, match=f"pinned to flwr=={FLWR_PINNED}, found 9.9.9"):
        check_flwr_internals()


def test_a_moved_internal_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(flower_pin.INTERNALS, "flwr.supercore.retry", ("a_function_flower_never_had",))
    with pytest.raises(FlowerVersionError, match="flwr.supercore.retry no longer has"):
        check_flwr_internals()


def test_site_runner_and_exchange_use_the_one_check() -> None:
    from fedmte.client import site_runner
    from fedmte.server import flower_exchange

    assert site_runner.check_flwr_internals is check_flwr_internals
    assert flower_exchange.flower_pin is flower_pin
    assert not hasattr(flower_exchange, "FLWR_PINNED") and not hasattr(site_runner, "FLWR_PINNED")


def test_a_flower_whose_runtime_api_cannot_be_closed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site runner's Runtime API is closed by Flower's SuperExec secret (issue 11, finding 3):
    a Flower that stopped authenticating AcquireTask, or whose SuperNode loop the runner's
    reply guard can no longer wrap, must not start."""
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode import start_client_internal as loop

    from fedmte.client import site_runner

    assert site_runner.RUNTIME_ACQUIRE_TASK is flower_pin.RUNTIME_ACQUIRE_TASK
    with monkeypatch.context() as patch:
        patch.setattr(run_superexec, "_SUPEREXEC_AUTH_METHODS", frozenset())
        with pytest.raises(FlowerVersionError, match="no longer authenticates"):
            check_flwr_internals()
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_push_messages", lambda state, object_store, push_object: None)
        with pytest.raises(FlowerVersionError, match="lost its 'send' argument"):
            check_flwr_internals()
    check_flwr_internals()
