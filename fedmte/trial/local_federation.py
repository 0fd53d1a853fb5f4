"""A loopback federation for trying fedmte out and for tests: one SuperLink, N SuperNodes.

:func:`up` lays out a directory::

    DIR/federation.json       state: PIDs, ports, node ids, paths (LocalFederation)
    DIR/tls/                  ca.crt, server.pem, server.key (fedmte.trial.credentials)
    DIR/flwr/config.toml      the coordinator's Flower connection "local" (FLWR_HOME=DIR/flwr)
    DIR/superlink/            the SuperLink's FLWR_HOME and log
    DIR/coordinator/          the coordinator's Ed25519 key (signs packages and job setups)
    DIR/sites/<name>/         each site's site.toml, data.npz, audit key, node key pair,
                              FLWR_HOME and log (fedmte.trial.local_sites.write_site);
                              with 3 or more sites also keys/identity.pem and a [secure]
                              table in the site file

Every site is a data owner's site: a ``site.toml`` whose policy trusts the coordinator's key
(once, in ``[trust.coordinators]``), and whose audit log, ledger and cache live beside it; the
SuperNode gets ``--node-config 'site-file="DIR/sites/<name>/site.toml"'``. Its data are raw
``inputs`` and ``labels`` (the candidate models of a job run at the site,
:mod:`fedmte.client.site_agent`) or precomputed ``features`` (``[data] kind = "features"``,
scored as a ``site_features`` candidate), under the same policy, clipping, DP and audit. With
three or more sites each site file also gets a ``[secure]`` table
(:func:`fedmte.trial.local_sites.provision`; plain jobs stay allowed) and the example job
(:func:`write_example_job`) carries the job's ``[secure]`` table, so its rounds go through the
secure sum, signed by the same coordinator key.

It then starts ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and
``--disable-runtime-dependency-installation`` (its state in memory: an SQLite file made every
round trip about twice as slow here); registers each site's public key with
``flwr supernode register``; then starts one SuperNode per site with
``--root-certificates``, ``--auth-supernode-private-key``, its own Runtime API port and its
``--node-config``. With ``runner="site"`` (the
default) each site is :mod:`fedmte.client.site_runner`: a SuperNode under
``--isolation process`` plus the site's own runner, which executes only the fedmte ClientApp
it installed and refuses a Flower app bundle whose hash is not on its allowlist. With
``runner="stock"`` each site is a plain ``flower-supernode``, which runs whatever ClientApp
the bundle names (slower: a new process per message, and 3 s idle polls).

:func:`down` stops everything with SIGINT (SuperNodes ignore SIGTERM), then SIGKILL for
whatever is still alive after a grace period. Every process is started in its own session,
and only PIDs recorded in the state file whose command line still names DIR are signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedmte.client.site_config import load_site_config, toml_text
from fedmte.protocol.errors import FederationError, InvalidInputError
from fedmte.protocol.inputs import uneven_split
from fedmte.protocol.secure_rounds import DeclaredBounds
from fedmte.server.job_runner import flwr_command, flwr_env
from fedmte.server.secure_aggregation import SecureJobSpec
from fedmte.trial.credentials import make_node_key, make_tls
from fedmte.trial.local_sites import (
    DP_CLIP_NORM,
    coordinator_key,
    demo_site_inputs,
    example_packages,
    label_space,
    provision,
    write_site,
)

STATE_FILE = "federation.json"
STATE_SCHEMA = "fedmte.local_federation.v1"
CONNECTION = "local"
HOST = "127.0.0.1"
START_TIMEOUT = 90.0
STOP_GRACE = 10.0
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL = 0.1

Runner = Literal["site", "stock"]
EXAMPLE_SCORERS = ("hscore", "gbc", "logme", "nce")
EXAMPLE_DP_SCORERS = ("hscore", "gbc")
"""The example job's scorers with DP on: few rows and noisy sums leave LogME's evidence and
NCE's entropy undefined (they fail in the report); H-score and GBC stay defined."""
SECURE_MIN_SITES = 3
"""The secure sum needs a roster of at least three sites (a strict majority unmasks)."""
SECURE_FEATURE_NORM = 1e3
"""The feature-norm bound the secure sum declares when the sites do not clip (DP off): far
above the example models' feature norms; a site whose features exceed it refuses the round
(a typed bound error), so a sum is never decoded from a wrapped value."""


