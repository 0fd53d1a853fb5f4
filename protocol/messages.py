"""Wire form of statistic requests: a JSON-able spec plus named plain arrays.

A round's requests travel as :class:`RoundRequest` (pydantic) whose array arguments are
referenced by content hash and shipped beside it as plain ``.npy``-able arrays, so equal
arrays (the offset every centred statistic uses, say) travel once and nothing needs pickle.
Decoding rebuilds the same :class:`~fedmte.protocol.requests.Stat` objects, with the same
keys, and refuses anything that is not in the catalogue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedmte.protocol.catalogue import STATISTICS, TRANSFORMS
from fedmte.protocol.errors import StatisticsError, UnknownStatisticError
from fedmte.protocol.requests import Stat, Transform

MAX_ARGUMENTS = 64


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    op: str
    args: dict[str, str] = Field(default_factory=dict, description="argument name -> array id")


class StatSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str
    kind: str
    view: list[StepSpec] = Field(default_factory=list)
    args: dict[str, str] = Field(default_factory=dict)


class RoundRequest(BaseModel):
    """What the coordinator asks every site to sum in one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    round: int = Field(ge=0)
    num_classes: int = Field(ge=2)
    stats: list[StatSpec]


def _array_id(array: np.ndarray) -> str:
    hasher = hashlib.sha256()
    hasher.update(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(array.tobytes())
    return hasher.hexdigest()[:32]


def encode_round(stats: Sequence[Stat], *, round_index: int, num_classes: int) -> tuple[RoundRequest, dict[str, np.ndarray]]:
    """Split requests into a JSON-able spec and a dict of deduplicated arrays."""
    arrays: dict[str, np.ndarray] = {}

    def refs(args: tuple[tuple[str, np.ndarray], ...]) -> dict[str, str]:
        out = {}
        for name, array in args:
            ident = _array_id(array)
            arrays[ident] = array
            out[name] = ident
        return out

    specs = [
        StatSpec(
            key=stat.key,
            kind=stat.kind,
            view=[StepSpec(op=step.op, args=refs(step.args)) for step in stat.view],
            args=refs(stat.args),
        )
        for stat in stats
    ]
    return RoundRequest(round=round_index, num_classes=num_classes, stats=specs), arrays


def decode_round(request: RoundRequest, arrays: Mapping[str, np.ndarray]) -> list[Stat]:
    """Rebuild the requests; refuse unknown kinds, missing arrays and key mismatches."""

    def resolve(refs: dict[str, str]) -> dict[str, np.ndarray]:
        if len(refs) > MAX_ARGUMENTS:
            raise StatisticsError(f"a request carries {len(refs)} arguments; at most {MAX_ARGUMENTS} are accepted")
        out = {}
        for name, ident in refs.items():
            if ident not in arrays:
                raise StatisticsError(f"request argument {name!r} refers to array {ident}, which was not sent")
            array = np.asarray(arrays[ident])
            if array.dtype not in (np.dtype(np.float64), np.dtype(np.int64)) or _array_id(array) != ident:
                raise StatisticsError(f"array {ident} does not match its content hash (corrupted or substituted)")
            out[name] = array
        return out

    stats = []
    for spec in request.stats:
        if spec.kind not in STATISTICS:
            raise UnknownStatisticError(f"unknown statistic {spec.kind!r}; the catalogue has: {', '.join(sorted(STATISTICS))}")
        for step in spec.view:
            if step.op not in TRANSFORMS:
                raise UnknownStatisticError(f"unknown transform {step.op!r}; the catalogue has: {', '.join(sorted(TRANSFORMS))}")
        view = tuple(Transform.of(step.op, **resolve(step.args)) for step in spec.view)
        stat = Stat.of(spec.kind, view, **resolve(spec.args))
        if stat.key != spec.key:
            raise StatisticsError(f"request {spec.key} does not match its content (decoded as {stat.key})")
        stats.append(stat)
    return stats
