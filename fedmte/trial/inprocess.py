"""A scoring job run against site files in this process: the federation's code without the network.

:func:`run_job_in_process` runs the coordinator's own job driver
(:func:`fedmte.server.coordinator.execute_job`: setup, the batched rounds, finish) over
:class:`InProcessExchange`, whose sites are the site agents of the given site files
(:func:`fedmte.client.site_agent.answer`), each message passed through its wire form as over
Flower. Every site-side step is the one a federated site takes: package verification
against the site's pinned keys, its policy, clipping, DP noise, the ledger and the audit
log. What is missing is the transport and with it the secure sum: the sites' releases are
added in the clear (``PlainSum``), which the report says. It is for trying a job on one
machine (``fedmte demo --in-process``) and for tests.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedmte.protocol.errors import FederationError, FedmteError, InvalidInputError
from fedmte.protocol.wire import Payload
from fedmte.server.coordinator import (
    build_job_report,
    execute_job,
    load_candidates,
    load_coordinator_key,
    write_job_outputs,
)
from fedmte.server.job import JobSpec
from fedmte.server.report import Report, write_report

FIRST_NODE = 1
IN_PROCESS_NOTE = "in-process run: the sites' releases were added in the clear in one process (no network, no secure sum)"


class InProcessExchange:
    """Sites as in-process site agents; every message goes through the wire form, and an
    error becomes a :class:`FederationError` naming each failing site, as over Flower."""

    def __init__(self, site_files: Sequence[Path], run_id: str) -> None:
        from fedmte.client import site_agent

        self._answer = site_agent.answer
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
                reply = self._answer(query, Payload.from_wire(*payload.to_wire()), self.files[node], run_id=self.run_id)
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
    outcome = execute_job(InProcessExchange(site_files, run_id), job, packages, key, run_id=run_id)
    report = build_job_report(job, outcome)
    report = report.model_copy(update={"notes": [*report.notes, IN_PROCESS_NOTE]})
    output = Path(job.output)
    write_report(report, output)
    write_job_outputs(outcome, output)
    return report


__all__ = ["InProcessExchange", "run_job_in_process"]