class SiteProcess(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    node_id: int
    pid: int
    runtime_port: int
    site_file: str
    private_key: str
    public_key: str
    flwr_home: str
    log: str
    command: list[str] = Field(default_factory=list, description="the site process's command line (restart_site reuses it)")


class LocalFederation(BaseModel):
    """The state file of a running loopback federation."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: Literal["fedmte.local_federation.v1"] = Field(default=STATE_SCHEMA, alias="schema")
    directory: str
    runner: Runner
    dp: bool = Field(default=True, description="whether the sites' policies add DP noise")
    address: str
    superlink_pid: int
    superlink_log: str
    ca_cert: str
    flwr_home: str = Field(description="FLWR_HOME of the coordinator's flwr CLI (holds config.toml)")
    connection: str = CONNECTION
    coordinator_key: str = Field(default="", description="the coordinator's signing key (packages, jobs, secure sum)")
    labels: list[str] = Field(default_factory=list, description="the label space of the sites' data")
    sites: list[SiteProcess] = Field(default_factory=list)
    secure: SecureJobSpec | None = Field(default=None, description=">= 3 sites: the example job's [secure] table")

    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands against this federation."""
        return flwr_env(Path(self.flwr_home))


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen(
            args, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )


def _alive(pid: int, marker: str) -> bool:
    """True if ``pid`` runs (not a zombie) and its command line names ``marker``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker in cmdline


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"the SuperLink exited with code {process.returncode}; see {log}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise FederationError(f"the SuperLink did not open port {port} within {timeout:.0f} s; see {log}")


def _flwr(args: list[str], env: dict[str, str], timeout: float = 60.0) -> dict[str, object]:
    done = subprocess.run([flwr_command(), *args, "--format", "json"], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    text = done.stdout
    try:
        parsed = json.loads(text[text.find("{"):]) if "{" in text else {}
    except json.JSONDecodeError:
        parsed = {}
    if not parsed.get("success"):
        raise FederationError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
                              f"{parsed.get('error-message') or (done.stderr or text).strip()[-600:]}")
    return parsed


def register_node(public_key: Path, name: str, env: dict[str, str], attempts: int = 20) -> int:
    """``flwr supernode register``: add a site's public key to the SuperLink; return its node id."""
    last: FederationError | None = None
    for _ in range(attempts):
        try:
            return int(_flwr(["supernode", "register", str(public_key), CONNECTION, "--name", name], env)["node-id"])
        except FederationError as error:  # the Control API may not be up yet
            last = error
            time.sleep(0.25)
    raise FederationError(f"could not register {name}: {last}")


def online_nodes(env: dict[str, str]) -> set[int]:
    """Node ids the SuperLink lists as online."""
    listing = _flwr(["supernode", "ls", CONNECTION], env)
    return {int(node["node-id"]) for node in listing.get("nodes", []) if node.get("status") == "online"}


def wait_until_online(state: LocalFederation, processes: Sequence[subprocess.Popen[bytes]], env: dict[str, str],
                      timeout: float, *, logs: str) -> None:
    """Block until every site of ``state`` is online at the SuperLink; a site process that
    exits, or a timeout, raises :class:`FederationError` pointing at ``logs``."""
    wanted = {site.node_id for site in state.sites}
    deadline = time.monotonic() + timeout
    while not wanted <= online_nodes(env):
        for site, process in zip(state.sites, processes):
            if process.poll() is not None:
                raise FederationError(f"{site.name} exited with code {process.returncode}; see {site.log}")
        if time.monotonic() > deadline:
            raise FederationError(f"not every site came online within {timeout:.0f} s; see {logs}")
        time.sleep(0.2)


def write_connection(flwr_home: Path, address: str, ca_cert: Path) -> None:
    """The coordinator's ``config.toml`` with one TLS connection, ``local``, as default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca_cert))}\n",
        encoding="utf-8",
    )


def demo_site_data(sites: int, *, n: int = 600, dim: int = 8, classes: int = 4, source_classes: int = 5,
                   seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded Gaussian classes with source probabilities, split unevenly over ``sites``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(scale=2.0, size=(classes, dim))
    features = centres[labels] + rng.normal(size=(n, dim))
    logits = rng.normal(size=(n, source_classes)) + 2.0 * np.eye(source_classes)[labels % source_classes]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [{"features": features[r], "labels": labels[r], "source_probs": probs[r]} for r in uneven_split(n, sites)]


def _site_arrays(sites: int, data: Sequence[Path]) -> list[dict[str, np.ndarray]]:
    def read(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}

    if not data:
        return demo_site_inputs(sites, n=3000)
    if len(data) == sites:
        return [read(path) for path in data]
    if len(data) == 1:
        pooled = read(data[0])
        if "labels" not in pooled:
            raise InvalidInputError(f"{data[0]} has no 'labels' array")
        return [{key: value[rows] for key, value in pooled.items()} for rows in uneven_split(len(pooled["labels"]), sites)]
    raise InvalidInputError(f"give one data file per site ({sites}) or one pooled file to split, not {len(data)}")


def load_state(directory: Path) -> LocalFederation:
    path = directory / STATE_FILE
    if not path.is_file():
        raise FederationError(f"no local federation in {directory} (no {STATE_FILE}); start one with `fedmte local up`")
    return LocalFederation.model_validate_json(path.read_text(encoding="utf-8"))


def up(
    directory: Path,
    sites: int,
    *,
    data: Sequence[Path] = (),
    runner: Runner = "site",
    allowlist: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
    dp: bool = True,
    clip_norm: float | None = None,
    policies: Mapping[int, Mapping[str, Any]] | None = None,
    site_args: Mapping[int, Sequence[str]] | None = None,
) -> LocalFederation:
    """Start a loopback federation of ``sites`` sites under ``directory`` and return its state.

    ``data``: one ``.npz`` per site, or one pooled ``.npz`` split unevenly, or nothing for a
    seeded demo set of vectors. Arrays ``inputs`` and ``labels`` make data owners' sites
    (``site.toml``, models run at the site); arrays ``features``, ``labels`` and optionally
    ``source_probs`` make sites of precomputed features. ``dp``, ``clip_norm`` and
    ``policies`` (site index -> policy keys to override) shape the sites' policies
    (:func:`fedmte.trial.local_sites.write_site`). ``allowlist``: extra FAB hashes the site
    runners accept besides the hash of the fedmte bundle they have installed. ``site_args``
    (site index -> extra site-runner options, e.g. ``--drill-crash-on query.secure_upload``
    for a dropout drill) goes to those sites' command lines. On any failure,
    everything started so far is stopped again before the error propagates.
    """
    if sites < 1:
        raise InvalidInputError(f"--sites must be at least 1, got {sites}")
    directory = directory.resolve()
    if (directory / STATE_FILE).exists():
        state = load_state(directory)
        if _alive(state.superlink_pid, str(directory)) or any(_alive(s.pid, str(directory)) for s in state.sites):
            raise FederationError(f"a local federation is already running in {directory}; stop it with `fedmte local down`")
    arrays = _site_arrays(sites, data)
    directory.mkdir(parents=True, exist_ok=True)
    coordinator, key_path = coordinator_key(directory / "coordinator")
    labels = label_space([a["labels"] for a in arrays])
    site_files = {}
    for index, site_arrays in enumerate(arrays):
        name = f"site{index}"
        site_files[name] = write_site(directory / "sites" / name, name, site_arrays, labels, coordinator=coordinator,
                                      dp=dp, clip_norm=clip_norm, policy=(policies or {}).get(index))
    secure: SecureJobSpec | None = None
    if sites >= SECURE_MIN_SITES:  # a [secure] table in each site file (plain jobs still allowed)
        norm = clip_norm if clip_norm is not None else (DP_CLIP_NORM if dp else SECURE_FEATURE_NORM)
        rows = sum(len(a["labels"]) for a in arrays)
        secure = provision(site_files, key_path, bounds=DeclaredBounds(max_rows=max(rows, 1000), feature_norm=float(norm)),
                           require_secure_sum=False)
    state, started = _start_superlink(directory, runner=runner, timeout=timeout, coordinator_key=str(key_path),
                                      labels=labels, dp=dp, secure=secure)
    try:
        for index, (name, site_file) in enumerate(site_files.items()):
            extra = [arg for fab_hash in allowlist for arg in ("--allow-fab", fab_hash)]
            extra += list((site_args or {}).get(index, ()))
            _start_site(state, started, name, site_file.parent, site_file=site_file, extra_args=extra)
        return _come_online(state, started, timeout, logs=f"{directory}/sites/*/supernode.log")
    except BaseException:
        _abandon(directory, started)
        raise


def serve_site_files(directory: Path, site_files: Sequence[Path], *, labels: Sequence[str],
                     timeout: float = START_TIMEOUT) -> LocalFederation:
    """A loopback federation (laid out as :func:`up` does, stopped by :func:`down`) whose
    site runners serve existing site files, as ``fedmte demo`` writes them, instead of
    writing their own. Each node's keys, log and decision log go to ``DIR/nodes/<name>/``."""
    directory = directory.resolve()
    if (directory / STATE_FILE).exists():
        down(directory)  # a federation left running by an interrupted run
    directory.mkdir(parents=True, exist_ok=True)
    state, started = _start_superlink(directory, runner="site", timeout=timeout, labels=list(labels))
    try:
        for site_file in site_files:
            name = load_site_config(site_file).site.name
            _start_site(state, started, name, directory / "nodes" / name, site_file=Path(site_file).resolve())
        return _come_online(state, started, timeout, logs=f"{directory}/nodes/*/supernode.log")
    except BaseException:
        _abandon(directory, started)
        raise


def _start_superlink(directory: Path, *, runner: Runner, timeout: float,
                     **fields: Any) -> tuple[LocalFederation, list[subprocess.Popen[bytes]]]:
    """TLS files, the coordinator's connection and a running SuperLink; the state so far."""
    tls = make_tls(directory / "tls")
    port = free_port()
    address = f"{HOST}:{port}"
    flwr_home = directory / "flwr"
    write_connection(flwr_home, address, tls.ca_cert)
    link_home = directory / "superlink"
    link_env = flwr_env(link_home / "flwr-home")
    link_env[SUPEREXEC_POLL_ENV] = str(SUPEREXEC_POLL)  # start a submitted ServerApp within 0.1 s, not 1 s
    link_log = link_home / "superlink.log"
    link = _spawn([
        _bin("flower-superlink"),
        "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--host", HOST, "--port", str(port),
    ], link_log, link_env)
    try:
        _wait_port(port, link, link_log, timeout)
    except BaseException:
        _abandon(directory, [link])
        raise
    state = LocalFederation(directory=str(directory), runner=runner, address=address,
                            superlink_pid=link.pid, superlink_log=str(link_log), ca_cert=str(tls.ca_cert),
                            flwr_home=str(flwr_home), **fields)
    return state, [link]


def _start_site(state: LocalFederation, started: list[subprocess.Popen[bytes]], name: str, home: Path, *,
                site_file: Path, extra_args: Sequence[str] = ()) -> None:
    """Register the site's new node key and start its SuperNode (or site runner)."""
    keys = make_node_key(home, "node_key")
    node_id = register_node(keys.public_key, name, state.env())
    runtime_port = free_port()
    log = home / "supernode.log"
    node_config = f'site-file="{site_file}"'  # fedmte.client.site_agent.SITE_FILE_KEY
    node_args = [
        "--root-certificates", state.ca_cert, "--superlink", state.address,
        "--auth-supernode-private-key", str(keys.private_key), "--host", HOST, "--port", str(runtime_port),
        "--node-config", node_config,
    ]
    if state.runner == "site":
        args = [sys.executable, "-m", "fedmte.client.site_runner", *node_args,
                "--decision-log", str(home / "decisions.jsonl"), *extra_args]
    else:
        args = [_bin("flower-supernode"), *node_args]
    process = _spawn(args, log, flwr_env(home / "flwr-home"))
    started.append(process)
    state.sites.append(SiteProcess(
        name=name, node_id=node_id, pid=process.pid, runtime_port=runtime_port, site_file=str(site_file),
        private_key=str(keys.private_key),
        public_key=str(keys.public_key), flwr_home=str(home / "flwr-home"), log=str(log), command=args,
    ))


def _come_online(state: LocalFederation, started: Sequence[subprocess.Popen[bytes]], timeout: float, *,
                 logs: str) -> LocalFederation:
    """Write the state file, then wait until every site is online."""
    directory = Path(state.directory)
    (directory / STATE_FILE).write_text(state.model_dump_json(by_alias=True, indent=2), encoding="utf-8")
    wait_until_online(state, started[1:], state.env(), timeout, logs=logs)
    return state


def _abandon(directory: Path, started: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop everything started so far and forget the state file."""
    _stop([p.pid for p in reversed(started)], str(directory))
    for process in started:
        process.poll()
    (directory / STATE_FILE).unlink(missing_ok=True)


def restart_site(directory: Path, name: str, *, timeout: float = START_TIMEOUT) -> LocalFederation:
    """Start site ``name`` again with its recorded command line after it stopped or crashed,
    under a new Flower node key, wait until it is online, and record its new node.

    The SuperLink would refuse the old node until it has missed two heartbeats (up to a
    minute in flwr 1.42), and keeps a public key reserved after its node is unregistered,
    so the old node is unregistered and the site comes back as a new node. Its fedmte
    identity (``identity.pem``, the key the secure sum's roster lists) is unchanged."""
    directory = directory.resolve()
    state = load_state(directory)
    site = next((s for s in state.sites if s.name == name), None)
    if site is None:
        raise InvalidInputError(f"the local federation in {directory} has no site {name!r}")
    if _alive(site.pid, str(directory)):
        raise FederationError(f"site {name} is still running (pid {site.pid}); stop it first")
    if "--auth-supernode-private-key" not in site.command:
        raise FederationError(f"no command line is recorded for site {name}; restart the whole federation "
                              "(`fedmte local down`, then `fedmte local up`)")
    _reap([site.pid])
    env = state.env()
    _flwr(["supernode", "unregister", str(site.node_id), CONNECTION], env)
    home = Path(site.private_key).parent
    keys = make_node_key(home, f"node_key_{time.time_ns()}")
    command = list(site.command)
    command[command.index("--auth-supernode-private-key") + 1] = str(keys.private_key)
    site.node_id = register_node(keys.public_key, name, env)
    site.private_key, site.public_key, site.command = str(keys.private_key), str(keys.public_key), command
    process = _spawn(command, Path(site.log), flwr_env(Path(site.flwr_home)))
    site.pid = process.pid
    (directory / STATE_FILE).write_text(state.model_dump_json(by_alias=True, indent=2), encoding="utf-8")
    try:
        wait_until_online(state.model_copy(update={"sites": [site]}), [process], env, timeout, logs=site.log)
    except BaseException:
        _stop([process.pid], str(directory))
        raise
    return state


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(pids: Sequence[int], marker: str, grace: float = STOP_GRACE) -> list[int]:
    """SIGINT each live pid, wait up to ``grace`` s, then SIGKILL its process group."""
    live = [pid for pid in pids if _alive(pid, marker)]
    for pid in live:
        _signal(pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid, marker) for pid in live):
        _reap(live)
        time.sleep(0.1)
    for pid in live:
        if _alive(pid, marker):
            try:
                os.killpg(pid, signal.SIGKILL)  # the process's own session, started by us
            except ProcessLookupError:
                pass
    _reap(live)
    return live


def _reap(pids: Sequence[int]) -> None:
    """Collect exit statuses of our own children, so they do not linger as zombies."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def down(directory: Path) -> list[int]:
    """Stop the federation recorded in ``directory``: SuperNodes first, then the SuperLink."""
    directory = directory.resolve()
    state = load_state(directory)
    stopped = _stop([site.pid for site in state.sites], str(directory))
    stopped += _stop([state.superlink_pid], str(directory))
    (directory / STATE_FILE).unlink(missing_ok=True)
    return stopped


def write_example_job(state: LocalFederation, scorers: Sequence[str] | None = None) -> Path:
    """Write ``DIR/job.toml``: a :class:`~fedmte.server.job.JobSpec` against this federation,
    for ``fedmte run``. Over sites of raw inputs its candidates are example MLP packages signed
    with the coordinator's key (``DIR/models/``); over features-kind sites, the sites' own
    features (a ``site_features`` candidate)."""
    path = Path(state.directory) / "job.toml"
    config = load_site_config(state.sites[0].site_file)
    if config.data.kind == "features":
        candidates: list[Any] = [{"name": "site-features", "site_features": True}]
    else:
        with np.load(config.data.path, allow_pickle=False) as arrays:
            width = int(arrays["inputs"].shape[1])
        key, _ = coordinator_key(Path(state.coordinator_key).parent)
        packages = example_packages(Path(state.directory) / "models", key, width)
        candidates = [f"models/{name}" for name in packages]
    document = {
        "connection": state.connection,
        "output": "report",
        "purpose": "try fedmte on a loopback federation",
        "labels": list(state.labels),
        "candidates": candidates,
        "scorers": list(scorers or (EXAMPLE_DP_SCORERS if state.dp else EXAMPLE_SCORERS)),
        "federation": {"flwr_home": state.flwr_home, "coordinator_key": state.coordinator_key,
                       "min_sites": len(state.sites), "round_timeout": 120.0, "run_timeout": 600.0},
    }
    if state.secure is not None:  # the site files have [secure] tables: sum with the secure sum
        document["secure"] = state.secure.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    path.write_text("# A scoring job against the loopback federation (fedmte run job.toml).\n" + toml_text(document),
                    encoding="utf-8")
    return path
