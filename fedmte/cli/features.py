"""``fedmte features``: run one candidate model over the site's own data, for local inspection.

Writes ``features``, ``labels`` and, for a model with a source head, ``source_probs`` to an
``.npz`` on the site's disk (nothing leaves the site); the same file feeds ``fedmte score``.
Features go through the site's feature cache, so a second run reads them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedmte.cli.errors import friendly_errors

console = Console(stderr=True)


@friendly_errors
def features(
    model: Annotated[Path, typer.Option("--model", metavar="PKG", help="a signed model package directory")],
    site: Annotated[Path, typer.Option("--site", metavar="SITE.toml", help="the site file")],
    out: Annotated[Path, typer.Option("--out", metavar="FEATS.npz", help="where to write the arrays")],
    labels: Annotated[str | None, typer.Option(help="label space a,b,c (default: \\[data] labels of the site file)")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="override \\[compute] batch_size")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="override \\[compute] threads")] = None,
    device: Annotated[str | None, typer.Option(help="override \\[compute] device: auto, cpu or cuda")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
) -> None:
    """Extract a model's features of the site's data into FEATS.npz."""
    # torch loads here, when the command runs, not for --help
    from fedmte.client.architectures import load_model
    from fedmte.client.cache import FeatureCache
    from fedmte.client.data import open_site_data
    from fedmte.client.extract import ExtractionSettings, extract
    from fedmte.client.site_config import load_site_config

    config = load_site_config(site)
    loaded = load_model(model, config.trust.keys, config.limits)
    names = [n.strip() for n in labels.split(",") if n.strip()] if labels is not None else None
    data = open_site_data(config.data, names)
    overrides = {k: v for k, v in {"batch_size": batch_size, "threads": threads, "device": device}.items() if v is not None}
    settings = ExtractionSettings.from_compute(config.compute, **overrides, progress=progress and config.compute.progress)
    result = extract(loaded, data, cache=FeatureCache(config.site.cache_dir), settings=settings)
    assert result.entry is not None
    shapes = result.entry.export_npz(out)
    rows = result.rows
    m = result.metrics
    source = "read from the feature cache" if result.from_cache else f"computed on {m.device} ({m.threads} threads)"
    console.print(f"{loaded.manifest.name}: {rows['used']:,} rows used, {rows['skipped']:,} skipped; features {source}")
    for reason, count in rows["skipped_by_reason"].items():
        console.print(f"  skipped {count:,}: {reason}")
    if rows.get("ignored_files"):
        console.print(f"  ignored {rows['ignored_files']:,} files that are not images")
    latency = "n/a" if m.latency_ms is None else f"{m.latency_ms:.2f} ms"
    peak = "n/a" if m.peak_rss_bytes is None else f"{m.peak_rss_bytes / 2**20:,.0f} MiB"
    console.print(f"  {m.throughput:,.0f} samples/s, single-sample latency {latency}, peak memory {peak}")
    console.print(f"wrote {out}: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items()))


def register(app: typer.Typer) -> None:
    app.command("features")(features)
