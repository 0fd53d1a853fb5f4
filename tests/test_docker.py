"""docker/: static checks of the Dockerfiles and compose.yaml (no Docker engine runs here), and
the compose file's entrypoints run as plain processes on loopback.

``docker compose config`` cannot run on these machines (the docker CLI has no compose plugin),
so the compose file is checked here: it parses, every service is hardened and non-root, data is
mounted read-only and audit folders read-write, images are pinned, TLS and node authentication
are on, and every site is a site agent started with its site file
(``--node-config site-file="/credentials/site.toml"``). Then the compose file's own commands
(credential generation, which also writes each site's ``site.toml``: features data, the
coordinator's key pinned; SuperLink; registration; the three sites; the coordinator's
``fedmte run /jobs/job.toml``) run on loopback with their container paths mapped to temporary
folders: the sites must come online over TLS and the shipped job must score their features.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography import x509
from packaging.requirements import Requirement

from fedmte.client.audit_log import read_records
from fedmte.client.site_config import parse_site_config
from fedmte.protocol.keys import fingerprint, load_private_key, public_key_text
from fedmte.server.report import read_report

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = {"coordinator": DOCKER / "Dockerfile.coordinator", "site": DOCKER / "Dockerfile.site"}
SITES = ("site1", "site2", "site3")
NON_ROOT = "10001:10001"
BIN = Path(sys.executable).parent


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, bool, str | None]]:
    """(source, target, read_only, subpath) for every volume of a service, short or long syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            mode = parts[2] if len(parts) > 2 else "rw"
            found.append((parts[0], parts[1], "ro" in mode.split(","), None))
        else:
            subpath = (volume.get("volume") or {}).get("subpath")
            found.append((volume["source"], volume["target"], bool(volume.get("read_only", False)), subpath))
    return found


