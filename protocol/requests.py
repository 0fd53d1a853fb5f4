"""What the coordinator may ask a site to compute: statistic requests over feature views.

A :class:`Stat` names a statistic *kind* from the site's catalogue
(:mod:`fedmte.protocol.catalogue`), the *view* of the features it is computed on (a chain of
catalogue transforms such as "subtract the agreed offset, project onto the PCA basis") and
the arrays the coordinator broadcast for it. Everything in a request is plain data: names
and arrays, never code. Two scorers that ask for the same thing produce requests with the
same :attr:`Stat.key`, so the plan sends it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

Arrays = Mapping[str, np.ndarray]


def _frozen_arrays(arrays: Mapping[str, object]) -> tuple[tuple[str, np.ndarray], ...]:
    frozen = []
    for name, value in sorted(arrays.items()):
        array = np.asarray(value)
        if array.dtype.kind in "biu":
            array = array.astype(np.int64)
        elif array.dtype.kind == "f":
            array = array.astype(np.float64)
        else:
            raise TypeError(f"argument {name!r} must be numeric, got dtype {array.dtype}")
        array = np.array(array, order="C", copy=True)
        array.setflags(write=False)
        frozen.append((name, array))
    return tuple(frozen)


def _digest(parts: list[object], arrays: tuple[tuple[str, np.ndarray], ...], hasher: "hashlib._Hash") -> None:
    hasher.update(json.dumps(parts).encode())
    for name, array in arrays:
        hasher.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        hasher.update(array.tobytes())


@dataclass(frozen=True, eq=False)
class Transform:
    """One step of a feature view: a catalogue transform ``op`` with its broadcast arrays."""

    op: str
    args: tuple[tuple[str, np.ndarray], ...] = ()

    @classmethod
    def of(cls, op: str, **args: object) -> Transform:
        return cls(op, _frozen_arrays(args))

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.args)


View = tuple[Transform, ...]


def view_key(view: View) -> str:
    """A content hash of a view, so a site computes each distinct view once per batch."""
    hasher = hashlib.sha256()
    for step in view:
        _digest(["transform", step.op], step.args, hasher)
    return hasher.hexdigest()


@dataclass(frozen=True, eq=False)
class Stat:
    """A request for one additive statistic ``kind`` on a feature ``view``."""

    kind: str
    view: View = ()
    args: tuple[tuple[str, np.ndarray], ...] = field(default=())

    @classmethod
    def of(cls, kind: str, view: View = (), **args: object) -> Stat:
        return cls(kind, tuple(view), _frozen_arrays(args))

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.args)

    @cached_property
    def key(self) -> str:
        """Content address of the request: equal requests share a key and one computation."""
        hasher = hashlib.sha256()
        hasher.update(view_key(self.view).encode())
        _digest(["stat", self.kind], self.args, hasher)
        return f"{self.kind}:{hasher.hexdigest()[:24]}"

    @cached_property
    def view_key(self) -> str:
        return view_key(self.view)
