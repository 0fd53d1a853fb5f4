"""Finding 5 (audit gaps), the verification half: a site's audit log rewritten and re-signed
with a new key, and a log cut back to an earlier checkpoint, both fail ``fedmte audit verify``.

The logs are real: a DP job scored at a features-kind site agent (behind
:class:`tests.job_helpers.AgentExchange`, the coordinator's ``execute_job``), which writes
its audit log, its privacy ledger and, through the coordinator, a witness copy of its finish
checkpoint. The attacker has the site's disk but not its audit key: it can rewrite every file
in the audit directory, compute every digest and hash and sign with a key of its own.

* **Forged log, replaced key.** Records rewritten, every checkpoint re-signed with a new key,
  ``keys/audit.pub`` replaced. Against the key stored in the directory the chain is perfect,
  so without a pin ``verify`` must not say "intact": it says UNVERIFIED and exits 3. With the
  site file's pin (``[audit] verification_key_sha256``), the key itself, or the coordinator's
  witness, it exits 1 naming the replaced key or the failed signature.
* **Truncated log.** The log cut back to the signed checkpoint after setup, the later
  checkpoint files and payload copies deleted: the log alone is a consistent, correctly
  signed prefix. The ledger still holds the charges the log no longer records, so ``verify
  --site`` (which checks the site's ledger) exits 1 naming the ledger; so does a witness
  checkpoint larger than what is left.
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedmte.cli import app
from fedmte.client.audit_log import public_key_pem, verify
from fedmte.client.site_config import load_site_config
from fedmte.protocol import audit_format as fmt
from fedmte.server.coordinator import execute_job, load_candidates, write_job_outputs
from fedmte.server.job import job_from_dict
from fedmte.trial.local_sites import coordinator_key, write_site
from tests.datasets import DATASETS
from tests.job_helpers import AgentExchange

DATA = DATASETS["basic"]
LABELS = [f"k{c}" for c in range(DATA.num_classes)]
SITE = "site0"
runner = CliRunner()


@dataclass(frozen=True)
class Site:
    site_file: Path
    audit: Path
    ledger: Path
    witness: Path
    fingerprint: str


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """One features-kind site that answered a DP job (setup, charged rounds, finish)."""
    root = tmp_path_factory.mktemp("audited-site")
    key, _ = coordinator_key(root / "coordinator")
    site_file = write_site(root / SITE, SITE, {"features": DATA.features, "labels": DATA.labels,
                                               "source_probs": DATA.source_probs},
                           LABELS, coordinator=key, dp=True, clip_norm=5.0)
    job = job_from_dict({"connection": "unused", "labels": LABELS, "scorers": ["hscore", "gbc"],
                         "privacy": {"dp": True}, "candidates": [{"name": "features", "site_features": True}],
                         "output": str(root / "out"), "purpose": "audit forgery test"})
    outcome = execute_job(AgentExchange([site_file], "701"), job, load_candidates(job), key, run_id="701")
    write_job_outputs(outcome, root / "out")
    audit = load_site_config(site_file).audit
    assert audit.verification_key_sha256 is not None
    return Site(site_file, audit.dir, audit.ledger_dir, root / "out" / "witnesses" / f"{SITE}.txt",
                audit.verification_key_sha256)


@pytest.fixture
def site(pristine: Site, tmp_path: Path) -> Site:
    """A private copy of the site's folder (site file, audit log, ledger) for one attack."""
    home = tmp_path / SITE
    shutil.copytree(pristine.site_file.parent, home)
    audit = load_site_config(home / "site.toml").audit
    return Site(home / "site.toml", audit.dir, audit.ledger_dir, pristine.witness, pristine.fingerprint)


def lines(audit: Path) -> list[bytes]:
    return (audit / "log.jsonl").read_bytes().split(b"\n")[:-1]


