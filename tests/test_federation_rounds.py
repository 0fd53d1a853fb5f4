"""The coordinator's round driver and the site's query answers, without Flower.

An in-process exchange hands each payload to :func:`fedmte.client.queries.answer` through
the same wire form Flower carries (packed buffers + JSON), so these tests cover everything
but the Flower processes quickly; ``test_flower_federation.py`` covers those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

import fedmte
from fedmte.client.queries import answer, load_site_data
from fedmte.protocol.errors import FederationError, InvalidInputError, StatisticsError, UnknownStatisticError
from fedmte.protocol.messages import encode_round
from fedmte.protocol.requests import Stat
from fedmte.protocol.wire import INLINE_LIMIT, STATS, Payload, pack_arrays, unpack_arrays
from fedmte.server.rounds import PlainSum, describe_sites, run_scoring
from tests.datasets import DATASETS, site_split_without_class

DATA = DATASETS["basic"]
SCORERS = ["hscore", "leep", "gbc", "logme", "nce", "sfda"]


class WireExchange:
    """Sites as ``.npz`` files, messages through the wire form, optional failing sites."""

    def __init__(self, paths: Sequence[Path], failing: Mapping[int, str] | None = None) -> None:
        self.paths = {node + 100: path for node, path in enumerate(paths)}
        self.failing = dict(failing or {})
        self.sent: list[tuple[str, str]] = []

    @property
    def nodes(self) -> Sequence[int]:
        return sorted(self.paths)

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        self.sent.append((query, group))
        replies, failures = {}, {}
        for node, payload in payloads.items():
            if node in self.failing:
                failures[str(node)] = self.failing[node]
                continue
            received = Payload.from_wire(*payload.to_wire())
            reply = answer(query, received, self.paths[node])
            replies[node] = Payload.from_wire(*reply.to_wire())
        if failures:
            raise FederationError(f"round {group} failed", failures=failures)
        return replies


def write_sites(tmp_path: Path, rows: Sequence[np.ndarray], **drop: bool) -> list[Path]:
    paths = []
    for k, idx in enumerate(rows):
        arrays = {"features": DATA.features[idx], "labels": DATA.labels[idx], "source_probs": DATA.source_probs[idx]}
        for key, dropped in drop.items():
            if dropped:
                arrays.pop(key)
        path = tmp_path / f"site{k}.npz"
        np.savez(path, **arrays)
        paths.append(path)
    return paths


def test_federated_scores_equal_pooled_scores_and_rounds_are_as_planned(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, site_split_without_class(DATA, absent=0, sites=3))
    exchange = WireExchange(paths)
    outcome = run_scoring(exchange, scorers=SCORERS, num_classes=DATA.num_classes)
    pooled = fedmte.score(DATA.features, DATA.labels, source_probs=DATA.source_probs, scorers=SCORERS)
    for name in SCORERS:
        assert outcome.result.scores[name] == pytest.approx(pooled[name], rel=1e-9), name
    # one setup round, then exactly the rounds the plan stated, each one round trip
    assert exchange.sent[0] == ("describe", "setup")
    assert [q for q, _ in exchange.sent[1:]] == [STATS] * outcome.plan.rounds
    assert len(outcome.timings) == 1 + outcome.plan.rounds
    assert outcome.sites == 3 and outcome.shape.dim == DATA.features.shape[1]


def test_a_failing_site_stops_the_job_with_its_reason(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, np.array_split(np.arange(len(DATA.labels)), 3))
    exchange = WireExchange(paths, failing={101: "refused by site: policy"})
    with pytest.raises(FederationError, match="round setup failed") as caught:
        run_scoring(exchange, scorers=["hscore"], num_classes=DATA.num_classes)
    assert caught.value.failures == {"101": "refused by site: policy"}


def test_sites_whose_data_disagree_in_shape_are_refused(tmp_path: Path) -> None:
    rows = np.array_split(np.arange(len(DATA.labels)), 2)
    paths = write_sites(tmp_path, rows)
    odd = tmp_path / "odd.npz"
    np.savez(odd, features=DATA.features[rows[1], :5], labels=DATA.labels[rows[1]])
    with pytest.raises(FederationError, match="do not agree in shape"):
        describe_sites(WireExchange([paths[0], odd]))


def test_a_site_refuses_labels_outside_the_jobs_classes(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, [np.arange(len(DATA.labels))])
    request, arrays = encode_round([Stat.of("class_counts")], round_index=1, num_classes=DATA.num_classes - 1)
    with pytest.raises(InvalidInputError, match="outside the job's 3 classes"):
        answer(STATS, Payload(doc=request.model_dump(mode="json"), arrays=arrays), paths[0])


def test_a_site_refuses_a_statistic_outside_its_catalogue(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, [np.arange(len(DATA.labels))])
    request, arrays = encode_round([Stat.of("count")], round_index=1, num_classes=DATA.num_classes)
    doc = request.model_dump(mode="json")
    doc["stats"][0]["kind"] = "raw_rows"
    with pytest.raises(UnknownStatisticError, match="unknown statistic 'raw_rows'"):
        answer(STATS, Payload(doc=doc, arrays=arrays), paths[0])


def test_plain_sum_adds_every_sites_statistics(tmp_path: Path) -> None:
    rows = np.array_split(np.arange(len(DATA.labels)), 3)
    exchange = WireExchange(write_sites(tmp_path, rows))
    stats = [Stat.of("count"), Stat.of("class_sums")]
    request, arrays = encode_round(stats, round_index=1, num_classes=DATA.num_classes)
    total = PlainSum().sum_round(exchange, request, arrays)
    assert int(total[stats[0].key]) == len(DATA.labels)
    expected = np.eye(DATA.num_classes)[DATA.labels].T @ DATA.features
    np.testing.assert_allclose(total[stats[1].key], expected, rtol=1e-12)


def test_site_file_without_source_probs_makes_source_scorers_unavailable(tmp_path: Path) -> None:
    paths = write_sites(tmp_path, np.array_split(np.arange(len(DATA.labels)), 2), source_probs=True)
    with pytest.raises(InvalidInputError, match="leep needs the source model's class probabilities"):
        run_scoring(WireExchange(paths), scorers=["leep"], num_classes=DATA.num_classes)


def test_site_data_is_validated_when_loaded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.full((3, 2), np.nan), labels=np.array([0, 1, 0]))
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        load_site_data(bad)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_site_data(tmp_path / "missing.npz")


def test_wire_packing_round_trips_and_refuses_a_forged_layout() -> None:
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 4)), "n": np.asarray(7, dtype=np.int64), "c": np.arange(5), "e": np.zeros((0, 2))}
    layout, blob = pack_arrays(arrays)
    assert len(blob) == 8 * (12 + 1 + 5)  # every value once, nothing else
    back = unpack_arrays(layout, blob)
    assert back.keys() == arrays.keys()
    for name in arrays:
        assert back[name].dtype == arrays[name].dtype and np.array_equal(back[name], arrays[name])
    overlapping = [dict(layout[0]), dict(layout[0], name="a2")]
    with pytest.raises(StatisticsError, match="does not follow the previous one"):
        unpack_arrays(overlapping, blob)
    with pytest.raises(StatisticsError, match="40 bytes that no array claims"):
        unpack_arrays(layout[:2], blob)  # drop "c" and "e": the five int64 values of "c" dangle
    with pytest.raises(StatisticsError, match="not f8/i8"):
        unpack_arrays([dict(layout[0], dtype="O")], blob)
    with pytest.raises(StatisticsError, match="only float64 and int64 travel"):
        Payload(arrays={"x": np.zeros(2, dtype=np.float32)})


@pytest.mark.parametrize("rows", [3, 200_000], ids=["inline", "chunked"])
def test_flower_records_carry_payloads_both_ways_exactly(rows: int) -> None:
    from fedmte.flower_records import payload_from_record, payload_to_record

    rng = np.random.default_rng(1)
    payload = Payload(doc={"round": 2}, arrays={"x": rng.normal(size=(rows, 2)), "k": np.arange(3)})
    assert (16 * rows > INLINE_LIMIT) == (rows > 3)
    record = payload_to_record(payload)
    assert ("arrays" in record.array_records) == (rows > 3)
    back = payload_from_record(record)
    assert back.doc == payload.doc
    assert all(np.array_equal(back.arrays[k], v) and back.arrays[k].dtype == v.dtype for k, v in payload.arrays.items())


def test_job_file_paths_are_relative_to_it_and_errors_name_the_key(tmp_path: Path) -> None:
    from fedmte.server.job_runner import load_job_file, server_job

    path = tmp_path / "job.toml"
    path.write_text('connection = "local"\nflwr_home = "flwr"\nout = "out/report.json"\nnum_classes = 3\n'
                    'scorers = ["hscore"]\n[options.hscore]\n')
    job = load_job_file(path)
    assert job.out == tmp_path / "out" / "report.json" and job.flwr_home == tmp_path / "flwr"
    assert server_job(job).report == str(tmp_path / "out" / "report.json")
    path.write_text('connection = "local"\nout = "r.json"\nnum_classes = 1\nscorerz = ["hscore"]\n')
    with pytest.raises(InvalidInputError, match=r"num_classes: Input should be greater than or equal to 2.*scorerz"):
        load_job_file(path)
