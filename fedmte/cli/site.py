"""``fedmte site``: the data owner's tools: check a site file, make a key, print a key's fingerprint.

``site check`` reads everything the site agent would read at start (the site file, its data,
its keys, its privacy ledger) without writing anything, and reports the effective policy, the
fingerprints of every key, and the privacy budget left per data source in epsilon.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from fedmte.cli.errors import friendly_errors

if TYPE_CHECKING:  # pydantic, scipy and cryptography load when a command runs, not for --help
    from fedmte.client.policy import SitePolicy
    from fedmte.client.site_config import SiteConfig

site_app = typer.Typer(name="site", help="The data owner's tools: check a site file, make keys, print fingerprints.",
                       no_args_is_help=True)

KEY_FILE_NAMES = {"audit": "audit.key", "identity": "identity.pem"}
"""Default file names of ``site keygen``, as the site file's defaults name them (keys/audit.key,
keys/identity.pem)."""


# --------------------------------------------------------------------------- output

def _width() -> int | None:
    """The terminal's width, or None (no wrapping) when stdout is not a terminal."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


class _Lines:
    """Plain lines; on a terminal wrapped at its width between words (never inside one)."""

    def __init__(self, width: int | None) -> None:
        self.width = width
        self.lines: list[str] = []

    def add(self, text: str, indent: int = 0, hang: int = 2) -> None:
        first = " " * indent
        if self.width is None:
            self.lines.append(first + text)
            return
        self.lines.extend(textwrap.wrap(text, width=max(self.width - 1, 20), initial_indent=first,
                                        subsequent_indent=" " * (indent + hang), break_long_words=False,
                                        break_on_hyphens=False) or [""])

    def text(self) -> str:
        return "\n".join(self.lines)


# --------------------------------------------------------------------------- site check

