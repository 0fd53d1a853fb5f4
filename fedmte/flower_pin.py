"""The Flower edge's one pin: the flwr version fedmte is written against, every Flower
internal it touches, and the app bundle both sides build.

Both the coordinator's exchange (:mod:`fedmte.server.flower_exchange`) and the site runner
(:mod:`fedmte.client.site_runner`) shorten Flower's waits by reaching past its public API.
Everything they reach is listed in :data:`INTERNALS`, and :func:`check_flwr_internals`
refuses to run on another flwr version or when one of those names moved, so a Flower upgrade
fails loudly at start-up (and in ``tests/test_flower_pin.py``) instead of misbehaving.

The app bundle (``fedmte/fab``) is configuration only: it names the ServerApp and ClientApp
modules that the coordinator and each site installed themselves. Coordinators submit it;
sites accept a run only if the bundle's hash matches :func:`installed_fab_hash`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import warnings
from pathlib import Path

from fedmte.protocol.errors import FederationError

FLWR_PINNED = "1.42.0"
"""The exact flwr release; pyproject.toml and the app bundle pin the same (a test checks)."""

FAB_DIR = Path(str(importlib.resources.files("fedmte") / "fab"))
"""The Flower app bundle's source: a pyproject.toml naming fedmte's ServerApp and ClientApp."""

INTERNALS: dict[str, tuple[str, ...]] = {
    "flwr.supernode.cli.flower_supernode": ("flower_supernode", "_parse_args_run_supernode"),
    "flwr.supernode.start_client_internal": ("start_client_internal", "time", "_pull_and_store_message",
                                             "_push_messages"),
    "flwr.supernode.runtime.run_clientapp": ("pull_task_input", "push_message", "push_task_output"),
    "flwr.supercore.runtime": ("RuntimeHttpClient",),
    "flwr.supercore.interceptors": ("RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor",
                                    "SuperExecAuthHttpInterceptor"),
    "flwr.supercore.superexec.run_superexec": ("_SUPEREXEC_AUTH_METHODS",),
    "flwr.supercore.retry": ("make_simple_http_retry_invoker",),
    "flwr.supercore.inflatable.inflatable_utils": ("pull_objects", "pull_and_inflate_object_from_tree"),
    "flwr.superlink.grid.http_grid": ("pull_objects",),
    "flwr.proto.runtime_pb2": ("AcquireTaskRequest", "SendTaskHeartbeatRequest"),
    "flwr.supercore.constant": ("TaskType",),
    "flwr.common.constant": ("ErrorCode", "SubStatus"),
    "flwr.cli.build": ("build_fab_from_disk",),
}
"""Every Flower module attribute fedmte uses beyond the public app API."""


class FlowerVersionError(FederationError):
    """The installed Flower is not the version whose internals fedmte was written against."""


def check_flwr_internals() -> None:
    """Raise :class:`FlowerVersionError` unless flwr is :data:`FLWR_PINNED` with every internal in place."""
    import flwr

    if flwr.__version__ != FLWR_PINNED:
        raise FlowerVersionError(
            f"fedmte's Flower edge is pinned to flwr=={FLWR_PINNED}, found {flwr.__version__}; "
            f"install flwr=={FLWR_PINNED} (or review fedmte.flower_pin.INTERNALS for the new version)"
        )
    for module_name, names in INTERNALS.items():
        module = importlib.import_module(module_name)
        missing = [name for name in names if not hasattr(module, name)]
        if missing:
            raise FlowerVersionError(f"{module_name} no longer has {missing}; review fedmte.flower_pin.INTERNALS")
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid

    for puller in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        if not {"initial_backoff", "backoff_cap"} <= set(puller.__kwdefaults__ or {}):
            raise FlowerVersionError(f"flwr's {puller.__name__} lost its backoff keyword defaults; review "
                                     "fedmte.flower_pin.tune_pull_backoff")
    if http_grid.pull_objects is not inflatable_utils.pull_objects:
        raise FlowerVersionError("flwr's HttpGrid no longer pulls replies through inflatable_utils.pull_objects")
    if TaskType.CLIENT_APP != "flwr-clientapp":
        raise FlowerVersionError(f"unexpected ClientApp task type {TaskType.CLIENT_APP!r}")
    _check_runtime_api_guard()


RUNTIME_ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
"""The Runtime call the SuperNode authenticates with the SuperExec secret (the site runner signs it)."""


def _check_runtime_api_guard() -> None:
    """What the site runner's closed Runtime API rests on: the SuperNode takes a SuperExec
    secret file, Flower authenticates ``AcquireTask`` with it, and the SuperNode loop calls
    its pull and push steps with the keyword arguments the runner's guard wraps."""
    import inspect

    from flwr.supercore.superexec import run_superexec
    from flwr.supernode import start_client_internal as loop

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the package re-exports a function so named
    options = {option for action in cli._parse_args_run_supernode()._actions
               for option in action.option_strings}
    if "--superexec-auth-secret-file" not in options:
        raise FlowerVersionError("flower-supernode no longer takes --superexec-auth-secret-file; the site runner's "
                                 "Runtime API would be open to every local process")
    if RUNTIME_ACQUIRE_TASK not in run_superexec._SUPEREXEC_AUTH_METHODS:
        raise FlowerVersionError(f"Flower no longer authenticates {RUNTIME_ACQUIRE_TASK} with the SuperExec secret")
    for function, keyword in ((loop._pull_and_store_message, "receive"), (loop._push_messages, "send")):
        if keyword not in inspect.signature(function).parameters:
            raise FlowerVersionError(f"flwr's {function.__name__} lost its {keyword!r} argument; review the site "
                                     "runner's guard (fedmte.client.site_runner.guard_supernode)")
    source = inspect.getsource(loop.start_client_internal)
    for call in ("_pull_and_store_message(", "receive=receive", "_push_messages(", "send=send"):
        if call not in source:
            raise FlowerVersionError(f"flwr's SuperNode loop no longer calls {call!r}; review the site runner's guard")


def tune_pull_backoff(initial: float, cap: float) -> None:
    """Lower the object-pull backoff (stock: 1 s initial, 10 s cap) of every puller in this process."""
    from flwr.supercore.inflatable import inflatable_utils

    check_flwr_internals()
    for puller in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        puller.__kwdefaults__["initial_backoff"] = initial
        puller.__kwdefaults__["backoff_cap"] = cap


def installed_fab_hash() -> str:
    """sha256 of the fedmte bundle built from this installation's ``fedmte/fab``.

    ``flwr build`` is deterministic (fixed zip dates, sorted files), so this equals the
    hash of the bundle a coordinator submits from the same fedmte release, unmodified.
    """
    from flwr.cli.build import build_fab_from_disk

    with warnings.catch_warnings():  # pathspec deprecation noise inside flwr's builder
        warnings.simplefilter("ignore", DeprecationWarning)
        return hashlib.sha256(build_fab_from_disk(FAB_DIR)).hexdigest()


__all__ = ["FAB_DIR", "FLWR_PINNED", "INTERNALS", "RUNTIME_ACQUIRE_TASK", "FlowerVersionError", "check_flwr_internals",
           "installed_fab_hash", "tune_pull_backoff"]