def cli(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["audit", "verify", *map(str, args)], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_the_untouched_log_is_intact_only_when_pinned(site: Site) -> None:
    code, output = cli("--site", site.site_file)
    assert code == 0 and output.startswith("intact:") and "ledger" in output, output
    assert cli(site.audit, "--witness", site.witness)[0] == 0
    code, output = cli(site.audit)
    assert code == 3 and "UNVERIFIED" in output and "intact" not in output, output
    charged = [json.loads(line) for line in lines(site.audit) if b'"mechanism":"gaussian"' in line]
    assert charged, "the job must have paid for releases, or the truncation test proves nothing"


def forge(audit: Path) -> None:
    """Rewrite every record (a new recipient and purpose), then re-sign: every digest, hash
    link, checkpoint root and signature made anew with the forger's key, the checkpoint files
    rewritten, ``keys/audit.pub`` replaced."""
    forger = Ed25519PrivateKey.generate()
    tree = fmt.MerkleAccumulator()
    out: list[bytes] = []
    for note in (audit / "checkpoints").glob("*.txt"):
        note.unlink()
    for line in lines(audit):
        fields = json.loads(line)
        if fields["kind"] == "intent":
            fields["recipient"], fields["purpose"] = "nobody.example", "nothing left this site"
        if fields["kind"] == "checkpoint":
            fields["root"] = tree.root().hex()
            checkpoint = fmt.Checkpoint(origin=fmt.origin(fields["site_id"]), tree_size=fields["tree_size"],
                                        root=fields["root"], timestamp=fields["ts"],
                                        ledger_digest=fmt.ledger_digest(fields["ledger"]))
            hint, signature = fmt.sign(checkpoint, forger)
            fields["key_hint"], fields["signature"] = hint.hex(), base64.b64encode(signature).decode()
            (audit / "checkpoints" / f"{fields['tree_size']}.txt").write_text(fmt.note(checkpoint, hint, signature))
        fields["prev"] = fmt.leaf_hash(out[-1]).hex() if out else fmt.GENESIS
        fields["digest"] = fmt.record_digest(fields)
        out.append(fmt.canonical_json(fields))
        tree.append(fmt.leaf_hash(out[-1]))
    (audit / "log.jsonl").write_bytes(b"".join(line + b"\n" for line in out))
    (audit / "keys" / "audit.pub").write_bytes(public_key_pem(forger.public_key()))


def test_a_forged_log_with_a_replaced_key_fails_against_the_pin_and_is_unverified_without(site: Site,
                                                                                         tmp_path: Path) -> None:
    original_key = tmp_path / "site-audit.pub"
    original_key.write_bytes((site.audit / "keys" / "audit.pub").read_bytes())
    forge(site.audit)
    assert any(b"nobody.example" in line for line in lines(site.audit))
    assert verify(site.audit).ok  # a perfect chain under the replaced key: the forgery is a good one

    code, output = cli(site.audit)
    assert code == 3 and "UNVERIFIED" in output and "intact" not in output, output

    code, output = cli("--site", site.site_file)
    assert code == 1 and "TAMPERED" in output and "was replaced" in output, output
    code, output = cli(site.audit, "--key-sha256", site.fingerprint)
    assert code == 1 and "was replaced" in output, output
    code, output = cli(site.audit, "--key", original_key)
    assert code == 1 and "TAMPERED" in output and "key" in output, output
    code, output = cli(site.audit, "--witness", site.witness)  # the coordinator's copy, signed by the real key
    assert code == 1 and "TAMPERED" in output and site.witness.name in output, output
    as_json = json.loads(runner.invoke(app, ["audit", "verify", "--site", str(site.site_file), "--json"]).stdout)
    assert as_json["status"] == "TAMPERED" and as_json["verified"] is False


def truncate(audit: Path) -> int:
    """Cut the log back to its first signed checkpoint after a record that is not a charge
    (the setup's): keep the records up to that checkpoint, delete the later checkpoint files
    and the payload copies of the records removed. Returns the records kept."""
    records = [json.loads(line) for line in lines(audit)]
    first_charge = next(r["seq"] for r in records if r["kind"] == "intent" and r.get("privacy")
                        and r["privacy"]["mechanism"] == "gaussian")
    cut = max(r["seq"] for r in records if r["kind"] == "checkpoint" and r["seq"] < first_charge)
    kept = records[:cut + 1]
    (audit / "log.jsonl").write_bytes(b"".join(line + b"\n" for line in lines(audit)[:cut + 1]))
    for note in (audit / "checkpoints").glob("*.txt"):
        if int(note.stem) > cut:
            note.unlink()
    keep = {r["payload"]["sha256"] for r in kept if r["kind"] == "intent"}
    for payload in (audit / "payloads").glob("*.bin"):
        if payload.stem not in keep:
            payload.unlink()
    return len(kept)


def test_a_log_cut_back_to_an_earlier_checkpoint_fails_with_the_pinned_key_and_the_ledger(site: Site) -> None:
    before = verify(site.audit, key_sha256=site.fingerprint, ledger_dir=site.ledger)
    assert before.verified and before.ledger_head is not None and before.ledger_head.version >= 1
    kept = truncate(site.audit)
    assert kept < before.records

    alone = verify(site.audit, key_sha256=site.fingerprint)
    assert alone.verified and alone.records == kept  # the signed prefix alone looks whole...
    code, output = cli(site.audit, "--key-sha256", site.fingerprint)
    assert code == 0, output

    code, output = cli("--site", site.site_file)  # ...but the site's ledger holds charges it no longer records
    assert code == 1 and "TAMPERED" in output and "ledger" in output and "does not record" in output, output
    assert f"version {before.ledger_head.version}" in output, output
    code, output = cli(site.audit, "--key-sha256", site.fingerprint, "--ledger", site.ledger)
    assert code == 1 and "does not record" in output, output

    code, output = cli(site.audit, "--key-sha256", site.fingerprint, "--witness", site.witness)
    assert code == 1 and "truncated" in output, output  # the coordinator's checkpoint is larger than the log


def test_a_rolled_back_ledger_is_still_tampering(site: Site, tmp_path: Path) -> None:
    """The other direction: the ledger behind the log (an old copy restored to reset the budget)."""
    (site.ledger / "ledger.json").unlink()
    code, output = cli("--site", site.site_file)
    assert code == 1 and "TAMPERED" in output and "ledger" in output, output
