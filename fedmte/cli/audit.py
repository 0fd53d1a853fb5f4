"""``fedmte audit``: read, verify and export a site's audit log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import VerificationError

if TYPE_CHECKING:  # cryptography, pydantic and scipy load when a command runs, not for --help
    from fedmte.protocol.audit_format import IntentRecord, PrivacyCharge

console = Console()
stderr = Console(stderr=True, soft_wrap=True)  # messages stay on one line, whatever the width

audit_app = typer.Typer(name="audit", help="Read, verify and export a site's audit log.", no_args_is_help=True)

DirArg = Annotated[Path, typer.Argument(metavar="DIR", help="the site's audit directory (holds log.jsonl)")]


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


@friendly_errors
def show(directory: DirArg) -> None:
    """A readable table of what left the site: when, to whom, which model, what, at what cost."""
    from fedmte.client.audit_log import read_records, verify
    from fedmte.protocol.audit_format import AbortRecord, IntentRecord, OutcomeRecord, RefusalRecord

    records = read_records(directory)
    outcomes = {r.intent_seq: r.status for r in records if isinstance(r, OutcomeRecord)}
    table = Table(title=f"Audit log {directory}")
    for column in ("#", "when", "to whom", "asked by", "model", "data", "statistics", "privacy spent",
                   "budget", "outcome"):
        table.add_column(column, overflow="fold")
    for record in records:
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
        elif isinstance(record, AbortRecord):
            table.add_row(str(record.seq), _when(record.ts), "-", "-", "-", "-", "-", "0", "-",
                          f"aborted: {record.reason_code}")
    console.print(table)
    result = verify(directory)
    style = "green" if result.ok else "bold red"
    console.print(f"[{style}]{result.summary()}[/]", highlight=False, soft_wrap=True)


@friendly_errors
def verify_command(
    directory: DirArg,
    key: Annotated[Path | None, typer.Option("--key", help="pin the site's public key (PEM); default: keys/audit.pub in DIR")] = None,
    witness: Annotated[list[Path] | None, typer.Option("--witness", help="a checkpoint kept elsewhere (note or exported JSON); repeatable")] = None,
    ledger: Annotated[Path | None, typer.Option("--ledger", help="also check this ledger directory against the log")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Exit 0 if the log is intact; otherwise exit 1 naming the first bad record."""
    from fedmte.client.audit_log import load_public_key, verify
    from fedmte.client.ledger import Ledger

    pinned = load_public_key(key) if key is not None else None
    result = verify(directory, pinned, witnesses=witness or [])
    ledger_problem = None
    if ledger is not None and result.ok:
        try:
            Ledger.open(ledger, site_id=result.site_id or "", expected=result.ledger_head, create=False)
        except VerificationError as error:
            ledger_problem = str(error)
    ok = result.ok and ledger_problem is None
    if as_json:
        data = result.model_dump(mode="json")
        data["ledger_problem"] = ledger_problem
        data["ok"] = ok
        typer.echo(json.dumps(data, indent=2))
    else:
        (console if result.ok else stderr).print(result.summary(), highlight=False, soft_wrap=True)
        if ledger_problem:
            stderr.print(f"TAMPERED ledger: {ledger_problem}", highlight=False)
        for warning in result.warnings:
            stderr.print(f"warning: {warning}", highlight=False)
    raise typer.Exit(0 if ok else 1)


@friendly_errors
def export(
    directory: DirArg,
    out: Annotated[Path | None, typer.Option("--out", help="write the JSON here instead of stdout")] = None,
) -> None:
    """The latest signed checkpoint as JSON, for the coordinator to countersign."""
    from fedmte.client.audit_log import latest_checkpoint_export

    try:
        data = latest_checkpoint_export(directory)
    except VerificationError as error:
        stderr.print(f"not exported: {error}", highlight=False)
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
