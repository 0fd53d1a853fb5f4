"""The federated linear probe (issue 13's confirmation stage, its exact core).

(a) Over in-memory sites, however the rows are split and batched, its weights equal a
centralised L-BFGS fit on the pooled training rows (tests/refs/linear_probe.py, written
without fedmte) to 1e-6, and its held-back counts equal the centralised model's exactly.
(b) The same through real site agents in a loopback job. (c) The split is a deterministic
function of the seed and each row's id, disjoint and covering, and the ids survive the
site's clipping. (d) Under DP every probe block moves by at most its declared sensitivity
when one record is added or replaced, and a DP job noises every block with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import fedmte
from fedmte.cli import app
from fedmte.client.audit_log import read_records
from fedmte.client.privacy import ClipCounts, clip_batch, clip_rows, guarded_sums
from fedmte.protocol import dp
from fedmte.protocol.audit_format import IntentRecord
from fedmte.protocol.catalogue import Batch, accumulate, holdout_mask
from fedmte.protocol.errors import InvalidInputError, ScorerDomainError
from fedmte.protocol.inputs import check_inputs
from fedmte.protocol.local import InMemorySite
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import Context
from fedmte.protocol.scorers.linear_probe import ProbeFit, fit
from fedmte.protocol.statistics import Statistics
from fedmte.server.coordinator import build_job_report
from tests.datasets import DATASETS, make
from tests.job_helpers import LABELS
from tests.refs.linear_probe import held_back, lbfgs_fit, probe
from tests.test_site_agent import World

WEIGHTS_TOLERANCE = 1e-6


def run_fit(features: np.ndarray, labels: np.ndarray, sites: Sequence[np.ndarray], *, batch_size: int = 4096,
            **options: object) -> ProbeFit:
    """Drive the probe's program over in-memory sites: each round's requests summed over them."""
    inputs = check_inputs(features, labels)
    members = [InMemorySite(inputs, np.asarray(rows), batch_size) for rows in sites]
    program = fit(Context(inputs.num_classes, inputs.dim, 0, np.zeros(inputs.dim)), **options)
    requests = next(program)
    while True:
        total = Statistics.empty()
        for site in members:
            total = total + site.compute(list(requests.values()))
        try:
            requests = program.send({name: total[stat.key] for name, stat in requests.items()})
        except StopIteration as done:
            return done.value


def splits(n: int) -> dict[str, list[np.ndarray]]:
    rows = np.arange(n)
    shuffled = np.random.default_rng(7).permutation(n)
    return {"one": [rows], "two": list(np.array_split(rows, 2)), "three_shuffled": list(np.array_split(shuffled, 3)),
            "seven_uneven": [shuffled[: n // 10], shuffled[n // 10: n // 3], *np.array_split(shuffled[n // 3:], 5)]}


# --------------------------------------------------------------------------- (a) exactness, in memory

@pytest.mark.parametrize("dataset", ["basic", "binary", "well_separated", "large_offset", "d_gt_n"])
@pytest.mark.parametrize("split", ["one", "two", "three_shuffled", "seven_uneven"])
def test_weights_equal_a_centralised_lbfgs_fit_and_the_counts_are_the_same(dataset: str, split: str) -> None:
    data = DATASETS[dataset]
    weights, correct, rows = probe(data.features, data.labels, np.arange(len(data.labels)), data.num_classes)
    got = run_fit(data.features, data.labels, splits(len(data.labels))[split], batch_size=37)
    assert got.converged and got.rounds <= 12
    assert np.abs(got.weights - weights).max() <= WEIGHTS_TOLERANCE * max(1.0, np.abs(weights).max())
    assert int(got.correct.sum()) == correct and int(got.held_back.sum()) == rows
    assert got.accuracy == correct / rows


def test_options_change_the_fit_as_the_reference_does() -> None:
    data = make("opts", n=400, d=5, classes=3, seed=21)
    for options in ({"l2": 0.01, "seed": 5, "holdout": 0.3}, {"l2": 30.0, "seed": 99_999_999, "holdout": 0.5}):
        weights, correct, rows = probe(data.features, data.labels, np.arange(400), 3, **options)
        got = run_fit(data.features, data.labels, splits(400)["three_shuffled"], **options)
        assert np.abs(got.weights - weights).max() <= WEIGHTS_TOLERANCE * max(1.0, np.abs(weights).max())
        assert (int(got.correct.sum()), int(got.held_back.sum())) == (correct, rows)
        score = fedmte.score(data.features, data.labels, scorers=["linear_probe"], sites=4,
                             options={"linear_probe": options})["linear_probe"]
        assert score == correct / rows


def test_the_intercepts_sum_to_zero_and_the_gradient_vanishes() -> None:
    data = DATASETS["basic"]
    got = run_fit(data.features, data.labels, splits(len(data.labels))["two"])
    assert abs(got.weights[-1].sum()) <= 1e-10
    train = ~held_back(np.arange(len(data.labels)), 0, 0.2)
    x = np.hstack([data.features[train], np.ones((int(train.sum()), 1))])
    z = x @ got.weights
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    penalty = got.weights.copy()
    penalty[-1] = 0.0
    gradient = x.T @ (p - np.eye(data.num_classes)[data.labels[train]]) + penalty
    assert np.abs(gradient).max() <= 1e-8


def test_a_class_with_no_training_rows_is_refused_and_max_rounds_stops_early() -> None:
    data = make("few", n=60, d=3, classes=3, seed=2)
    labels = data.labels.copy()
    back = held_back(np.arange(60), 0, 0.2)
    labels[(labels == 2) & ~back] = 1  # class 2 now lives only in held-back rows
    assert np.any(labels[back] == 2)
    with pytest.raises(ScorerDomainError, match="no training rows of classes \\[2\\]"):
        run_fit(data.features, labels, [np.arange(60)])
    one = run_fit(data.features, data.labels, [np.arange(60)], max_rounds=1)
    assert one.rounds == 1 and not one.converged and not one.weights.any()


# --------------------------------------------------------------------------- (b) through the site agents

def site_features(world: World, model: str, tmp: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each site's features of ``model`` by ``fedmte features`` (fresh caches), in data order."""
    out = []
    for k, site_file in enumerate(world.site_files):
        fresh = site_file.with_name("site-fresh.toml")
        fresh.write_text(site_file.read_text().replace('cache_dir = "cache"', f'cache_dir = "{tmp / f"fresh-{k}"}"'))
        path = tmp / f"{model}-{k}.npz"
        result = CliRunner().invoke(app, ["features", "--model", str(world.packages[model]), "--site", str(fresh),
                                          "--out", str(path), "--labels", ",".join(LABELS), "--no-progress"])
        assert result.exit_code == 0, result.output
        with np.load(path, allow_pickle=False) as arrays:
            out.append((arrays["features"], arrays["labels"]))
    return out


