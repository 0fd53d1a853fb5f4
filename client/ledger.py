"""The site's privacy ledger: how much of each data source's budget is spent, across restarts.

Every release is a Gaussian mechanism, so the ledger keeps, per data source, the spent mu^2
of Gaussian DP (composition adds mu^2; :func:`fedmte.protocol.dp.compose_sq`) and refuses a
release that would take sqrt(mu^2) past the policy's cap. Repeating a release would let a
coordinator average the noise away, so the ledger also keeps every release it paid for,
keyed by a fingerprint of the request (data source, dataset version, policy, models and
statistics, not the run or round): the same request again gets the same bytes back, at no
new cost.

On disk (``<dir>/ledger.json`` plus ``<dir>/releases/<sha256>.bin``) the state carries a
version that grows by one per charge, the hash of the previous state, and its own hash; the
file also keeps the hash of every earlier version. A hash catches an edit; a *rollback* to
an older, self-consistent file is caught by comparing with the audit log, whose intent
records (hash-chained and signed) carry the ledger's version and hash after each charge:
:meth:`Ledger.open` takes that head and refuses a file that is behind it or disagrees.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
)

from fedmte.protocol import dp
from fedmte.protocol.audit_format import GENESIS, Decimal, Hex64, LedgerHead, canonical_json, dec
from fedmte.protocol.durable import atomic_write
from fedmte.protocol.encoding import StrictModel
from fedmte.protocol.errors import BudgetExceededError, InvalidInputError, VerificationError

LEDGER_SCHEMA = "fedmte.ledger.v1"
LEDGER_FILE = "ledger.json"
RELEASES_DIR = "releases"
# A release fits when its composed mu^2 is within this relative slack of the cap, so that
# k releases of mu_cap / sqrt(k) are not refused over a rounding error in the last bit.
CAP_RELATIVE_SLACK = 1e-12
BUDGET_REASON = "budget_exhausted"
BUDGET_RULE = "dp.epsilon_budget"


class SourceSpend(StrictModel):
    """Spent mu^2 on one data source, and how many releases spent it.

    ``mu_alone_sq`` is the spend by the guarantee the site gives on its own, should the
    secure sum be broken (share noise, :func:`fedmte.client.privacy.honest_shares`). It is
    stored only once it differs from ``mu_sq``, and left out of the file while absent, so a
    ledger that never added share noise (every older ledger) keeps its bytes and hashes.
    """

    mu_sq: Decimal
    releases: NonNegativeInt
    mu_alone_sq: Decimal | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        if data.get("mu_alone_sq") is None:
            data.pop("mu_alone_sq", None)
        return data

    @property
    def alone_sq(self) -> float:
        return float(self.mu_alone_sq if self.mu_alone_sq is not None else self.mu_sq)


class CachedRelease(StrictModel):
    """A paid-for release: its bytes' address, its cost, and the classes it suppressed."""

    data_source: Annotated[str, StringConstraints(min_length=1)]
    payload_sha256: Hex64
    bytes: NonNegativeInt
    mu_release: Decimal
    version: NonNegativeInt
    suppressed_classes: dict[str, list[NonNegativeInt]] = Field(default_factory=dict)


class LedgerState(StrictModel):
    schema_: Literal["fedmte.ledger.v1"] = Field(LEDGER_SCHEMA, alias="schema")
    site_id: str
    version: NonNegativeInt
    prev_sha256: Hex64
    sources: dict[str, SourceSpend] = Field(default_factory=dict)
    releases: dict[str, CachedRelease] = Field(default_factory=dict)

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json", by_alias=True))).hexdigest()


class LedgerFile(StrictModel):
    state: LedgerState
    state_sha256: Hex64
    history: list[Hex64]  # history[v] = hash of the state at version v (history[0]: empty)