def _flags(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return [command] if isinstance(command, str) else list(command)


# --------------------------------------------------------------------------- compose, statically

def test_compose_has_one_coordinator_and_three_sites() -> None:
    services = _compose()["services"]
    assert set(services) == {"credentials", "superlink", "register", "coordinator", *SITES}


def test_every_service_is_non_root_read_only_and_without_capabilities() -> None:
    for name, service in _compose()["services"].items():
        assert service.get("user") == NON_ROOT, name
        uid, gid = (int(x) for x in service["user"].split(":"))
        assert uid != 0 and gid != 0, name
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name


def test_images_are_pinned_and_built_from_the_two_dockerfiles() -> None:
    for name, service in _compose()["services"].items():
        image = service["image"]
        assert re.fullmatch(r"fedmte-(coordinator|site):\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"
        kind = image.split(":")[0].removeprefix("fedmte-")
        assert service["build"]["dockerfile"] == f"docker/Dockerfile.{kind}", name
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        assert (kind == "site") == (name in SITES), name


def test_site_data_is_read_only_and_the_audit_folder_read_write() -> None:
    services = _compose()["services"]
    for site in SITES:
        mounts = {target: (source, read_only) for source, target, read_only, _ in _mounts(services[site])}
        assert mounts["/data"] == (f"./sites/{site}/data", True), site
        assert mounts["/audit"] == (f"./sites/{site}/audit", False), site
        assert mounts["/credentials"][1] is True, site
        assert "--decision-log=/audit/decisions.jsonl" in _flags(services[site])
        assert '--node-config=site-file="/credentials/site.toml"' in _flags(services[site])
    for name, service in services.items():
        for source, target, read_only, _ in _mounts(service):
            if source == "credentials" and name != "credentials":
                assert read_only, f"{name} mounts the credentials read-write"
            if target in ("/data", "/jobs", "/models", "/keys"):
                assert read_only, f"{name} mounts {target} read-write"


def test_only_the_coordinator_side_holds_the_coordinators_key() -> None:
    services = _compose()["services"]
    holders = {name for name, service in services.items()
               for source, target, _, sub in _mounts(service) if source == "credentials" and sub == "coordinator"}
    assert holders == {"superlink", "coordinator"}  # the ServerApp signs setups; the CLI checks the key
    for name in holders:
        assert ("credentials", "/keys", True, "coordinator") in _mounts(services[name]), name


def test_the_shipped_job_scores_the_sites_features_with_the_mounted_key() -> None:
    from fedmte.server.job import load_job

    job = load_job(DOCKER / "jobs" / "job.toml")
    assert [c.site_features for c in job.candidates] == [True]
    assert job.connection == "docker" and job.federation.min_sites == len(SITES)
    assert str(job.federation.coordinator_key) == "/keys/coordinator.pem"
    assert str(job.output).startswith("/reports/")  # the folder both the SuperLink and the coordinator mount
    coordinator = {target for _, target, _, _ in _mounts(_compose()["services"]["coordinator"])}
    assert {"/jobs", "/keys", "/reports"} <= coordinator


def test_tls_and_node_authentication_are_on_everywhere() -> None:
    services = _compose()["services"]
    link = _flags(services["superlink"])
    for flag in ("--ssl-ca-certfile=", "--ssl-certfile=", "--ssl-keyfile="):
        assert any(f.startswith(flag) for f in link), flag
    assert "--enable-supernode-auth" in link and "--disable-runtime-dependency-installation" in link
    port = next(f.split("=", 1)[1] for f in link if f.startswith("--port="))
    for site in SITES:
        flags = _flags(services[site])
        assert f"--superlink=superlink:{port}" in flags
        assert "--root-certificates=/credentials/ca.crt" in flags
        assert "--auth-supernode-private-key=/credentials/node_key" in flags
    for name, service in services.items():
        assert "--insecure" not in json.dumps(service), name
    assert _compose()["networks"]["federation"]["internal"] is True


def test_each_site_sees_only_its_own_key() -> None:
    services = _compose()["services"]
    for site in SITES:
        subpaths = [sub for source, _, _, sub in _mounts(services[site]) if source == "credentials"]
        assert subpaths == [f"sites/{site}"]


@pytest.mark.slow  # runs the entrypoints' --help
def test_compose_flags_are_flags_the_entrypoints_know() -> None:
    services = _compose()["services"]
    helps = {
        "superlink": subprocess.run([str(BIN / "flower-superlink"), "--help"], capture_output=True, text=True, timeout=120).stdout,
        "site": subprocess.run([sys.executable, "-m", "fedmte.client.site_runner", "--help"], capture_output=True, text=True, timeout=120).stdout
        + subprocess.run([str(BIN / "flower-supernode"), "--help"], capture_output=True, text=True, timeout=120).stdout,
    }
    checks = [("superlink", _flags(services["superlink"])), *[("site", _flags(services[s])) for s in SITES]]
    for kind, flags in checks:
        for flag in flags:
            name = flag.split("=", 1)[0]
            assert re.search(rf"(^|\s){re.escape(name)}[\s=\[,]", helps[kind]), f"{kind}: unknown flag {name}"


# --------------------------------------------------------------------------- Dockerfiles, statically

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(path):
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_pinned_and_runs_as_non_root(kind: str) -> None:
    stages = _stages(DOCKERFILES[kind])
    assert len(stages) == 2, "a builder stage and a final stage"
    for stage in stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), f"unpinned base {image}"
    builder, final = stages
    assert stages[0][0][1].split()[-1] == "builder"
    users = [args for op, args in final if op == "USER"]
    assert users == [NON_ROOT]
    assert [op for op, _ in final].index("USER") > max(i for i, (op, _) in enumerate(final) if op == "RUN")
    final_runs = " ".join(args for op, args in final if op == "RUN")
    for tool in ("apt-get install", "build-essential", "gcc", "g++", "make ", "python3-dev", "apk add"):
        assert tool not in final_runs, f"the final stage installs {tool}"
    assert "--no-index" in final_runs and "pip check" in final_runs
    builder_runs = " ".join(args for op, args in builder if op == "RUN")
    assert "--only-binary=:all:" in builder_runs and "https://download.pytorch.org/whl/cpu" in builder_runs
    entrypoint = next(args for op, args in final if op == "ENTRYPOINT")
    assert entrypoint.startswith("["), "exec-form ENTRYPOINT, so signals reach the process"


def test_dockerignore_sends_only_what_the_dockerfiles_copy() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "exclude everything, then re-include"
    included = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for path in DOCKERFILES.values():
        for op, args in _instructions(path):
            if op == "COPY" and "--from" not in args:
                sources = args.split()[:-1]
                for source in sources:
                    assert source.rstrip("/") in included, f"{path.name} copies {source}, which .dockerignore drops"
                    assert (ROOT / source).exists(), source


def test_image_requirements_pin_versions_that_satisfy_pyproject() -> None:
    pins: dict[str, str] = {}
    for line in (DOCKER / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        key = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert key in pins, f"{requirement.name} is a dependency but not pinned in docker/requirements.txt"
        assert requirement.specifier.contains(pins[key], prereleases=True), f"{key}=={pins[key]} breaks {dependency}"
    assert pins["torch"].endswith("+cpu")
    builder = " ".join(args for op, args in _instructions(DOCKERFILES["site"]) if op == "RUN")
    assert f"fedmte=={project['version']}" in builder or f'"fedmte=={project["version"]}"' in builder


# --------------------------------------------------------------------------- entrypoints as processes

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Processes:
    """Processes this test started, each in its own session; stopped by pid, never by name."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as handle:
            process = subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        for process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


@pytest.fixture
def processes() -> Iterator[_Processes]:
    running = _Processes()
    try:
        yield running
    finally:
        running.stop()


def _localise(text: str, mapping: dict[str, str]) -> str:
    """Map container paths (and hosts, ports) to local ones in one pass, each only where it
    starts a word or a path: "/audit" in "/credentials/audit.key" stays."""
    pattern = "|".join(re.escape(key) for key in sorted(mapping, key=len, reverse=True))
    return re.sub(rf"(?<![\w/.-])(?:{pattern})", lambda found: mapping[found.group(0)], text)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    return env


@pytest.mark.slow  # runs the compose commands as processes
def test_the_compose_commands_bring_the_sites_online_over_tls_and_run_the_shipped_job(tmp_path: Path, processes: _Processes) -> None:
    services = _compose()["services"]
    credentials = tmp_path / "credentials"
    credentials.mkdir()

    # 1. The credentials service's script, with /credentials mapped here.
    script = services["credentials"]["command"][0]
    assert services["credentials"]["entrypoint"] == ["python", "-c"]
    made = subprocess.run([sys.executable, "-c", script.replace('Path("/credentials")', f"Path({str(credentials)!r})")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    again = subprocess.run([sys.executable, "-c", script.replace('Path("/credentials")', f"Path({str(credentials)!r})")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "keeping them" in again.stdout  # a restart keeps the keys
    cert = x509.load_pem_x509_certificate((credentials / "tls" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink" in sans.get_values_for_type(x509.DNSName)
    for site in SITES:
        assert oct((credentials / "sites" / site / "node_key").stat().st_mode & 0o777) == "0o600"

    # Every file a command names exists under the subpath its service mounts at /credentials.
    def subpath_of(service: str, target: str = "/credentials") -> Path:
        return credentials / next(sub for src, at, _, sub in _mounts(services[service])
                                  if src == "credentials" and at == target)

    for service in ("superlink", "register", "coordinator", *SITES):
        named = json.dumps([services[service].get("entrypoint"), services[service]["command"]])
        for path in re.findall(r"/credentials/[\w.]+", named):
            if "$" not in path:
                assert (subpath_of(service) / path.removeprefix("/credentials/")).is_file(), f"{service}: {path}"
    for path in re.findall(r"/keys/[\w.]+", (DOCKER / "jobs" / "job.toml").read_text()):  # the job's key
        assert (subpath_of("coordinator", "/keys") / path.removeprefix("/keys/")).is_file(), path

    # 2. The SuperLink with the compose flags, on a free loopback port.
    port = _free_port()
    link_map = {"/credentials": str(subpath_of("superlink")), "0.0.0.0": "127.0.0.1", "9092": str(port)}
    link_args = [str(BIN / "flower-superlink"), *(_localise(f, link_map) for f in _flags(services["superlink"]))]
    link_env = _env(tmp_path / "superlink-home") | services["superlink"].get("environment", {})
    link = processes.start(link_args, link_env, tmp_path / "superlink.log")
    deadline = time.monotonic() + 60
    while True:
        assert link.poll() is None, (tmp_path / "superlink.log").read_text()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the SuperLink did not open its port"
            time.sleep(0.2)

    # 3. The register service's shell script, with the connection pointed at that port.
    pub = subpath_of("register")
    (pub / "config.toml").write_text((pub / "config.toml").read_text().replace("superlink:9092", f"127.0.0.1:{port}")
                                     .replace("/credentials/", f"{pub}/"))
    register_script = _localise(services["register"]["command"][0].replace("$$", "$"), {"/credentials": str(pub)})
    register_env = _env(tmp_path / "register-home")
    registered = subprocess.run(["sh", "-c", register_script], env=register_env, capture_output=True, text=True, timeout=300)
    assert registered.returncode == 0, registered.stdout[-2000:] + registered.stderr[-2000:]

    # 4. Each site's site file, as the credentials service wrote it: a site agent over features.
    keys = subpath_of("coordinator", "/keys")
    assert keys == subpath_of("superlink", "/keys") == credentials / "coordinator"
    coordinator_key = load_private_key(keys / "coordinator.pem")
    for site in SITES:
        home = subpath_of(site)
        config = parse_site_config(tomllib.loads((home / "site.toml").read_text()), Path("/credentials"))
        assert config.site.name == site and config.data.kind == "features"
        assert config.data.path == Path("/data/data.npz") and config.site.cache_dir == Path("/cache")
        assert config.audit.dir == Path("/audit/log") and config.audit.ledger_dir == Path("/audit/ledger")
        assert config.audit.signing_key == Path("/credentials/audit.key")
        assert oct((home / "audit.key").stat().st_mode & 0o777) == "0o600"
        assert config.audit.verification_key_sha256 == fingerprint(load_private_key(home / "audit.key"))
        assert list(config.trust.coordinators.values()) == [public_key_text(coordinator_key)]
        assert config.policy is not None and "site_features" in config.policy.allowed_architectures
        assert config.policy.dp.enabled and config.secure is None

    # 5. The three sites with the compose flags and their own mounts (features data read-only).
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(3, 4))
    nodes = {}
    for k, site in enumerate(SITES):
        data, audit, cache = (tmp_path / f"{site}-{what}" for what in ("data", "audit", "cache"))
        for folder in (data, audit, cache):
            folder.mkdir()
        labels = np.arange(200 + 50 * k) % 3
        np.savez(data / "data.npz", features=centres[labels] + rng.normal(size=(len(labels), 4)), labels=labels)
        site_map = {"/credentials": str(subpath_of(site)), "superlink:9092": f"127.0.0.1:{port}",
                    "/data": str(data), "/audit": str(audit), "/cache": str(cache)}
        site_file = subpath_of(site) / "site.toml"  # where the flags point, once /credentials is mapped
        site_file.write_text(_localise(site_file.read_text(), site_map))
        site_args = [sys.executable, "-m", "fedmte.client.site_runner",
                     *(_localise(f, site_map) for f in _flags(services[site])), "--port", str(_free_port())]
        assert f'--node-config=site-file="{site_file}"' in site_args
        nodes[site] = processes.start(site_args, _env(tmp_path / f"{site}-home"), tmp_path / f"{site}.log")
    deadline = time.monotonic() + 120
    online: dict[str, str] = {}
    while len(online) < len(SITES):
        for site, process in nodes.items():
            log = (tmp_path / f"{site}.log").read_text(errors="replace")
            assert process.poll() is None, log[-2000:]
            found = re.search(r"SuperNode ID: (\d+)", log)
            if found:
                online[site] = found.group(1)
        assert time.monotonic() < deadline, f"only {sorted(online)} connected"
        time.sleep(0.3)
    listing = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "docker", "--format", "json"],
                             env=register_env, capture_output=True, text=True, timeout=120)
    status = {node["node-id"]: node["status"] for node in json.loads(listing.stdout[listing.stdout.find("{"):])["nodes"]}
    assert len(status) == len(SITES)  # all three keys were registered
    deadline = time.monotonic() + 60
    while not all(status.get(node) == "online" for node in online.values()):
        assert time.monotonic() < deadline, listing.stdout[-1500:]
        time.sleep(0.5)
        listing = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "docker", "--format", "json"],
                                 env=register_env, capture_output=True, text=True, timeout=120)
        status = {node["node-id"]: node["status"]
                  for node in json.loads(listing.stdout[listing.stdout.find("{"):])["nodes"]}

    # 6. The coordinator's entrypoint and `fedmte run /jobs/job.toml`, with /jobs, /keys and
    #    /reports mapped (the SuperLink's ServerApp reads the key and writes the report at the
    #    same paths as the coordinator).
    jobs, reports = tmp_path / "jobs", tmp_path / "reports"
    jobs.mkdir()
    coordinator_map = {"/credentials": str(subpath_of("coordinator")), "/keys": str(keys), "/reports": str(reports),
                       "/jobs": str(jobs)}
    (jobs / "job.toml").write_text(_localise((DOCKER / "jobs" / "job.toml").read_text(), coordinator_map))
    entrypoint = services["coordinator"]["entrypoint"]
    assert entrypoint[:2] == ["sh", "-c"]
    script = _localise(entrypoint[2].replace("$$", "$"), coordinator_map)
    ran = subprocess.run(["sh", "-c", script, *entrypoint[3:], "run", str(jobs / "job.toml")],
                         env=_env(tmp_path / "coordinator-home"), capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    report = read_report(reports / "site-features" / "report.json")
    assert [s.name for s in report.sites] == list(SITES) and report.privacy.dp_applied
    [model] = report.models
    assert model.name == "site-features"
    assert set(model.scores) | set(model.failures) == {"hscore", "gbc"}, model
    assert "site-features" in ran.stdout
    print(f"\nthe compose job over 3 site agents (DP on): scores {model.scores}, failures {model.failures}")
    for site in SITES:
        decided = [json.loads(line) for line in (tmp_path / f"{site}-audit" / "decisions.jsonl").read_text().splitlines()]
        assert [d["message_type"] for d in decided][:2] == ["query.setup", "query.stats"]
        assert decided[-1]["message_type"] == "query.finish" and all(d["accepted"] for d in decided)
        assert any(r.kind == "intent" for r in read_records(tmp_path / f"{site}-audit" / "log"))