def test_a_job_through_the_site_agents_gives_the_pooled_accuracy(tmp_path: Path) -> None:
    world = World(tmp_path, sites=3)
    models = ["tanh-head", "gelu-deep"]
    options = {"seed": 42, "holdout": 0.25}
    job = world.job(models, scorers=["linear_probe"], scorer_options={"linear_probe": options})
    outcome, _ = world.run(job, "301")
    report = build_job_report(job, outcome)
    by_name = {m.name: m for m in report.models}
    for model in models:
        parts = site_features(world, model, tmp_path)
        # each site numbers its own rows; the pooled reference splits every site by its own ids
        backs = [held_back(np.arange(len(y)), 42, 0.25) for _, y in parts]
        x = np.concatenate([f for f, _ in parts])
        y = np.concatenate([labels for _, labels in parts])
        back = np.concatenate(backs)
        weights = lbfgs_fit(x[~back], y[~back], len(LABELS))
        z = x[back] @ weights[:-1] + weights[-1]
        correct, rows = int(np.sum(np.argmax(z, axis=1) == y[back])), int(back.sum())
        assert by_name[model].scores["linear_probe"] == correct / rows, (model, by_name[model].failures)
    # every candidate ran in the same rounds: the job took the slowest one's, not their sum
    assert len([r for r in outcome.rounds if r.kinds]) <= 13


