"""The registry commands: ``vit registry list|show|promote`` look after the registered models, ``vit predict``
classifies images with one of them. They wrap ``pipelines.registry``, which imports MLflow only inside its
functions: ``vit --help`` stays fast."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import click

from pipelines.cli.errors import fail, failing_on
from pipelines.cli.options import connect_tracking, image_files, tracking_uri_option
from pipelines.registry.predict import predict_images
from pipelines.registry.registry import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_TOP_K,
    RegistryError,
    describe_model,
    list_models,
    model_card,
    promote,
)


def _user_errors() -> contextlib.AbstractContextManager[None]:
    """Unknown models, versions or aliases, MLflow's refusals, bad images: ``error: ...`` and exit 2."""
    from mlflow.exceptions import MlflowException

    return failing_on(RegistryError, MlflowException, ValueError, OSError, describe=_message)


def _message(err: Exception) -> str:
    return getattr(err, "message", None) or str(err)  # MlflowException keeps its text in .message


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


@click.group(name="registry", context_settings={"help_option_names": ["-h", "--help"]})
def registry() -> None:
    """Registered ViT models: list them, show their versions, promote a challenger to champion."""


@registry.command(name="list")
@tracking_uri_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
def list_command(tracking_uri: str | None, as_json: bool) -> None:
    """List registered models with their aliases."""
    connect_tracking(tracking_uri)
    with _user_errors():
        models = list_models()
    if as_json:
        for model in models:
            click.echo(json.dumps(model))
        return
    if not models:
        click.echo("no registered models")
        return
    rows = [
        [m["name"], m["latest_version"] or "-", m["aliases"].get(CHAMPION, "-"), m["aliases"].get(CHALLENGER, "-")]
        + [m["updated"] or "-"]
        for m in models
    ]
    _table(rows, ["name", "latest", CHAMPION, CHALLENGER, "updated"])


@registry.command(name="show")
@tracking_uri_option
@click.option("--json", "as_json", is_flag=True, help="The whole description as JSON.")
@click.argument("name")
@click.argument("version", required=False)
def show_command(tracking_uri: str | None, as_json: bool, name: str, version: str | None) -> None:
    """Show model NAME: its versions, aliases, metric values and source runs; with VERSION, that version's model
    card (data, recipe, metrics with 95% intervals, lineage, intended use and limits)."""
    connect_tracking(tracking_uri)
    with _user_errors():
        info = describe_model(name)
        if version is not None:
            _show_version(info, version, as_json)
            return
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['name']}  ({len(info['versions'])} versions)  {info['description']}".rstrip())
    metrics = sorted({k for v in info["versions"] for k in v["metrics"]})
    rows = [
        [v["version"], ",".join(v["aliases"]) or "-"]
        + [f"{v['metrics'][k]:.4f}" if k in v["metrics"] else "-" for k in metrics]
        + [v["run_id"] or "-", v["created"] or "-"]
        for v in info["versions"]
    ]
    _table(rows, ["version", "aliases", *metrics, "run", "created"])
    decided = [v for v in info["versions"] if "promotion.decision" in v["tags"]]
    if decided:
        click.echo("\npromotion decisions (paired on the same evaluation images):")
        for v in decided:
            click.echo(f"  version {v['version']}: {v['tags']['promotion.decision']}: {v['tags']['promotion.reason']}")


def _show_version(info: dict[str, Any], version: str, as_json: bool) -> None:
    """One version: a line on where it stands, then its model card (or why there is none)."""
    found = next((v for v in info["versions"] if v["version"] == version), None)
    if found is None:
        raise RegistryError(f"model {info['name']!r} has no version {version}")
    card = model_card(info["name"], version)
    if as_json:
        click.echo(json.dumps({"name": info["name"], **found, "model_card": card}, indent=2))
        return
    aliases = ", ".join(found["aliases"]) or "no alias"
    click.echo(f"{info['name']} version {version}  ({aliases})  run {found['run_id'] or '-'}")
    if "promotion.decision" in found["tags"]:
        click.echo(f"promotion: {found['tags']['promotion.decision']}: {found['tags']['promotion.reason']}")
    click.echo("")
    if card is None:
        click.echo(
            f"no model card: the run of version {version} has no model_card.md (registered outside the pipeline, "
            "or before model cards)"
        )
        return
    click.echo(card.rstrip("\n"))


@registry.command(name="promote")
@tracking_uri_option
@click.option("--metric", default="eval/top1", show_default=True, help="Higher is better.")
@click.option("--force", is_flag=True, help="Promote even if not better.")
@click.argument("name")
@click.argument("version", required=False)
def promote_command(tracking_uri: str | None, metric: str, force: bool, name: str, version: str | None) -> None:
    """Make VERSION (default: the challenger) of model NAME the champion if it beats the current one on --metric.

    Exits 0 whether or not it was promoted (the decision is printed); 2 on errors.
    """
    connect_tracking(tracking_uri)
    with _user_errors():
        result = promote(name, version, metric=metric, force=force)
    verb = "promoted" if result.promoted else "kept"
    subject = f"version {result.version}" if result.promoted else f"version {result.previous_champion} as {CHAMPION}"
    click.echo(f"{verb} {subject}: {result.reason}")


@click.command(name="predict", context_settings={"help_option_names": ["-h", "--help"]})
@tracking_uri_option
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--top-k",
    default=DEFAULT_TOP_K,
    show_default=True,
    type=click.IntRange(min=1),
    help="The k best labels of each image, with their probabilities (in the table and in --json).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@click.argument("model_uri")
@click.argument("images", nargs=-1, required=True)
def predict(
    tracking_uri: str | None, batch_size: int, top_k: int, as_json: bool, model_uri: str, images: tuple[str, ...]
) -> None:
    """Classify IMAGES (files or directories of them) with MODEL_URI, e.g. models:/vit-digits@champion.

    Only models that this platform logged load: any other MLflow model (a pickled python_model above all) is refused
    before any of its code runs. The table shows, per image, the best label and its probability, then the other
    labels of the top k with theirs, as columns label2 p2, label3 p3, ...
    """
    files = image_files(images)
    if not files:
        fail("no images found")
    connect_tracking(tracking_uri)
    with _user_errors():
        results = predict_images(model_uri, files, batch_size=batch_size, top_k=top_k, progress=not as_json)
    if as_json:
        for row in results:
            click.echo(json.dumps(row))
        return
    _table(*_prediction_table(results))


def _prediction_table(results: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """Rows and header for ``vit predict``: image, label, probability, then ``label<r> p<r>`` for ranks 2..k."""
    ranks = max((len(r["top_labels"]) for r in results), default=1)
    header = ["image", "label", "probability"]
    for rank in range(2, ranks + 1):
        header += [f"label{rank}", f"p{rank}"]
    rows = []
    for r in results:
        row = [r["image"], r["label"], f"{r['probability']:.4f}"]
        for label, probability in zip(list(r["top_labels"])[1:], list(r["top_probabilities"])[1:]):
            row += [str(label), f"{probability:.4f}"]
        rows.append(row + ["-"] * (len(header) - len(row)))
    return rows, header
