"""A malicious coordinator's ServerApp: issue 11 finding 2 (faked dropouts) over real Flower.

The coordinator runs its own SuperLink and ServerApp, so a coordinator whose key the sites
trust can run any code there. This one is fedmte's own ServerApp
(:func:`fedmte.server.coordinator.serve_job`) with one change: its secure sum
(:class:`FakedDropoutAggregator`) runs the job's first phase honestly and then, in the second
phase, asks every site for its masked upload as usual, but sends an unmask request that
declares the last site that uploaded dropped (a different active set than the first phase
fixed). If the sites revealed, the coordinator could remove every mask but the "dropped"
site's pairwise ones from the others' uploads, and the difference of the two phases' sums
would be that site's exact statistics.

Everything the coordinator learned, and each site's reply or error text to the forged
reveal, goes to ``faked_dropout.json`` in the job's output folder (the first phase's sum to
``phase0_sum.npz``); ``tests/security/test_faked_dropout_processes.py`` reads them. Loaded by
``flwr-serverapp`` as ``tests.security.faked_dropout_serverapp:app`` (the test puts the repo
root on the SuperLink's ``PYTHONPATH``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import fedmte.server.coordinator as coordinator_module
from fedmte.protocol.errors import FederationError, FedmteError, InvalidInputError
from fedmte.protocol.fixed_point import FixedPointCodec, SumSpec
from fedmte.protocol.secure_rounds import RevealBody, UploadBody, arrays_digest, request_digest
from fedmte.protocol.secure_sum import MaskedUpload, Reveal, UnmaskRequest
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import SECURE_REVEAL, SECURE_UPLOAD, Payload
from fedmte.server.secure_aggregation import SecureAggregator

EVIDENCE = "faked_dropout.json"
PHASE0_SUM = "phase0_sum.npz"


def _ring_sum(words: list[np.ndarray]) -> np.ndarray:
    from fedmte.protocol.fixed_point import ring_add

    total = np.zeros_like(words[0])
    for w in words:
        ring_add(total, w)
    return total


class FakedDropoutAggregator(SecureAggregator):
    """Phase 0 honest; phase 1: every site uploads, the unmask request declares one dropped."""

    def __init__(self, *args: Any, output: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output = output
        self.evidence: dict[str, Any] = {"job_id": self.job_id}

    def _write(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / EVIDENCE).write_text(json.dumps(self.evidence, indent=2, default=str), encoding="utf-8")

    def sum_payload(self, exchange: Any, inner: Payload, *, inner_query: str, label: str) -> Statistics:
        if self._next_phase == 0:
            total = super().sum_payload(exchange, inner, inner_query=inner_query, label=label)
            fixed = self._coordinator.fixed_lists if self._coordinator is not None else None
            self.evidence["phase0"] = {"decoded": True, "blocks": sorted(total),
                                       "active": list(fixed[0]) if fixed else None,
                                       "dropped": list(fixed[1]) if fixed else None}
            np.savez(self.output / PHASE0_SUM, **total.to_arrays())
            self._write()
            return total
        try:
            return self._forge(exchange, inner, inner_query=inner_query, label=label)
        finally:
            self._write()

    def _forge(self, exchange: Any, inner: Payload, *, inner_query: str, label: str) -> Statistics:
        assert self.params is not None and self._coordinator is not None
        phase = self._next_phase
        self._next_phase += 1
        digest = request_digest(self.job_id, phase, self.model_hashes, inner_query, inner.doc, inner.arrays)
        inner_sha = arrays_digest(inner.arrays)
        body = UploadBody(phase=phase, inner_query=inner_query, inner_doc=dict(inner.doc), bundles=None)
        payloads = {self._node_of[site]: self._payload(SECURE_UPLOAD, phase + 1, body, inner.arrays, inner_sha)
                    for site in sorted(self._live)}
        replies, failures = exchange.gather(SECURE_UPLOAD, payloads, group=f"{label}-upload")
        site_of = {node: site for site, node in self._node_of.items()}
        uploads: dict[str, tuple[SumSpec, np.ndarray]] = {}
        for node, reply in sorted(replies.items()):
            uploads[site_of[node]] = (SumSpec.model_validate(reply.doc["spec"]),
                                      np.ascontiguousarray(reply.arrays["words"]).view(np.uint64))
        victim = sorted(uploads)[-1]
        active = tuple(site for site in self.params.sites if site in uploads and site != victim)
        forged = UnmaskRequest(job_id=self.job_id, phase=phase, active=active, dropped=(victim,))
        self.evidence["phase1"] = {
            "phase": phase, "uploaded": sorted(uploads), "upload_failures": {str(k): v for k, v in failures.items()},
            "declared_active": list(active), "declared_dropped": [victim],
        }
        # the forged reveal goes to every site that uploaded, the "dropped" one included
        reveal_body = RevealBody(unmask=forged.model_dump_json(by_alias=True), request_digest=digest)
        payloads = {self._node_of[site]: self._payload(SECURE_REVEAL, phase + 1, reveal_body) for site in sorted(uploads)}
        replies, failures = exchange.gather(SECURE_REVEAL, payloads, group=f"{label}-reveal")
        reveals: list[Reveal] = []
        for node, reply in sorted(replies.items()):
            reveals.append(Reveal.model_validate_json(reply.doc["reveal"]))
        self.evidence["phase1"].update({
            "revealed_by": sorted(r.site_id for r in reveals),
            "reveal_errors": {site_of.get(int(node), f"node {node}"): reason for node, reason in failures.items()},
        })
        # what the coordinator can make of what it holds: a coordinator that forgets the
        # first phase's active set (the honest one refuses) sums the "active" uploads and
        # tries to unmask them with the reveals it got; and the plain ring sum of all uploads
        self._coordinator._fixed = None  # noqa: SLF001 - the malicious coordinator forgets its own rule
        spec = uploads[active[0]][0]
        decoded: dict[str, str] = {}
        try:
            self._coordinator.open_phase(phase, spec)
            for site in active:
                self._coordinator.add_upload(MaskedUpload(job_id=self.job_id, phase=phase, site_id=site,
                                                          spec_digest=spec.digest(), words=uploads[site][1]))
            self._coordinator.unmask_request(phase)
            self._coordinator.finish(phase, reveals)
            decoded["declared_active_sum"] = "DECODED"
        except FedmteError as error:
            decoded["declared_active_sum"] = f"{type(error).__name__}: {error}"
        try:
            FixedPointCodec(spec, max_sites=len(self.params.sites)).decode(
                _ring_sum([w for _, w in uploads.values()]), summed=len(uploads))
            decoded["all_uploads_sum"] = "DECODED"
        except FedmteError as error:
            decoded["all_uploads_sum"] = f"{type(error).__name__}: {error}"
        self.evidence["phase1"]["decode"] = decoded
        raise FederationError(f"faked dropout of {victim} in phase {phase}: the sites revealed "
                              f"{sorted(r.site_id for r in reveals)}, refused {sorted(self.evidence['phase1']['reveal_errors'])}")


def faked_dropout_aggregator(job: Any, run_id: str) -> SecureAggregator | None:
    if job.secure is None:
        raise InvalidInputError("the faked-dropout coordinator needs a [secure] job")
    honest = SecureAggregator.from_spec(job.secure, job_id=f"run-{run_id}-faked")
    spec = job.secure
    return FakedDropoutAggregator(
        signing_key=honest._key, roster=honest._roster, bounds=spec.bounds,  # noqa: SLF001
        threshold=spec.threshold, self_masks=spec.self_masks, job_id=honest.job_id, model_hashes=spec.model_hashes,
        output=Path(job.output),
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """fedmte's ServerApp with the faked-dropout secure sum in place of the honest one."""
    text = context.run_config.get("job")
    if not isinstance(text, str):
        raise InvalidInputError("the run config has no 'job'")
    coordinator_module.job_aggregator = faked_dropout_aggregator  # type: ignore[assignment]
    coordinator_module.serve_job(grid, text, context.run_id)


__all__ = ["app", "EVIDENCE", "PHASE0_SUM", "FakedDropoutAggregator"]
