"""A scoring job run against site files in this process: the federation's code without the network.

:func:`run_job_in_process` runs the coordinator's own job driver
(:func:`fedmte.server.coordinator.execute_job`: setup, the batched rounds, finish) over
:class:`InProcessExchange`, whose sites are the site agents of the given site files
(:func:`fedmte.client.site_agent.answer`), each message passed through its wire form as over
Flower. Every site-side step is the one a federated site takes: package verification
against the site's pinned keys, its policy, clipping, DP noise, the ledger and the audit
log. A job with a ``[secure]`` table is summed by the secure sum, each site's
``secure_*`` queries answered by its own :class:`~fedmte.client.secure_site.SecureSite`
(made from the site file, as a site runner makes it); otherwise the releases are added in
the clear (``PlainSum``), which the report says. What is missing is the network. It is for
trying a job on one machine (``fedmte demo --in-process``), for benchmarks and for tests.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedmte.protocol.errors import FederationError, FedmteError, InvalidInputError
from fedmte.protocol.wire import SECURE_QUERIES, Payload
from fedmte.server.coordinator import (
    job_aggregator,
    load_candidates,
    load_coordinator_key,
    run_stages,
    write_job_outputs,
)
from fedmte.server.job import JobSpec
from fedmte.server.report import Report, write_report

FIRST_NODE = 1
IN_PROCESS_NOTE = "in-process run: the sites' releases were added in the clear in one process (no network, no secure sum)"
IN_PROCESS_SECURE_NOTE = "in-process run: every site in this process, its releases summed by the secure sum (no network)"


class InProcessExchange:
    """Sites as in-process site agents; every message goes through the wire form, and an
    error becomes a :class:`FederationError` naming each failing site, as over Flower."""

    def __init__(self, site_files: Sequence[Path], run_id: str) -> None:
        from fedmte.client import secure_site, site_agent

        self._answer = site_agent.answer
        self._answer_secure = secure_site.answer_secure
        self.files = {FIRST_NODE + k: Path(f).resolve() for k, f in enumerate(site_files)}
        self.run_id = run_id

    @property
    def nodes(self) -> Sequence[int]:
        return sorted(self.files)

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        replies: dict[int, Payload] = {}
        failures: dict[str, str] = {}
        for node, payload in sorted(payloads.items()):
            try:
                received = Payload.from_wire(*payload.to_wire())
                reply = (self._answer_secure(query, received, self.files[node]) if query in SECURE_QUERIES
                         else self._answer(query, received, self.files[node], run_id=self.run_id))
            except FedmteError as error:
                failures[self.files[node].parent.name] = f"{type(error).__name__}: {error}"
                continue
            replies[node] = Payload.from_wire(*reply.to_wire())
        if failures:
            raise FederationError(f"query {query} ({group}) failed at {', '.join(sorted(failures))}: "
                                  + "; ".join(f"{site}: {reason}" for site, reason in sorted(failures.items())),
                                  failures=failures)
        return replies


def run_job_in_process(job: JobSpec, site_files: Sequence[Path]) -> Report:
    """Run ``job`` against ``site_files`` in this process; write and return its report.

    Writes what :func:`fedmte.server.coordinator.run_job` writes to ``job.output``
    (report.json, report.html, received.jsonl, witnesses/). Needs
    ``[federation] coordinator_key``, the key the sites pin.
    """
    if not site_files:
        raise InvalidInputError("the job has no sites; give at least one site file")
    if len(site_files) < job.federation.min_sites:
        raise FederationError(f"the job needs at least {job.federation.min_sites} sites; {len(site_files)} given")
    if job.federation.coordinator_key is None:
        raise InvalidInputError("the job names no coordinator key; set [federation] coordinator_key")
    key = load_coordinator_key(Path(job.federation.coordinator_key))
    packages = load_candidates(job)
    run_id = secrets.token_hex(8)
    report, outcomes = run_stages(InProcessExchange(site_files, run_id), job, packages, key, run_id=run_id,
                                  aggregator=job_aggregator(job, run_id))
    note = IN_PROCESS_NOTE if job.secure is None else IN_PROCESS_SECURE_NOTE
    report = report.model_copy(update={"notes": [*report.notes, note]})
    output = Path(job.output)
    write_report(report, output)
    for index, outcome in enumerate(outcomes):
        write_job_outputs(outcome, output, append=index > 0)
    return report


__all__ = ["InProcessExchange", "run_job_in_process"]
