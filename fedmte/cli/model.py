"""``fedmte model``: make signing keys, pack signed candidate-model packages, inspect them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.client.errors import PackageError

# torch loads when a command runs (fedmte.client.architectures, .packages, .weights), not for --help.

console = Console()
model_app = typer.Typer(help="Candidate-model packages: keys, packing, inspection.", no_args_is_help=True)


def _json(text: str, option: str) -> Any:
    """Inline JSON (starting with ``{``) or the path of a JSON file."""
    try:
        value = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text())
    except (OSError, ValueError) as error:
        raise PackageError(f"{option} must be inline JSON or a JSON file: {error}") from None
    if not isinstance(value, dict):
        raise PackageError(f"{option} must be a JSON object, got {type(value).__name__}")
    return value


@model_app.command("keygen")
@friendly_errors
def keygen(
    key_file: Annotated[Path, typer.Argument(help="where to write the new Ed25519 signing key (PKCS#8 PEM)")],
) -> None:
    """Make a coordinator signing key; prints the public key that sites list in \\[trust.coordinators]."""
    from fedmte.protocol.keys import public_key_text, write_private_key

    key = write_private_key(key_file)
    typer.echo(public_key_text(key))


@model_app.command("pack")
@friendly_errors
def pack(
    out: Annotated[Path, typer.Argument(help="the package directory to create")],
    architecture: Annotated[str, typer.Option(help="architecture id from the site registry (mlp, cnn, text_bag; with extras hf_text_encoder, hf_image_encoder, torchvision, timm)")],
    config: Annotated[str, typer.Option(help="architecture configuration: inline JSON or a .json file")],
    preprocessing: Annotated[str, typer.Option(help="preprocessing: inline JSON or a .json file")],
    name: Annotated[str, typer.Option(help="model name")],
    license: Annotated[str, typer.Option("--license", help="license of the weights, e.g. Apache-2.0")],
    key: Annotated[Path, typer.Option(help="the coordinator's signing key (from `fedmte model keygen`)")],
    weights: Annotated[Path | None, typer.Option(help="weights as safetensors")] = None,
    init_seed: Annotated[int | None, typer.Option(help="instead of --weights: seeded default initialisation (demos, tests)")] = None,
    feature_output: Annotated[str, typer.Option(help="which named output is the feature")] = "features",
    head_output: Annotated[str | None, typer.Option(help="output holding the source head's logits (e.g. logits)")] = None,
    version: Annotated[str, typer.Option(help="model version")] = "1",
    description: Annotated[str, typer.Option(help="free text")] = "",
) -> None:
    """Pack weights and manifest fields into a package signed with --key."""
    from fedmte.client.architectures import initial_weights, pack_model
    from fedmte.client.packages import load_signing_key
    from fedmte.client.weights import read_safetensors

    if (weights is None) == (init_seed is None):
        raise PackageError("give exactly one of --weights FILE.safetensors or --init-seed N")
    config_data = _json(config, "--config")
    tensors = initial_weights(architecture, config_data, init_seed) if init_seed is not None else read_safetensors(weights)
    source_head = None
    if head_output is not None:
        classes = int(config_data.get("num_source_classes", 0))
        source_head = {"output": head_output, "num_classes": classes}
    manifest = pack_model(
        out,
        name=name,
        architecture=architecture,
        config=config_data,
        preprocessing=_json(preprocessing, "--preprocessing"),
        license=license,
        tensors=tensors,
        key=load_signing_key(key),
        feature_output=feature_output,
        source_head=source_head,
        version=version,
        description=description,
    )
    console.print(f"packed [bold]{manifest.name}[/] ({manifest.parameter_count:,} parameters) -> {out}")
    console.print(f"weights sha256 {manifest.weights_sha256}")


@model_app.command("inspect")
@friendly_errors
def inspect(
    package: Annotated[Path, typer.Argument(metavar="PKG", help="a package directory")],
    site: Annotated[Path | None, typer.Option(help="site.toml whose \\[trust.coordinators] and \\[limits] to verify with")] = None,
    public_key: Annotated[list[str] | None, typer.Option("--public-key", help="a pinned key ed25519:...; repeatable")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show what a package claims and whether it verifies (exit 1 if it does not)."""
    from fedmte.client.architectures import inspect_model
    from fedmte.client.site_config import load_site_config
    from fedmte.client.weights import WeightLimits

    keys: list[str] = list(public_key or [])
    limits = WeightLimits()
    if site is not None:
        config = load_site_config(site)
        keys += list(config.trust.keys)
        limits = config.limits
    report = inspect_model(package, keys, limits)
    if as_json:
        typer.echo(json.dumps({
            "verified": report.verified,
            "verdict": report.verdict,
            "key_id": report.key_id,
            "tensors": report.tensor_count,
            "manifest": None if report.manifest is None else report.manifest.to_json_dict(),
        }, indent=2))
    else:
        title = "verified" if report.verified else "NOT verified: what the manifest claims"
        console.print(f"{package}: {title}", soft_wrap=True, highlight=False)  # one line, whatever the width
        table = Table(show_header=False)
        if report.manifest is not None:
            m = report.manifest
            rows = [
                ("name", f"{m.name} v{m.version}"), ("architecture", m.architecture),
                ("config", json.dumps(m.config)), ("preprocessing", json.dumps(m.preprocessing.model_dump())),
                ("feature output", m.feature_output),
                ("source head", "none" if m.source_head is None else f"{m.source_head.output} ({m.source_head.num_classes} classes)"),
                ("license", m.license), ("parameters", f"{m.parameter_count:,}"),
                ("weights", f"{m.weights_bytes:,} bytes, sha256 {m.weights_sha256}"),
            ]
            for field, value in rows:
                table.add_row(field, value)
        table.add_row("signature", report.verdict + (f" (key {report.key_id})" if report.key_id else ""))
        console.print(table)
    if not report.verified:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