class _Check:
    """What ``site check`` found: a JSON-able report, problems (exit 2) and warnings."""

    def __init__(self, site_file: Path, config: SiteConfig) -> None:
        self.site_file = site_file
        self.config = config
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.report: dict[str, Any] = {"site_file": str(site_file), "site": config.site.name}

    def run(self) -> dict[str, Any]:
        self.report["data"] = self._data()
        self.report["policy"] = self._policy()
        self.report["keys"] = self._keys()
        self.report["budget"] = self._budget()
        self.report["problems"] = self.problems
        self.report["warnings"] = self.warnings
        self.report["ok"] = not self.problems
        return self.report

    # -- data
    def _data(self) -> dict[str, Any]:
        from fedmte.client.data import content_identity, open_site_data, source_files
        from fedmte.protocol.errors import FedmteError

        source = self.config.data
        data: dict[str, Any] = {"kind": source.kind, "path": str(source.path), "opens": False, "rows": None,
                                "labels": None if source.labels is None else list(source.labels),
                                "data_source": None}
        try:
            missing = [str(p) for p in source_files(source) if not p.is_file()]
            if source.kind == "image_folder" and not source.path.is_dir():
                missing = [str(source.path)]
            if missing:
                raise FileNotFoundError(", ".join(missing))
            if source.labels is not None:
                data["rows"] = open_site_data(source).size_hint()
            else:
                self.warnings.append("[data] labels is not set, so the labels are checked only when a job brings its "
                                     "label space; set labels = [...] under [data] to check them here")
            data["data_source"] = ledger_source_name(source.kind, content_identity(source))
            data["opens"] = True
        except FileNotFoundError as error:
            self.problems.append(f"[data] path: {error.args[0] if error.args else source.path} not found; put the "
                                 "data there or fix path under [data] (relative paths start at the site file's "
                                 "folder)")
        except OSError as error:
            self.problems.append(f"[data] path: cannot read {source.path}: {error.strerror or error}; check its "
                                 "permissions, or fix path under [data]")
        except FedmteError as error:
            self.problems.append(f"[data]: {error}")
        return data

    # -- policy
    def _policy(self) -> dict[str, Any] | None:
        from fedmte.protocol.errors import FedmteError

        try:
            policy = self.config.require_policy()
        except FedmteError as error:
            self.problems.append(f"[policy]: {error}")
            return None
        dp = policy.dp
        result = {
            "sha256": policy.sha256(),
            "allowed_scorers": sorted(policy.allowed_scorers),
            "allowed_statistics": sorted(policy.allowed_statistics),
            "allowed_transforms": sorted(policy.allowed_transforms),
            "allowed_architectures": sorted(policy.allowed_architectures),
            "max_feature_dim": policy.max_feature_dim,
            "clip_norm": policy.clip_norm,
            "min_noisy_class_count": policy.min_noisy_class_count,
            "dp": {"enabled": dp.enabled, "epsilon_per_release": dp.epsilon_per_release,
                   "epsilon_budget": dp.epsilon_budget, "delta": dp.delta, "neighbouring": dp.neighbouring,
                   "allocation": dp.allocation, "distributed": dp.distributed, "colluding_sites": dp.colluding_sites,
                   "mu_per_release": dp.mu_per_release, "mu_cap": dp.mu_cap},
        }
        for rule in ("allowed_scorers", "allowed_statistics", "allowed_architectures"):
            if not result[rule]:
                self.warnings.append(f"[policy] {rule} is empty, so every job is refused (default deny); list what "
                                     "this site allows")
        if not dp.enabled:
            self.warnings.append("[policy.dp] enabled = false: releases are exact sums, with no privacy guarantee; "
                                 "set enabled = true unless every party may see the exact statistics")
        return result

    # -- keys
    def _keys(self) -> list[dict[str, Any]]:
        from fedmte.protocol.keys import fingerprint, parse_public_key

        keys: list[dict[str, Any]] = []
        coordinators = self.config.trust.coordinators
        for name, text in coordinators.items():
            keys.append({"role": "coordinator", "name": name, "where": f"[trust.coordinators] {name}",
                         "fingerprint": fingerprint(parse_public_key(text)), "public_key": text})
        if not coordinators:
            self.problems.append("[trust.coordinators] is empty, so this site accepts no package, job or secure-sum "
                                 "request; add name = \"ed25519:...\" (the coordinator's public key, which "
                                 "`fedmte site fingerprint` prints)")
        audit = self.config.audit
        entry = self._key_entry("audit", "audit signing key", "[audit] signing_key", audit.signing_key,
                                f"to start a new log, make a key with `fedmte site keygen {audit.signing_key.parent}`")
        entry["pinned"] = audit.verification_key_sha256
        if entry["fingerprint"] is not None:
            pinned = audit.verification_key_sha256
            if pinned is None:
                self.warnings.append(f"[audit] verification_key_sha256 is not set, so a swapped audit key would go "
                                     f"unnoticed; pin it: verification_key_sha256 = \"{entry['fingerprint']}\"")
            elif pinned != entry["fingerprint"]:
                self.problems.append(f"[audit] verification_key_sha256: the key {audit.signing_key} is "
                                     f"{entry['fingerprint']}, not the pinned {pinned}; restore the pinned key "
                                     "(the log is signed with it), or re-pin only if you start a new audit log")
        keys.append(entry)
        secure = self.config.secure
        if secure is not None:
            entry = self._key_entry(
                "identity", "secure identity key", "[secure] identity_key", secure.identity_key,
                f"make one with `fedmte site keygen {secure.identity_key.parent} --kind identity` and send its "
                "public key to the other sites' rosters")
            if entry["fingerprint"] is not None:
                listed = secure.roster.get(self.config.site.name)
                if listed is not None and listed != entry["public_key"]:
                    self.problems.append(f"[secure.roster] {self.config.site.name}: lists {listed}, but "
                                         f"{secure.identity_key} holds {entry['public_key']}; put that key in the "
                                         "roster (here and at every peer and the coordinator), or restore the key")
            keys.append(entry)
        return keys

    def _key_entry(self, role: str, name: str, key: str, path: Path, when_missing: str) -> dict[str, Any]:
        """A private key's row (its fingerprint and public key), or a problem naming ``key`` and,
        when the file is missing, how to make one."""
        from fedmte.protocol.errors import FedmteError
        from fedmte.protocol.keys import fingerprint, load_private_key, public_key_text

        entry: dict[str, Any] = {"role": role, "name": name, "where": f"{key} {path}", "fingerprint": None,
                                 "public_key": None}
        try:
            loaded = load_private_key(path)
        except FedmteError as error:
            self.problems.append(f"{key}: {error}" + ("" if path.exists() else f"; {when_missing}"))
        else:
            entry["fingerprint"], entry["public_key"] = fingerprint(loaded), public_key_text(loaded)
        return entry

    # -- budget
    def _budget(self) -> list[dict[str, Any]]:
        from fedmte.client.ledger import LEDGER_FILE, Ledger
        from fedmte.protocol.errors import FedmteError

        policy = self.config.policy
        if policy is None:
            return []
        ledger_dir = self.config.audit.ledger_dir
        spent: dict[str, tuple[float, float, int]] = {}
        if (ledger_dir / LEDGER_FILE).exists():
            try:
                ledger = Ledger.open(ledger_dir, site_id=self.config.site.name, expected=None, create=False)
            except FedmteError as error:
                self.problems.append(f"[audit] ledger_dir: {error}; `fedmte audit verify --site {self.site_file}` "
                                     "compares the ledger with the signed audit log")
                return []
            spent = {source: (float(s.mu_sq), s.alone_sq, s.releases) for source, s in ledger.state.sources.items()}
        current = self.report.get("data", {}).get("data_source")
        if current is not None:
            spent.setdefault(current, (0.0, 0.0, 0))
        return [budget_left(policy, source, mu_sq, alone_sq, releases, current=source == current)
                for source, (mu_sq, alone_sq, releases) in sorted(spent.items(), key=lambda s: s[0] != current)]