@dataclass(frozen=True)
class Receipt:
    """What one request cost: the ledger before and after, and where its bytes are."""

    data_source: str
    fingerprint: str
    cached: bool
    mu_release: float
    mu_sq_before: float
    mu_sq_after: float
    mu_cap: float | None  # None for a cached release, which spends nothing
    head: LedgerHead
    payload_sha256: str
    suppressed_classes: dict[str, list[int]]
    mu_alone_sq_before: float = 0.0  # the spend by the site's guarantee alone (SourceSpend.mu_alone_sq)
    mu_alone_sq_after: float = 0.0


class Ledger:
    """A site's privacy ledger in ``directory``. Open it with the head the audit log last
    recorded (:attr:`fedmte.client.audit_log.AuditLog.ledger_head`), so a rolled-back or
    edited file is refused."""

    def __init__(self, directory: Path, file: LedgerFile) -> None:
        self.directory = directory
        self._file = file

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: Path | str, *, site_id: str, expected: LedgerHead | None, create: bool = True) -> Ledger:
        """Load (or, with ``create``, start) the ledger and check it against the audit log's
        last ``expected`` head.

        Raises :class:`VerificationError` when the file was edited, rolled back, deleted or
        diverged from what the audit log recorded.
        """
        directory = Path(directory)
        path = directory / LEDGER_FILE
        if not path.exists():
            if expected is not None and expected.version > 0:
                raise VerificationError(
                    f"{path} is missing, but the audit log records ledger version {expected.version}: "
                    "the ledger was deleted or rolled back; restore it from backup (never start a new one)"
                )
            if not create:
                raise VerificationError(f"there is no ledger at {path}")
            (directory / RELEASES_DIR).mkdir(parents=True, exist_ok=True)
            state = LedgerState(site_id=site_id, version=0, prev_sha256=GENESIS)
            sha = state.sha256()
            ledger = cls(directory, LedgerFile(state=state, state_sha256=sha, history=[sha]))
            ledger._save()
            return ledger
        ledger = cls(directory, cls._load(path))
        if ledger._file.state.site_id != site_id:
            raise VerificationError(f"{path} belongs to site {ledger._file.state.site_id!r}, not {site_id!r}")
        if expected is not None:
            ledger._check_against(expected)
        return ledger

    @staticmethod
    def _load(path: Path) -> LedgerFile:
        try:
            file = LedgerFile.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as error:
            raise VerificationError(f"{path} is not a readable ledger: {error}") from None
        state = file.state
        actual = state.sha256()
        if actual != file.state_sha256:
            raise VerificationError(f"{path} was edited: its state hashes to {actual}, the file says {file.state_sha256}")
        if len(file.history) != state.version + 1 or file.history[-1] != file.state_sha256:
            raise VerificationError(f"{path} has a history that does not end at version {state.version}")
        expected_prev = file.history[-2] if state.version > 0 else GENESIS
        if state.prev_sha256 != expected_prev:
            raise VerificationError(f"{path}: the previous-state hash does not match the history")
        for source, spend in state.sources.items():
            if not (math.isfinite(float(spend.mu_sq)) and float(spend.mu_sq) >= 0):
                raise VerificationError(f"{path}: spent mu^2 of {source!r} is not a non-negative number")
            if not (math.isfinite(spend.alone_sq) and spend.alone_sq >= float(spend.mu_sq)):
                raise VerificationError(f"{path}: the spend alone of {source!r} is below its spent mu^2")
        return file

    def _check_against(self, expected: LedgerHead) -> None:
        head = self.head
        path = self.directory / LEDGER_FILE
        if head.version < expected.version:
            raise VerificationError(
                f"{path} is at version {head.version} but the audit log records version {expected.version}: "
                "the ledger was rolled back; restore the newest copy"
            )
        if self._file.history[expected.version] != expected.sha256:
            raise VerificationError(
                f"{path} disagrees with the audit log at version {expected.version} "
                f"(ledger {self._file.history[expected.version]}, log {expected.sha256}): it was edited or replaced"
            )

    # ------------------------------------------------------------------ reading

    @property
    def head(self) -> LedgerHead:
        return LedgerHead(version=self._file.state.version, sha256=self._file.state_sha256)

    @property
    def state(self) -> LedgerState:
        return self._file.state

    def spent_mu_sq(self, data_source: str) -> float:
        spend = self._file.state.sources.get(data_source)
        return float(spend.mu_sq) if spend else 0.0

    def spent_mu(self, data_source: str) -> float:
        return math.sqrt(self.spent_mu_sq(data_source))

    def spent_alone_sq(self, data_source: str) -> float:
        """Spent mu^2 by the guarantee the site gives alone (equal to :meth:`spent_mu_sq`
        unless releases went out with share noise)."""
        spend = self._file.state.sources.get(data_source)
        return spend.alone_sq if spend else 0.0

    def lookup(self, fingerprint: str) -> tuple[bytes, Receipt] | None:
        """The cached bytes and a zero-cost receipt for a request paid for before, else None."""
        entry = self._file.state.releases.get(fingerprint)
        if entry is None:
            return None
        path = self.directory / RELEASES_DIR / f"{entry.payload_sha256}.bin"
        try:
            data = path.read_bytes()
        except OSError:
            raise VerificationError(f"cached release {path} is missing; the ledger still counts its cost") from None
        if hashlib.sha256(data).hexdigest() != entry.payload_sha256:
            raise VerificationError(f"cached release {path} was altered (hash mismatch)")
        spent, alone = self.spent_mu_sq(entry.data_source), self.spent_alone_sq(entry.data_source)
        receipt = Receipt(
            data_source=entry.data_source, fingerprint=fingerprint, cached=True, mu_release=float(entry.mu_release),
            mu_sq_before=spent, mu_sq_after=spent, mu_cap=None, head=self.head,
            payload_sha256=entry.payload_sha256, suppressed_classes=dict(entry.suppressed_classes),
            mu_alone_sq_before=alone, mu_alone_sq_after=alone,
        )
        return data, receipt

    def check(self, data_source: str, mu_release: float, mu_cap: float) -> None:
        """Raise :class:`BudgetExceededError` if a release of ``mu_release`` would pass the cap."""
        before = self.spent_mu_sq(data_source)
        after = dp.compose_sq(before, mu_release)
        if after > mu_cap * mu_cap * (1.0 + CAP_RELATIVE_SLACK):
            raise BudgetExceededError(
                f"data source {data_source!r} has spent mu={math.sqrt(before):.4g} of its cap mu={mu_cap:.4g}; "
                f"a release of mu={mu_release:.4g} would bring it to {math.sqrt(after):.4g}. "
                "The data owner can raise dp.epsilon_budget; nothing more is released until then",
                reason_code=BUDGET_REASON, rule=BUDGET_RULE,
            )

    # ------------------------------------------------------------------ charging

    def reserve(self, data_source: str, mu_release: float, mu_cap: float, *,
                mu_alone_release: float | None = None) -> Receipt:
        """Spend ``mu_release`` on ``data_source`` now, before anything is computed: an attempt
        costs its budget whether or not it ends in a release, so a failure cannot be probed
        for free. :meth:`keep` later stores the bytes of a release that succeeded.

        ``mu_alone_release`` (default ``mu_release``) is what the release costs by the site's
        guarantee alone (share noise); it is tracked beside the spend, the cap applies to
        ``mu_release``. Both totals step by :func:`fedmte.protocol.dp.compose_sq`."""
        if not (mu_release > 0 and math.isfinite(mu_release)):
            raise InvalidInputError(f"a release costs a positive, finite mu, got {mu_release}")
        alone_release = mu_release if mu_alone_release is None else mu_alone_release
        if not (alone_release >= mu_release and math.isfinite(alone_release)):
            raise InvalidInputError(f"the guarantee alone is at least the release's mu, got {alone_release}")
        self.check(data_source, mu_release, mu_cap)
        state = self._file.state
        before, alone_before = self.spent_mu_sq(data_source), self.spent_alone_sq(data_source)
        after, alone_after = dp.compose_sq(before, mu_release), dp.compose_sq(alone_before, alone_release)
        previous = state.sources.get(data_source)
        sources = dict(state.sources)
        sources[data_source] = SourceSpend(mu_sq=dec(after), releases=(previous.releases if previous else 0) + 1,
                                           mu_alone_sq=None if alone_after == after else dec(alone_after))
        self._commit(sources=sources, releases=dict(state.releases))
        return Receipt(
            data_source=data_source, fingerprint="", cached=False, mu_release=mu_release, mu_sq_before=before,
            mu_sq_after=after, mu_cap=mu_cap, head=self.head, payload_sha256="", suppressed_classes={},
            mu_alone_sq_before=alone_before, mu_alone_sq_after=alone_after,
        )

    def keep(self, reserved: Receipt, fingerprint: str, payload: bytes, *,
             suppressed_classes: dict[str, list[int]] | None = None) -> Receipt:
        """Keep the bytes of a release paid for by :meth:`reserve`, so an identical request
        gets them back at no new cost. The bytes are written first, then the state; a crash in
        between leaves an unreferenced file and the charge, never bytes without a charge.

        The reservation's version is amended in place rather than followed by another: the
        audit log records the ledger's head only with the release's intent, after this, so it
        never saw the reserved state, and one charge stays one version."""
        if reserved.head != self.head:
            raise InvalidInputError("keep() amends the reservation just made; the ledger moved on since")
        if fingerprint in self._file.state.releases:
            raise InvalidInputError(f"request {fingerprint[:16]}... was already paid for; use lookup()")
        payload_sha = hashlib.sha256(payload).hexdigest()
        blob = self.directory / RELEASES_DIR / f"{payload_sha}.bin"
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(blob, payload)
        state = self._file.state
        releases = dict(state.releases)
        releases[fingerprint] = CachedRelease(
            data_source=reserved.data_source, payload_sha256=payload_sha, bytes=len(payload),
            mu_release=dec(reserved.mu_release), version=state.version, suppressed_classes=suppressed_classes or {},
        )
        self._commit(sources=dict(state.sources), releases=releases, amend=True)
        return Receipt(
            data_source=reserved.data_source, fingerprint=fingerprint, cached=False, mu_release=reserved.mu_release,
            mu_sq_before=reserved.mu_sq_before, mu_sq_after=reserved.mu_sq_after, mu_cap=reserved.mu_cap,
            head=self.head, payload_sha256=payload_sha, suppressed_classes=suppressed_classes or {},
            mu_alone_sq_before=reserved.mu_alone_sq_before, mu_alone_sq_after=reserved.mu_alone_sq_after,
        )

    def charge(
        self,
        fingerprint: str,
        data_source: str,
        mu_release: float,
        mu_cap: float,
        payload: bytes,
        *,
        suppressed_classes: dict[str, list[int]] | None = None,
    ) -> Receipt:
        """:meth:`reserve` then :meth:`keep`: spend ``mu_release`` and keep ``payload``."""
        if fingerprint in self._file.state.releases:
            raise InvalidInputError(f"request {fingerprint[:16]}... was already paid for; use lookup()")
        reserved = self.reserve(data_source, mu_release, mu_cap)
        return self.keep(reserved, fingerprint, payload, suppressed_classes=suppressed_classes)

    def _commit(self, *, sources: dict[str, SourceSpend], releases: dict[str, CachedRelease], amend: bool = False) -> None:
        """The next version of the state, chained to this one (``amend``: this version again,
        chained to the previous one), written atomically."""
        state = self._file.state
        history = self._file.history[:-1] if amend else self._file.history
        version = state.version if amend else state.version + 1
        prev = state.prev_sha256 if amend else self._file.state_sha256
        new_state = LedgerState(site_id=state.site_id, version=version, prev_sha256=prev, sources=sources,
                                releases=releases)
        sha = new_state.sha256()
        self._file = LedgerFile(state=new_state, state_sha256=sha, history=[*history, sha])
        self._save()

    def _save(self) -> None:
        atomic_write(self.directory / LEDGER_FILE, canonical_json(self._file.model_dump(mode="json", by_alias=True)))
