"""The job file: the documented example parses, every bad key is named, NCTI's terms ride free."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedmte.api import score_detailed
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.plan import make_plan
from fedmte.protocol.scorers import SCORERS
from fedmte.server import job as job_module
from fedmte.server.job import NCTI_TERMS, JobSpec, job_from_dict, load_job, parse_job

MINIMAL = textwrap.dedent(
    """\
    connection = "local"
    labels = ["a", "b", "c"]
    candidates = ["models/mlp", "zoo-name"]
    """
)


def _docstring_example() -> str:
    doc = job_module.__doc__ or ""
    block = doc.split("Example::", 1)[1].split("\n\nEvery table", 1)[0]
    return textwrap.dedent(block).strip() + "\n"


def test_the_documented_example_parses_with_the_values_it_shows() -> None:
    job = parse_job(_docstring_example())
    assert job.connection == "local"
    assert job.num_classes == 3
    assert [c.label for c in job.candidates] == ["resnet-small", "mlp-digits", "random-init"]
    assert job.candidates[0].path == Path("models/resnet-small") and job.candidates[0].name is None
    assert job.candidates[1].name == "mlp-digits" and job.candidates[1].path is None
    assert job.scorer_options == {"gbc": {"gaussian_type": "diagonal"}}
    assert job.constraints.max_parameters == 25_000_000
    assert job.constraints.action_for("licenses") == "filter"
    assert job.constraints.action_for("max_latency_ms") == "flag"
    assert job.constraints.active_rules() == ["max_latency_ms", "max_parameters", "max_peak_memory_mb", "licenses"]
    assert job.ranking.aggregate == "mean_rank" and job.ranking.top_k == 3
    assert job.privacy.dp and job.privacy.epsilon == 1.0 and job.privacy.delta == 1e-6


def test_defaults_of_a_minimal_job() -> None:
    job = parse_job(MINIMAL + 'scorers = ["logme"]\n')
    assert job.output == Path("fedmte-report")
    assert job.ranking.aggregate == "mean_rank" and job.ranking.ties == "average"
    assert job.constraints.active_rules() == []
    assert job.privacy.dp is True and job.privacy.epsilon is None
    assert job.scorers_to_run == ("logme",) and job.auxiliary_scorers == ()


def test_load_job_resolves_relative_paths_against_the_job_folder(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    path = folder / "job.toml"
    path.write_text(MINIMAL + 'scorers = ["logme"]\noutput = "out"\n[federation]\nflwr_home = "flwr"\n', encoding="utf-8")
    job = load_job(path)
    base = folder.resolve()
    assert job.output == base / "out"
    assert job.candidates[0].path == base / "models" / "mlp"
    assert job.candidates[1].path is None
    assert job.federation.flwr_home == base / "flwr"


def test_load_job_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"job file .*nope\.toml does not exist"):
        load_job(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ('scorers = ["logme", "hscore", "logmee"]', r"^job\.toml: scorers\[2\]: unknown scorer 'logmee' \(did you mean 'logme'\?\); choose from logme, "),
        ('scorers = ["parc"]', r"scorers\[0\]: scorer 'parc' cannot be federated"),
        ('scorers = ["logme", "gbc", "logme"]', r"scorers: scorer 'logme' is listed twice \(at \[0\] and \[2\]\)"),
        ("scorers = []", r"scorers: List should have at least 1 item"),
        ('scorers = ["logme"]\nconnexion = "x"', r"job\.toml: connexion: unknown key; allowed here: connection, output, labels"),
        ('scorers = ["logme"]\n[constraints]\nmax_latncy_ms = 3', r"constraints\.max_latncy_ms: unknown key; allowed here: max_latency_ms, "),
        ('scorers = ["logme"]\n[constraints]\nmax_latency_ms = -3', r"constraints\.max_latency_ms: Input should be greater than 0 \(got -3\)"),
        ('scorers = ["logme"]\n[constraints]\nmax_parameters = 1.5', r"constraints\.max_parameters: .*integer"),
        ('scorers = ["logme"]\n[constraints]\nlicenses = []', r"constraints\.licenses: List should have at least 1 item"),
        ('scorers = ["logme"]\n[constraints]\naction = "drop"', r"constraints\.action: Input should be 'flag' or 'filter' \(got 'drop'\)"),
        ('scorers = ["logme"]\n[constraints.actions]\nlicenses = "filter"', r"constraints\.actions names \['licenses'\], which this job does not set"),
        ('scorers = ["gbc"]\n[scorer_options.gbc]\ngaussian_typ = "diagonal"', r"scorer_options\.gbc\.gaussian_typ: unknown option for gbc; it takes \['gaussian_type'\]"),
        ('scorers = ["gbc"]\n[scorer_options.gbc]\ngaussian_type = 3', r"scorer_options\.gbc\.gaussian_type: expected str"),
        ('scorers = ["logme"]\n[scorer_options.logme]\nalpha = 1.0', r"scorer_options\.logme\.alpha: unknown option for logme; it takes no options"),
        ('scorers = ["logme"]\n[scorer_options.gbc]\ngaussian_type = "full"', r"scorer_options\.gbc: 'gbc' is not among the job's scorers"),
        ('scorers = ["logme"]\n[ranking]\naggregate = "single"', r"ranking: aggregate = \"single\" needs ranking\.scorer"),
        ('scorers = ["logme"]\n[ranking]\naggregate = "single"\nscorer = "gbc"', r"ranking\.scorer: 'gbc' is not among the job's scorers"),
        ('scorers = ["logme"]\n[ranking]\nscorer = "logme"', r"ranking\.scorer is only read with aggregate = \"single\""),
        ('scorers = ["logme"]\n[ranking]\naggregate = "mode"', r"ranking\.aggregate: Input should be 'mean_rank', 'median_rank', 'borda' or 'single'"),
        ('scorers = ["logme"]\n[ranking]\ntop_k = 0', r"ranking\.top_k: Input should be greater than or equal to 1"),
        ('scorers = ["logme"]\n[privacy]\ndp = false\nepsilon = 1.0', r"privacy\.epsilon is set but privacy\.dp is false"),
        ('scorers = ["logme"]\n[privacy]\ndelta = 0.5', r"privacy\.delta: Input should be less than or equal to 0\.001"),
        ('scorers = ["logme"]\n[federation]\nmin_sites = 0', r"federation\.min_sites: Input should be greater than or equal to 1"),
    ],
)
def test_each_bad_key_is_named_in_the_error(extra: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse_job(MINIMAL + extra + "\n")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('labels = ["a", "b"]\ncandidates = ["m"]\nscorers = ["logme"]\n', r"job\.toml: connection: required key is missing"),
        ('connection = "x"\nlabels = ["a"]\ncandidates = ["m"]\nscorers = ["logme"]\n', r"labels: List should have at least 2 items"),
        ('connection = "x"\nlabels = ["a", "b", "a"]\ncandidates = ["m"]\nscorers = ["logme"]\n', r"labels: label 'a' is listed twice"),
        ('connection = "x"\nlabels = ["a", "b"]\ncandidates = [{}]\nscorers = ["logme"]\n', r"candidates\[0\]: give a package name or path"),
        ('connection = "x"\nlabels = ["a", "b"]\ncandidates = ["m", "dir/m"]\nscorers = ["logme"]\n', r"candidates: candidate 'm' is listed twice"),
        ('connection = "x"\nlabels = ["a", "b"]\ncandidates = [{ name = "bad name!" }]\nscorers = ["logme"]\n', r"candidates\[0\]\.name: String should match pattern"),
        ('connection = "x"\nlabels = ["a", "b"\n', r"job\.toml: not valid TOML"),
    ],
)
def test_structural_errors_name_the_key(text: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse_job(text)


def test_several_problems_are_reported_at_once_with_the_source_name() -> None:
    with pytest.raises(InvalidInputError, match=r"^site-job\.toml: labels: .*; site-job\.toml: scorers\[0\]: unknown scorer"):
        parse_job('connection = "x"\nlabels = ["a"]\ncandidates = ["m"]\nscorers = ["nope"]\n', source="site-job.toml")


def test_job_from_dict_validates_plain_data_too() -> None:
    job = job_from_dict({"connection": "local", "labels": ["a", "b"], "candidates": ["m1", "m2"], "scorers": ["hscore"]})
    assert isinstance(job, JobSpec) and [c.name for c in job.candidates] == ["m1", "m2"]
    with pytest.raises(InvalidInputError, match=r"^demo: scorers\[0\]: unknown scorer 'hscor'"):
        job_from_dict({"connection": "local", "labels": ["a", "b"], "candidates": ["m"], "scorers": ["hscor"]}, source="demo")


def test_every_registered_scorer_and_its_default_options_are_accepted() -> None:
    options = {name: dict(spec.options) for name, spec in SCORERS.items() if spec.options}
    # Options whose registry default is None take a number.
    options = {name: {k: (1.0 if v is None else v) for k, v in opts.items()} for name, opts in options.items()}
    job = job_from_dict({"connection": "c", "labels": ["a", "b"], "candidates": ["m"], "scorers": list(SCORERS),
                         "scorer_options": options})
    plan = make_plan(job.scorers_to_run, has_features=True, has_source_probs=True, options=job.options_to_run)
    assert set(plan.scorers) == set(SCORERS)


def test_ncti_brings_its_three_terms_at_no_extra_round_or_byte() -> None:
    job = parse_job(MINIMAL + 'scorers = ["logme", "ncti"]\n')
    assert job.scorers_to_run == ("logme", "ncti", *NCTI_TERMS)
    assert job.auxiliary_scorers == NCTI_TERMS
    rng = np.random.default_rng(3)
    labels = np.arange(240) % 3
    features = rng.normal(size=(240, 12)) + 1.5 * np.eye(3, 12)[labels]
    alone = score_detailed(features, labels, scorers=list(job.scorers))
    expanded = score_detailed(features, labels, scorers=list(job.scorers_to_run))
    assert len(expanded.rounds) == len(alone.rounds)
    assert expanded.bytes_sent_per_site == alone.bytes_sent_per_site
    assert expanded.scores["ncti"] == pytest.approx(alone.scores["ncti"], rel=1e-12)
    # The three terms are what the unscaled per-model value adds up.
    seli, ncc, vc = (expanded.scores[t] for t in NCTI_TERMS)
    assert seli + ncc - vc == pytest.approx(alone.scores["ncti"], rel=1e-9)


def test_a_job_that_lists_a_term_itself_keeps_it_ranked() -> None:
    job = parse_job(MINIMAL + 'scorers = ["ncti", "ncti_vc"]\n')
    assert job.scorers_to_run == ("ncti", "ncti_vc", "ncti_seli", "ncti_ncc")
    assert job.auxiliary_scorers == ("ncti_seli", "ncti_ncc")


def test_to_json_dict_is_plain_json_with_a_schema_marker(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(MINIMAL + 'scorers = ["logme"]\n', encoding="utf-8")
    data = load_job(path).to_json_dict()
    assert data["schema"] == "fedmte.job.v1"
    assert data["candidates"][0]["path"] == str(tmp_path.resolve() / "models" / "mlp")
    assert re.fullmatch(r".*fedmte-report", data["output"])
