"""``fedmte local up|down``: a loopback federation (one SuperLink, N SuperNodes) to try fedmte."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmte.cli.demo import warn_if_dp_off
from fedmte.cli.errors import friendly_errors

# flwr, torch and cryptography load when a command runs (fedmte.trial.local_federation), not for --help.

local_app = typer.Typer(help="Start and stop a loopback Flower federation with TLS and node authentication.",
                        no_args_is_help=True)

DEFAULT_DIR = Path("fedmte-local")


@local_app.command("up")
@friendly_errors
def up(
    sites: Annotated[int, typer.Option("--sites", min=1, help="number of SuperNodes (sites) to start")] = 3,
    directory: Annotated[Path, typer.Option("--dir", help="where certificates, keys, data, logs and state go")] = DEFAULT_DIR,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="an .npz per site, or one to split unevenly: 'inputs' and 'labels' make data owners' sites "
        "(site.toml; candidate models run at the site), 'features', 'labels' and 'source_probs' make sites of "
        "precomputed features; default: a seeded demo set of vectors")] = None,
    dp: Annotated[bool, typer.Option(
        "--dp/--no-dp", help="the sites' policies add Gaussian DP noise to every release (default), or release "
        "exact sums (a clip norm no row reaches)")] = True,
    stock: Annotated[bool, typer.Option(
        "--stock", help="plain flower-supernode sites that run whatever ClientApp a bundle names "
        "(default: fedmte site runners that refuse bundles not on their allowlist)")] = False,
    allow_fab: Annotated[list[str] | None, typer.Option(
        "--allow-fab", help="another Flower app bundle sha256 the site runners accept")] = None,
) -> None:
    """Start one SuperLink and N SuperNodes on 127.0.0.1, then print how to run a job."""
    warn_if_dp_off(dp)
    from fedmte.protocol.secure_sum import majority_threshold
    from fedmte.trial.local_federation import up as federation_up
    from fedmte.trial.local_federation import write_example_job

    state = federation_up(directory, sites, data=data or (), runner="stock" if stock else "site",
                          allowlist=allow_fab or (), dp=dp)
    job = write_example_job(state)
    typer.echo(f"SuperLink {state.address} (TLS, node authentication), {len(state.sites)} site(s) online, "
                  f"runner: {state.runner}")
    for site in state.sites:
        typer.echo(f"  {site.name}: node {site.node_id}, site file {site.site_file}")
    typer.echo(f"Coordinator key {state.coordinator_key} (trusted once in every site file's [trust.coordinators]; "
               f"DP {'on' if dp else 'off'})")
    if state.secure is not None:
        typer.echo(f"Secure sum on for the example job: a [secure] table in each site file, threshold "
                   f"{state.secure.threshold or majority_threshold(len(state.secure.roster))} of {len(state.secure.roster)}")
    typer.echo(f"Flower connection {state.connection!r} in FLWR_HOME={state.flwr_home}")
    typer.echo(f"Try: fedmte run {job}\nStop: fedmte local down --dir {directory}")


@local_app.command("down")
@friendly_errors
def down(
    directory: Annotated[Path, typer.Option("--dir", help="the directory given to `fedmte local up`")] = DEFAULT_DIR,
) -> None:
    """Stop the federation's processes (SIGINT, then SIGKILL after a grace period)."""
    from fedmte.trial.local_federation import down as federation_down

    stopped = federation_down(directory)
    typer.echo(f"stopped {len(stopped)} process(es) of the federation in {directory}")


def register(app: typer.Typer) -> None:
    app.add_typer(local_app, name="local")
