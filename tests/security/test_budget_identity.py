"""Finding 6 (budget identity): the privacy ledger is keyed by the data's content, not its path.

Before, the ledger kept a data source's budget under ``<kind>:<path>``: moving or renaming
the data, or a second site file reaching the same rows by another path, started a fresh
budget. Now the key is :func:`fedmte.client.data.content_identity` (the sorted content hashes
of the data's files), so the spent budget follows the rows.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np

from fedmte.client.data import content_identity
from fedmte.client.site_agent import SiteAgent
from fedmte.client.site_config import load_site_config, site_file_text
from fedmte.trial.local_sites import coordinator_key, write_site

LABELS = ["a", "b"]


def a_site(root: Path) -> Path:
    key, _ = coordinator_key(root / "coordinator")
    rng = np.random.default_rng(3)
    return write_site(root / "site", "ward", {"features": rng.normal(size=(40, 3)), "labels": np.arange(40) % 2},
                      LABELS, coordinator=key, dp=True)


def rewrite(site_file: Path, **data: object) -> None:
    document = tomllib.loads(site_file.read_text(encoding="utf-8"))
    document["data"].update(data)
    site_file.write_text(site_file_text(document), encoding="utf-8")


def test_moving_the_data_keeps_its_ledger_key(tmp_path: Path) -> None:
    site_file = a_site(tmp_path)
    before = SiteAgent(site_file)
    key = before.data_source
    before.close()
    moved = tmp_path / "elsewhere" / "renamed.npz"
    moved.parent.mkdir()
    shutil.move(site_file.parent / "data.npz", moved)
    rewrite(site_file, path=str(moved))
    after = SiteAgent(site_file)
    assert after.data_source == key and key.startswith("features:sha256:")
    after.close()


def test_a_second_site_file_over_a_copy_of_the_rows_shares_the_budget_key(tmp_path: Path) -> None:
    site_file = a_site(tmp_path)
    copy = tmp_path / "copy" / "data.npz"
    copy.parent.mkdir()
    shutil.copy(site_file.parent / "data.npz", copy)
    first = load_site_config(site_file).data
    second = first.model_copy(update={"path": copy})
    assert content_identity(first) == content_identity(second)


def test_other_rows_have_another_identity(tmp_path: Path) -> None:
    site_file = a_site(tmp_path)
    config = load_site_config(site_file).data
    other = tmp_path / "other.npz"
    np.savez(other, features=np.zeros((40, 3)), labels=np.arange(40) % 2)
    assert content_identity(config) != content_identity(config.model_copy(update={"path": other}))