def ledger_source_name(kind: str, identity: str) -> str:
    """The name the site agent's ledger keeps a data source's budget under
    (:attr:`fedmte.client.site_agent.SiteAgent.data_source`)."""
    return f"{kind}:sha256:{identity}"


def budget_left(policy: SitePolicy, source: str, mu_sq: float, alone_sq: float, releases: int, *,
                current: bool) -> dict[str, Any]:
    """One data source's budget in epsilon at the policy's delta. Gaussian DP composes by adding
    mu^2, so the epsilon spent and the epsilon left are each converted from mu, not subtracted."""
    from fedmte.client.ledger import CAP_RELATIVE_SLACK
    from fedmte.protocol import dp

    settings = policy.dp
    delta, mu_cap, mu_release = settings.delta, settings.mu_cap, settings.mu_per_release
    cap_sq = mu_cap * mu_cap * (1.0 + CAP_RELATIVE_SLACK)  # what the ledger lets a release reach
    left_sq = max(mu_cap * mu_cap - mu_sq, 0.0)
    count = max(int(math.floor(left_sq / (mu_release * mu_release))), 0)
    while count > 0 and mu_sq + count * mu_release * mu_release > cap_sq:
        count -= 1
    while mu_sq + (count + 1) * mu_release * mu_release <= cap_sq:
        count += 1
    return {
        "data_source": source, "current": current, "releases_spent": releases, "delta": delta,
        "mu_sq_spent": mu_sq, "mu_spent": math.sqrt(mu_sq), "epsilon_spent": dp.gdp_epsilon(math.sqrt(mu_sq), delta),
        "epsilon_spent_alone": dp.gdp_epsilon(math.sqrt(alone_sq), delta),
        "epsilon_budget": settings.epsilon_budget, "mu_cap": mu_cap,
        "epsilon_left_one_release": dp.gdp_epsilon(math.sqrt(left_sq), delta),
        "epsilon_per_release": settings.epsilon_per_release, "releases_left": count,
    }


def _num(value: float) -> str:
    return f"{value:.3g}"


def _source_text(name: str) -> str:
    kind, _, digest = name.partition(":sha256:")
    return f"{kind} data, content sha256 {digest}" if digest else name