# --------------------------------------------------------------------------- (c) the split

def test_the_split_is_a_deterministic_function_of_seed_and_row_id() -> None:
    ids = np.arange(20_000)
    first = holdout_mask(ids, 3, 0.2)
    assert np.array_equal(first, holdout_mask(ids, 3, 0.2))
    assert np.array_equal(first, held_back(ids, 3, 0.2))  # the independent transcription
    assert abs(first.mean() - 0.2) < 0.01
    assert (first != holdout_mask(ids, 4, 0.2)).mean() > 0.2  # another seed, another split
    assert np.all(holdout_mask(ids, 3, 0.1) <= holdout_mask(ids, 3, 0.3))  # nested in the fraction
    # a row's part is its own: the same id gives the same answer in any batch, in any order
    order = np.random.default_rng(0).permutation(ids)
    assert np.array_equal(holdout_mask(order, 3, 0.2), first[order])
    assert np.array_equal(holdout_mask(ids[5000:5010], 3, 0.2), first[5000:5010])


def test_the_parts_are_disjoint_and_cover_every_row_through_the_catalogue() -> None:
    rng = np.random.default_rng(1)
    n, c = 500, 4
    labels = rng.integers(0, c, n)
    ids = rng.permutation(10 * n)[:n]  # ids need not be contiguous
    batches = [Batch(features=rng.normal(size=(m, 3)), labels=labels[s:s + m], num_classes=c, row_ids=ids[s:s + m])
               for s, m in ((0, 123), (123, 300), (423, 77))]
    split = {"seed": 9, "holdout": 0.3}
    sums = accumulate([Stat.of("holdout_class_counts", part=0, **split), Stat.of("holdout_class_counts", part=1, **split),
                       Stat.of("class_counts")], batches)
    train, back, total = (sums[s.key] for s in [Stat.of("holdout_class_counts", part=p, **split) for p in (0, 1)]
                          + [Stat.of("class_counts")])
    assert np.array_equal(train + back, total)
    mask = held_back(ids, 9, 0.3)
    assert np.array_equal(back, np.bincount(labels[mask], minlength=c))


def test_row_ids_survive_the_sites_clipping_and_row_by_row_fallback() -> None:
    rng = np.random.default_rng(2)
    ids = np.arange(100, 110)
    batch = Batch(features=rng.normal(size=(10, 3)) * 10, labels=rng.integers(0, 2, 10), num_classes=2, row_ids=ids)
    clipped = clip_batch(batch, 1.0)
    assert np.array_equal(clipped.row_ids, ids)
    assert np.array_equal(clipped.rows(slice(3, 5)).row_ids, ids[3:5])
    assert np.array_equal(clipped.rows(np.array([1, 7])).row_ids, ids[[1, 7]])
    weights = rng.normal(size=(4, 2))
    stats = [Stat.of("probe_gradient", weights=weights, seed=1, holdout=0.5),
             Stat.of("probe_correct", weights=weights, seed=1, holdout=0.5)]
    whole = accumulate(stats, [clipped])
    features = clipped.features.copy()
    features[4] = np.inf  # forces the row-by-row path, which leaves that row out
    fallback = guarded_sums(stats, [Batch(features, clipped.labels, 2, row_ids=ids)], ClipCounts())
    keep = np.ones(10, dtype=bool)
    keep[4] = False
    alone = accumulate(stats, [clipped.rows(keep)])
    for stat in stats:
        assert np.allclose(fallback[stat.key], alone[stat.key])
    with pytest.raises(InvalidInputError, match="names none"):  # no ids: refused, never numbered from 0
        accumulate(stats, [Batch(clipped.features, clipped.labels, 2)])
    assert whole[stats[1].key].sum() >= alone[stats[1].key].sum()


# --------------------------------------------------------------------------- (d) sensitivities

PROBE_TRAIN = ("probe_loss", "probe_gradient", "probe_hessian")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 10), d=st.integers(1, 4), c=st.integers(1, 4), clip=st.floats(0.1, 5.0),
       scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 2**32 - 1),
       relation=st.sampled_from(["add_remove", "replace_one"]))
