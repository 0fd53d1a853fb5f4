"""The typed errors fedmte raises.

Every error subclasses the built-in a caller would expect (``ValueError`` for bad values,
``TypeError`` for wrong types), and its message says what was wrong and what to do.
"""

from __future__ import annotations


class FedmteError(Exception):
    """Base of every error fedmte raises on purpose."""


class InvalidInputError(FedmteError, ValueError):
    """Features, labels, probabilities or a site split that cannot be scored as given."""


class StatisticsError(FedmteError, ValueError):
    """A statistics block with the wrong shape, dtype or non-finite values, or two blocks
    that cannot be added (different keys or shapes)."""


class UnknownScorerError(FedmteError, ValueError):
    """A scorer name that is not in the registry."""


class NotFederableError(FedmteError, ValueError):
    """A scorer that cannot be computed from sums of per-site statistics."""


class ScorerDomainError(FedmteError, ValueError):
    """The pooled data leave a scorer undefined (for example a class with no samples)."""


class UnknownStatisticError(FedmteError, ValueError):
    """A statistic or feature transform that is not in the site's catalogue."""


class VerificationError(FedmteError, ValueError):
    """A hash, signature, audit chain or ledger that does not check out; the message names
    the first record or file that failed and what was expected."""


class RefusalError(FedmteError):
    """A site said no. ``reason_code`` is the stable machine-readable reason sent back to the
    coordinator; ``rule`` names the policy rule (or the budget) that refused."""

    def __init__(self, message: str, *, reason_code: str, rule: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.rule = rule


class PolicyRefusal(RefusalError):
    """A request the site's policy does not allow. ``violations`` lists every rule that said
    no as ``(rule, message)`` pairs; ``rule`` is the first of them."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        if not violations:
            raise ValueError("a PolicyRefusal needs at least one violation")
        text = "; ".join(f"[{rule}] {message}" for rule, message in violations)
        super().__init__(f"refused by site policy: {text}", reason_code=f"policy:{violations[0][0]}",
                         rule=violations[0][0])
        self.violations = list(violations)


class BudgetExceededError(RefusalError):
    """A release that would take a data source past its privacy budget."""


class ProtocolError(FedmteError, ValueError):
    """A message out of order or inconsistent with the protocol state: a phase masked twice,
    an unmask request whose active and dropped lists overlap or miss a site, a request for
    both kinds of share of one peer, a message for another job."""


class ThresholdError(ProtocolError):
    """Fewer sites than the secure-sum threshold: the sum cannot be unmasked, and nothing
    is released."""


class BoundExceededError(StatisticsError):
    """A value beyond the public bound its fixed-point encoding was sized for; raise the
    bound in the sum spec (or clip harder) rather than let the ring wrap."""


class FederationError(FedmteError, RuntimeError):
    """A federation that cannot run or finish a job: a site replied with an error or did
    not reply in time, the SuperLink or a SuperNode did not start, a run failed.
    ``failures`` maps each site (node id or name) that failed to its reason."""

    def __init__(self, message: str, *, failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})