def _render_check(report: dict[str, Any], width: int | None) -> str:
    out = _Lines(width)
    state = "OK" if report["ok"] else f"{len(report['problems'])} problem(s)"
    out.add(f"Site file {report['site_file']} (site {report['site']}): {state}")
    data = report["data"]
    out.add("Data")
    rows = f", {data['rows']} rows" if data["rows"] is not None else ""
    labels = f"; labels: {', '.join(data['labels'])}" if data["labels"] else ""
    out.add(f"{data['kind']} at {data['path']}: {'opens' if data['opens'] else 'does NOT open'}{rows}{labels}", 2)
    if data["data_source"]:
        out.add(f"budget kept as: {_source_text(data['data_source'])}", 2)
    policy = report["policy"]
    if policy is not None:
        out.add(f"Policy (default deny; sha256 {policy['sha256']})")
        for rule in ("scorers", "statistics", "transforms", "architectures"):
            out.add(f"{rule}: {', '.join(policy['allowed_' + rule]) or 'none'}", 2)
        out.add(f"max feature dim {policy['max_feature_dim']}, clip norm {policy['clip_norm']:g}, min noisy class "
                f"count {policy['min_noisy_class_count']:g}", 2)
        dp = policy["dp"]
        if dp["enabled"]:
            colluding = ("the secure sum's own tolerance" if dp["colluding_sites"] is None
                         else str(dp["colluding_sites"]))
            out.add(f"DP on: epsilon {dp['epsilon_per_release']:g} per release, budget epsilon "
                    f"{dp['epsilon_budget']:g} per data source, delta {dp['delta']:g} (mu {_num(dp['mu_per_release'])} "
                    f"per release, cap mu {_num(dp['mu_cap'])})", 2)
            distributed = "yes (only through the secure sum)" if dp["distributed"] else "no"
            out.add(f"neighbouring {dp['neighbouring']}, allocation {dp['allocation']}, distributed noise "
                    f"{distributed}, colluding sites: {colluding}", 2)
        else:
            out.add("DP off: releases are exact sums", 2)
    out.add("Keys (sha256 fingerprints of the raw public keys)")
    for key in report["keys"]:
        label = f"coordinator {key['name']}" if key["role"] == "coordinator" else key["name"]
        extra = ""
        if key["role"] == "audit" and key["fingerprint"]:
            extra = (" (pinned)" if key["pinned"] == key["fingerprint"] else
                     " (not pinned)" if key["pinned"] is None else " (NOT the pinned key)")
        out.add(f"{label}: {key['fingerprint'] or 'unreadable'}{extra}", 2)
    if report["budget"]:
        delta = report["budget"][0]["delta"]
        out.add(f"Privacy budget per data source (Gaussian DP, at delta {delta:g})")
        out.add("Releases compose by adding their mu^2, not their epsilons: the epsilon spent and the epsilon left "
                "are each converted from mu, so they need not add up to the budget.", 2)
        for entry in report["budget"]:
            this = " (this site's data)" if entry["current"] else ""
            out.add(f"{_source_text(entry['data_source'])}{this}", 2)
            out.add(f"spent: epsilon {_num(entry['epsilon_spent'])} (mu {_num(entry['mu_spent'])}) in "
                    f"{entry['releases_spent']} release(s), of the budget epsilon {entry['epsilon_budget']:g} "
                    f"(mu {_num(entry['mu_cap'])})", 4)
            out.add(f"left: {entry['releases_left']} release(s) at epsilon {entry['epsilon_per_release']:g} each, "
                    f"or one of up to epsilon {_num(entry['epsilon_left_one_release'])}", 4)
            if entry["epsilon_spent_alone"] > entry["epsilon_spent"] * (1 + 1e-9):
                out.add(f"by this site's noise alone (should the secure sum fail): epsilon "
                        f"{_num(entry['epsilon_spent_alone'])} spent", 4)
    for warning in report["warnings"]:
        out.add(f"warning: {warning}")
    return out.text()


def _unknown_key_hints(document: dict[str, Any]) -> list[str]:
    """'did you mean' for each key of a parsed site file that no table of :class:`SiteConfig` has."""
    import difflib

    from pydantic import BaseModel

    from fedmte.client.site_config import ArraySource, FeaturesSource, ImageFolderSource, SiteConfig, TableSource

    sources = {"image_folder": ImageFolderSource, "table": TableSource, "arrays": ArraySource,
               "features": FeaturesSource}
    hints: list[str] = []

    def walk(table: dict[str, Any], model: type[BaseModel], where: str) -> None:
        names = {info.alias or name: info for name, info in model.model_fields.items()}
        for key, value in table.items():
            dotted = f"{where}.{key}" if where else key
            info = names.get(key)
            if info is None:
                close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
                hints.append(f"{dotted} is not a key of {'[' + where + ']' if where else 'the site file'}"
                             + (f"; did you mean {close[0]}?" if close else f"; its keys are {', '.join(names)}"))
                continue
            sub = _model_of(info.annotation)
            if key == "data" and not where and isinstance(value, dict):
                sub = sources.get(value.get("kind", "image_folder"))
            if sub is not None and isinstance(value, dict):
                walk(value, sub, dotted)

    walk(document, SiteConfig, "")
    return hints


