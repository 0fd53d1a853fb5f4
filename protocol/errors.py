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