def test_one_record_moves_each_probe_block_by_at_most_its_sensitivity(n: int, d: int, c: int, clip: float, scale: float,
                                                                         seed: int, relation: str) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(d + 1, c)) * scale
    # holdout near 0 puts every row in training, near 1 every row in the held-back part:
    # the adversary's row then always lands where each statistic reads
    train = {"seed": 1, "holdout": 1e-15}
    back = {"seed": 1, "holdout": 1.0 - 1e-15}
    stats = [Stat.of(kind, weights=weights, **train) for kind in PROBE_TRAIN]
    stats += [Stat.of("probe_correct", weights=weights, **back), Stat.of("holdout_class_counts", part=1, **back),
              Stat.of("holdout_class_counts", part=0, **train)]
    x, _, _ = clip_rows(rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0), clip)
    y = rng.integers(0, c, n)
    adversary, _, _ = clip_rows(rng.normal(size=(1, d)) * 1e3, clip)
    label = rng.integers(0, c, 1)
    base = [Batch(x, y, c, row_ids=np.arange(n))]
    if relation == "add_remove":
        neighbour = base + [Batch(adversary, label, c, row_ids=np.array([n]))]
    else:
        if n == 0:
            return
        neighbour = [Batch(np.vstack([x[:-1], adversary]), np.concatenate([y[:-1], label]), c, row_ids=np.arange(n))]
    before, after = accumulate(stats, base), accumulate(stats, neighbour)
    for stat in stats:
        old = np.asarray(before[stat.key], dtype=np.float64) if stat.key in before else 0.0
        moved = float(np.linalg.norm(np.asarray(after[stat.key], dtype=np.float64) - old))
        bound = dp.stat_sensitivity(stat, clip, relation)
        assert moved <= bound * (1 + 1e-9) + 1e-9, (stat.kind, relation, moved, bound)


def test_the_hessian_constant_is_near_tight_and_the_loss_bound_follows_the_weights() -> None:
    # the worst probability vector (max p = 1/sqrt 3 on two classes) and x~ along one axis
    p = np.array([1 / np.sqrt(3), 1 - 1 / np.sqrt(3)])
    s = np.diag(p) - np.outer(p, p)
    assert np.linalg.norm(s) <= dp.SENSITIVITY["probe_hessian"].add_remove
    weights = np.zeros((3, 4))
    weights[:, 2] = [3.0, 4.0, 0.0]
    stat = Stat.of("probe_loss", weights=weights, seed=0, holdout=0.2)
    assert dp.stat_sensitivity(stat, 2.0) == pytest.approx(np.log(4) + 2 * np.sqrt(5) * 5)
    grad = Stat.of("probe_gradient", weights=weights, seed=0, holdout=0.2)
    assert dp.stat_sensitivity(grad, 2.0) == pytest.approx(np.sqrt(2) * np.sqrt(5))


def test_a_dp_job_noises_every_probe_block_with_its_declared_sensitivity(tmp_path: Path) -> None:
    world = World(tmp_path, dp=True, sites=2)
    job = world.job(["gelu-head"], scorers=["linear_probe"], scorer_options={"linear_probe": {"max_rounds": 2}})
    outcome, _ = world.run(job, "302")
    report = build_job_report(job, outcome)
    assert report.privacy.dp_applied
    for site_file in world.site_files:
        intents = [r for r in read_records(site_file.parent / "audit") if isinstance(r, IntentRecord) and r.privacy]
        assert len(intents) == 3  # two Newton rounds and the validation counts, each one charged release
        kinds = set()
        for intent in intents:
            for block in intent.statistics:
                kinds.add(block.kind)
                assert block.sensitivity is not None and float(block.sensitivity) > 0, block.kind
                assert block.noise_std is not None and float(block.noise_std) > 0, block.kind
        assert {"probe_loss", "probe_gradient", "probe_hessian", "probe_correct", "holdout_class_counts"} <= kinds
    model = next(iter(report.models))
    assert "linear_probe" in model.scores or "linear_probe" in model.failures