def _model_of(annotation: Any) -> Any:
    """The pydantic model a field holds (through ``X | None``), else None."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def load_checked(site_file: Path) -> SiteConfig:
    """:func:`load_site_config` with messages that say what to do, for the site file named on the command line."""
    import tomllib

    from fedmte.client.errors import SiteConfigError
    from fedmte.client.site_config import load_site_config

    if not site_file.is_file():
        raise SiteConfigError(f"site file {site_file} not found; give the path of your site.toml, or write a "
                              "commented template with `fedmte init site DIR`")
    try:
        return load_site_config(site_file)
    except SiteConfigError as error:
        try:
            hints = _unknown_key_hints(tomllib.loads(site_file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            hints = []
        message = str(error) + "".join(f"; {hint}" for hint in hints)
        raise SiteConfigError(f"{message}. Fix the key(s) named here in {site_file}; `fedmte init site DIR` writes a "
                              "template documenting every key") from None


@site_app.command("check")
@friendly_errors
def check(
    site_file: Annotated[Path, typer.Argument(metavar="SITE.toml", help="the site file to check")],
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check a site file as the site agent would, writing nothing: the file, its data, its keys and
    its ledger. Prints the effective policy, every key's fingerprint and the privacy budget left per
    data source. Exit 0 when all is well, 2 naming each problem and its fix."""
    config = load_checked(site_file)
    report = _Check(site_file, config).run()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(_render_check(report, _width()))
        if report["problems"]:
            err = _Lines(shutil.get_terminal_size().columns if sys.stderr.isatty() else None)
            for problem in report["problems"]:
                err.add(f"error: {problem}")
            typer.echo(err.text(), err=True)
    if report["problems"]:
        raise typer.Exit(2)


# --------------------------------------------------------------------------- keys

@site_app.command("keygen")
@friendly_errors
def keygen(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="the folder to write the key into (made if missing)")],
    kind: Annotated[Literal["audit", "identity"], typer.Option(
        "--kind", help="audit: the key that signs the site's audit log (audit.key, [audit] signing_key); identity: "
        "the site's key in the secure sum (identity.pem, [secure] identity_key)")] = "audit",
    name: Annotated[str | None, typer.Option("--name", help="the file name (default: audit.key or identity.pem)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print path, public key and fingerprint as JSON")] = False,
) -> None:
    """Write a new Ed25519 key (PKCS#8 PEM, mode 0600; an existing file is never overwritten) and print
    its public key and fingerprint."""
    from fedmte.protocol.keys import fingerprint, public_key_text, write_private_key

    path = directory / (name or KEY_FILE_NAMES[kind])
    key = write_private_key(path)
    result = {"path": str(path), "kind": kind, "public_key": public_key_text(key), "fingerprint": fingerprint(key)}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    out = _Lines(_width())
    out.add(f"wrote {path} (mode 600; keep it private and backed up)")
    out.add(f"public key: {result['public_key']}")
    out.add(f"fingerprint: {result['fingerprint']}")
    if kind == "audit":
        out.add(f"pin it in the site file: [audit] signing_key = \"{path}\" and verification_key_sha256 = "
                f"\"{result['fingerprint']}\"")
    else:
        out.add(f"use it in the site file: [secure] identity_key = \"{path}\"; list the public key under "
                "[secure.roster] here, at every peer site and in the coordinator's job")
    typer.echo(out.text())


def read_public_key(text_or_file: str) -> Any:
    """The Ed25519 public key in a file (a private or public PEM, or ``ed25519:...`` text) or given as
    ``ed25519:...`` text itself."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fedmte.protocol.errors import InvalidInputError
    from fedmte.protocol.keys import PUBLIC_KEY_PREFIX, load_private_key, parse_public_key

    if text_or_file.startswith(PUBLIC_KEY_PREFIX):
        return parse_public_key(text_or_file.strip())
    path = Path(text_or_file)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror}; give a key file (PEM) or an ed25519:... "
                                "public key") from None
    text = data.decode("ascii", "replace").strip()
    if text.startswith(PUBLIC_KEY_PREFIX):
        return parse_public_key(text)
    if "PRIVATE KEY" in text:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise InvalidInputError(f"{path} holds no Ed25519 key; give a PEM key file (from `fedmte site keygen` or "
                                "`fedmte model keygen`) or a file holding ed25519:...") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInputError(f"{path} holds a {type(key).__name__}; fedmte pins Ed25519 keys only")
    return key


@site_app.command("fingerprint")
@friendly_errors
def fingerprint_command(
    key_file: Annotated[str, typer.Argument(metavar="KEYFILE", help="a key file (private or public PEM, or a file "
                                            "holding ed25519:...), or an ed25519:... public key")],
    as_json: Annotated[bool, typer.Option("--json", help="print fingerprint and public key as JSON")] = False,
) -> None:
    """Print the sha256 fingerprint of a key (what [audit] verification_key_sha256 and records name a key
    by) and its public key text (what [trust.coordinators] and rosters pin)."""
    from fedmte.protocol.keys import fingerprint, public_key_text

    key = read_public_key(key_file)
    result = {"fingerprint": fingerprint(key), "public_key": public_key_text(key)}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"fingerprint: {result['fingerprint']}\npublic key: {result['public_key']}")


def register(app: typer.Typer) -> None:
    app.add_typer(site_app, name="site")
