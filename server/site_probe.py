"""Probe the sites before trusting a federation: forged, tampered and replayed requests must be refused.

A coordinator (or an auditor acting for the data owners) can check, over the real network,
that every site's agent enforces the request rules of the secure sum
(:mod:`fedmte.protocol.secure_rounds`, :mod:`fedmte.client.secure_site`) before a job
relies on them. :func:`probe_sites` sends each site, in order:

1. ``unknown_signer``: a setup request signed by a key no site pinned;
2. ``tampered``: a request signed by the job's key whose body was changed after signing;
3. ``control``: the same request untouched, which every site must accept (this proves the
   refusals above were about the forgery, not about the site being unable to answer);
4. ``replayed``: the control message again, byte for byte;

and finally a signed ``secure_abort`` that makes every site forget the probe job and record
the end in its audit log. Each site audits the refusals as well. Nothing about a site's data
is asked for or released: the probe never reaches a statistics step.

A probe passes at a site when the three forgeries fail with the site's own reason for that
forgery and the control succeeds; :attr:`ProbeReport.passed` is true when every site passed.
"""

from __future__ import annotations

import copy
import os
import secrets
import time
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from fedmte.protocol.errors import FederationError
from fedmte.protocol.keys import fingerprint
from fedmte.protocol.secure_rounds import AbortBody, AdvertiseBody, Envelope, sign_request
from fedmte.protocol.secure_sum import SecureSumParams, majority_threshold
from fedmte.protocol.wire import SECURE_ABORT, SECURE_ADVERTISE, Payload
from fedmte.server.secure_aggregation import SecureJobSpec, load_coordinator_key

ProbeName = Literal["unknown_signer", "tampered", "control", "replayed"]

EXPECTED_REASON: dict[str, str] = {
    "unknown_signer": "unknown coordinator key",
    "tampered": "signature does not verify",
    "replayed": "was seen before",
}
"""A text each site's refusal of that forgery contains (:mod:`fedmte.client.secure_site`)."""


class ProbeResult(BaseModel):
    """What one site did with one probe."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    probe: ProbeName
    node: int
    refused: bool
    reason: str = Field(default="", description="the site's reason when it refused")
    as_expected: bool = Field(description="refused for the right reason (forgeries), or accepted (control)")


class ProbeReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: str
    results: list[ProbeResult]

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(result.as_expected for result in self.results)

    def failures(self) -> dict[str, str]:
        """node -> what went wrong, for every site that did not pass."""
        out: dict[str, str] = {}
        for r in self.results:
            if not r.as_expected:
                what = f"accepted the {r.probe} probe" if not r.refused else f"{r.probe}: {r.reason}"
                out[str(r.node)] = f"{out[str(r.node)]}; {what}" if str(r.node) in out else what
        return out


def _signed(key: Ed25519PrivateKey, step: str, job_id: str, body: BaseModel, model_hashes: tuple[str, ...]) -> Payload:
    envelope = Envelope(step=step, job_id=job_id, round=0, nonce=os.urandom(16).hex(), issued_at=time.time(),
                        signer=fingerprint(key.public_key()), model_hashes=model_hashes,
                        body=body.model_dump(mode="json", by_alias=True))
    return sign_request(key, envelope)


def _tampered(payload: Payload) -> Payload:
    """The payload with one declared bound changed after signing."""
    doc = copy.deepcopy(payload.doc)
    doc["envelope"]["body"]["bounds"]["max_rows"] += 1
    return Payload(doc=doc, arrays=payload.arrays)


def probe_sites(exchange: Any, spec: SecureJobSpec, *, job_id: str | None = None) -> ProbeReport:
    """Run the probes of the module docstring against every node of ``exchange`` (which needs
    ``gather``, as :class:`~fedmte.server.flower_exchange.FlowerExchange` has)."""
    gather = getattr(exchange, "gather", None)
    if gather is None:
        raise FederationError("probing sites needs an exchange that returns each site's reply or refusal (gather)")
    key = load_coordinator_key(spec.signing_key)
    job_id = job_id or f"probe-{secrets.token_hex(8)}"
    sites = tuple(sorted(spec.roster))
    params = SecureSumParams(job_id=job_id, sites=sites, threshold=spec.threshold or majority_threshold(len(sites)),
                             phases=1, self_masks=spec.self_masks)
    body = AdvertiseBody(params=params.model_dump_json(by_alias=True), bounds=spec.bounds)
    control = _signed(key, SECURE_ADVERTISE, job_id, body, spec.model_hashes)
    sends: list[tuple[ProbeName, Payload]] = [
        ("unknown_signer", _signed(Ed25519PrivateKey.generate(), SECURE_ADVERTISE, job_id, body, spec.model_hashes)),
        ("tampered", _tampered(control)),
        ("control", control),
        ("replayed", control),
    ]
    nodes = list(exchange.nodes)
    results: list[ProbeResult] = []
    for probe, payload in sends:
        _, failures = gather(SECURE_ADVERTISE, {node: payload for node in nodes}, group=f"probe-{probe}")
        for node in nodes:
            reason = failures.get(str(node), "")
            refused = str(node) in failures
            expected = (not refused) if probe == "control" else (refused and EXPECTED_REASON[probe] in reason)
            results.append(ProbeResult(probe=probe, node=node, refused=refused, reason=reason, as_expected=expected))
    accepted = [r.node for r in results if r.probe == "control" and not r.refused]
    if accepted:  # the sites that set up the probe job forget it again, and audit that
        end = AbortBody(reason_code="secure:probe_finished", detail="site probe: forged requests sent and checked")
        gather(SECURE_ABORT, {node: _signed(key, SECURE_ABORT, job_id, end, spec.model_hashes) for node in accepted},
               group="probe-end")
    return ProbeReport(job_id=job_id, results=results)

