"""``fedmte audit``: read, verify and export a site's audit log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import VerificationError

if TYPE_CHECKING:  # cryptography, pydantic and scipy load when a command runs, not for --help
    from fedmte.client.audit_log import AuditVerification
    from fedmte.protocol.audit_format import IntentRecord, PrivacyCharge

console = Console()
stderr = Console(stderr=True, soft_wrap=True)  # messages stay on one line, whatever the width

audit_app = typer.Typer(name="audit", help="Read, verify and export a site's audit log.", no_args_is_help=True)


def _when(ts: str) -> str:
    return ts[:19].replace("T", " ") + "Z"


def _release_cost(charge: PrivacyCharge | None) -> str:
    from fedmte.protocol import dp

    if charge is None:
        return "-"
    if charge.mechanism == "none":
        return "none: DP off, exact sums"
    if charge.cached:
        return "0 (cached repeat)"
    mu = float(charge.mu_release or 0.0)
    delta = float(charge.delta or 1e-6)
    return f"eps {dp.gdp_epsilon(mu, delta):.3g} (mu {mu:.3g})"  # this release alone, at delta


def _budget_left(charge: PrivacyCharge | None) -> str:
    from fedmte.protocol import dp

    if charge is None or charge.mechanism == "none" or charge.mu_cap is None:
        return "-"
    delta = float(charge.delta or 1e-6)
    left_sq = max(float(charge.mu_cap) ** 2 - float(charge.mu_sq_after), 0.0)
    return (f"eps {float(charge.epsilon_spent or 0):.3g} of {float(charge.epsilon_budget or 0):.3g} used, "
            f"{dp.gdp_epsilon(math.sqrt(left_sq), delta):.3g} left (delta {delta:g})")


def _statistics(record: IntentRecord) -> str:
    seen: dict[tuple[str, tuple[int, ...]], int] = {}
    for block in record.statistics:
        key = (block.kind, tuple(block.shape))
        seen[key] = seen.get(key, 0) + 1
    parts = []
    for (kind, shape), count in seen.items():
        size = "x".join(map(str, shape)) or "scalar"
        parts.append(f"{kind} {size}" + (f" (x{count} models)" if count > 1 else ""))
    return ", ".join(parts) or f"{record.payload.bytes} bytes"


DirOpt = Annotated[Path | None, typer.Argument(
    metavar="[DIR]", help="the site's audit directory (holds log.jsonl); default: the site file's \\[audit] dir",
    show_default=False)]
SiteOpt = Annotated[Path | None, typer.Option(
    "--site", help="the site file: its \\[audit] verification_key_sha256 pins the key, its \\[audit] dir and "
    "ledger_dir are the log and the ledger checked")]
KeyOpt = Annotated[Path | None, typer.Option("--key", help="pin the site's public audit key (PEM)")]
KeyShaOpt = Annotated[str | None, typer.Option(
    "--key-sha256", metavar="HEX", help="pin the fingerprint (hex SHA-256 of the raw key) of the site's audit key")]

UNVERIFIED_EXIT = 3
"""Exit status of ``audit verify`` when the log is consistent but nothing pins its key."""


class _Pins:
    """What one command was given to tie a log to the site: the log, the key pins, the ledger."""

    def __init__(self, directory: Path | None, site: Path | None, key: Path | None, key_sha256: str | None,
                 ledger: Path | None) -> None:
        from fedmte.client.audit_log import load_public_key
        from fedmte.protocol.errors import InvalidInputError

        self.key = load_public_key(key) if key is not None else None
        self.key_sha256 = key_sha256
        self.ledger = ledger
        self.site_note = ""
        if site is not None:
            from fedmte.client.site_config import load_site_config

            audit = load_site_config(site).audit
            directory = directory if directory is not None else audit.dir
            self.ledger = ledger if ledger is not None else audit.ledger_dir
            pinned = audit.verification_key_sha256
            if pinned is None:
                self.site_note = (f"{site} pins no audit key: add [audit] verification_key_sha256 (the fingerprint "
                                  "of the key it signs with) to make it a pin")
            elif key_sha256 is not None and key_sha256.strip().lower() != pinned:
                raise InvalidInputError(f"--key-sha256 {key_sha256[:16]}... disagrees with {site}'s [audit] "
                                        f"verification_key_sha256 {pinned[:16]}...; give one pin")
            else:
                self.key_sha256 = pinned
        if directory is None:
            raise InvalidInputError("name the audit directory (DIR) or the site file (--site site.toml)")
        self.directory = directory

    def verify(self, witnesses: list[Path] | None = None) -> AuditVerification:
        from fedmte.client.audit_log import verify

        return verify(self.directory, self.key, key_sha256=self.key_sha256, witnesses=witnesses or [],
                      ledger_dir=self.ledger)


def _print_result(result: AuditVerification, site_note: str = "") -> None:
    out = console if result.verified else stderr
    style = {"intact": "green", "UNVERIFIED": "bold yellow", "TAMPERED": "bold red"}[result.status]
    out.print(Text(result.summary(), style=style), highlight=False, soft_wrap=True)
    if site_note and not result.verified:
        stderr.print(Text(f"note: {site_note}"), highlight=False, soft_wrap=True)
    for warning in result.warnings:
        stderr.print(Text(f"warning: {warning}"), highlight=False, soft_wrap=True)


@friendly_errors
def show(
    directory: DirOpt = None,
    site: SiteOpt = None,
    key: KeyOpt = None,
    key_sha256: KeyShaOpt = None,
) -> None:
    """A readable table of what left the site: when, to whom, which model, what, at what cost."""
    from fedmte.client.audit_log import count_text, read_records
    from fedmte.protocol.audit_format import AbortRecord, IntentRecord, OutcomeRecord, RefusalRecord

    pins = _Pins(directory, site, key, key_sha256, None)
    records = read_records(pins.directory)
    result = pins.verify()
    outcomes = {r.intent_seq: r.status for r in records if isinstance(r, OutcomeRecord)}
    shown = [r for r in records if isinstance(r, (IntentRecord, RefusalRecord, AbortRecord))]
    kinds: dict[str, int] = {}
    for record in records:
        kinds[record.kind] = kinds.get(record.kind, 0) + 1
    table = Table(title=f"Audit log {pins.directory}: {count_text(len(records), kinds)}; one row per intent, "
                  "refusal and abort (outcomes in the last column)")
    for column in ("#", "when", "to whom", "asked by", "model", "data", "statistics", "privacy spent",
                   "budget", "outcome"):
        table.add_column(column, overflow="fold")
    for record in shown:
        if isinstance(record, IntentRecord):
            models = "\n".join(f"{m.arch_id} {m.weights_sha256[:12]}" for m in record.models) or "-"
            data = record.dataset.data_source if record.dataset else "-"
            table.add_row(str(record.seq), _when(record.ts), record.recipient, record.requester[:16], models, data,
                          _statistics(record), _release_cost(record.privacy), _budget_left(record.privacy),
                          outcomes.get(record.seq, "NO OUTCOME"))
        elif isinstance(record, RefusalRecord):
            models = "\n".join(f"{m.arch_id} {m.weights_sha256[:12]}" for m in record.models) or "-"
            table.add_row(str(record.seq), _when(record.ts), "-", record.requester[:16], models,
                          record.data_source or "-", "-", "0", "-", f"refused: {record.reason_code}")
        else:
            table.add_row(str(record.seq), _when(record.ts), "-", "-", "-", "-", "-", "0", "-",
                          f"aborted: {record.reason_code}")
    console.print(table)
    style = {"intact": "green", "UNVERIFIED": "bold yellow", "TAMPERED": "bold red"}[result.status]
    console.print(Text(result.summary(), style=style), highlight=False, soft_wrap=True)


@friendly_errors
def verify_command(
    directory: DirOpt = None,
    site: SiteOpt = None,
    key: KeyOpt = None,
    key_sha256: KeyShaOpt = None,
    witness: Annotated[list[Path] | None, typer.Option(
        "--witness", help="a checkpoint the coordinator kept (note or exported JSON); repeatable; it must verify "
        "with the log's key, and so pins it")] = None,
    ledger: Annotated[Path | None, typer.Option(
        "--ledger", help="also check this ledger directory against the log (default with --site: its \\[audit] "
        "ledger_dir)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Exit 0 if the log is intact and pinned to the site's key; 1 naming the first bad record
    (or the ledger) when it was tampered with; 3 (UNVERIFIED) when it is consistent but nothing
    pins its key: give --site, --key, --key-sha256 or --witness."""
    pins = _Pins(directory, site, key, key_sha256, ledger)
    result = pins.verify(witness)
    if as_json:
        data = result.model_dump(mode="json")
        data["status"] = result.status
        data["verified"] = result.verified
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_result(result, pins.site_note)
    raise typer.Exit(0 if result.verified else (UNVERIFIED_EXIT if result.ok else 1))


@friendly_errors
def export(
    directory: DirOpt = None,
    site: SiteOpt = None,
    key_sha256: KeyShaOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the JSON here instead of stdout")] = None,
) -> None:
    """The latest signed checkpoint as JSON, for the coordinator to keep as a witness."""
    from fedmte.client.audit_log import latest_checkpoint_export

    pins = _Pins(directory, site, None, key_sha256, None)
    try:
        data = latest_checkpoint_export(pins.directory, key_sha256=pins.key_sha256)
    except VerificationError as error:
        stderr.print(Text(f"not exported: {error}"), highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    text = json.dumps(data, indent=2, sort_keys=True)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")


audit_app.command("show")(show)
audit_app.command("verify")(verify_command)
audit_app.command("export")(export)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
