"""What several commands share: the MLflow tracking server option and a connection that fails fast, and image
arguments (files, or folders of them)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import click

from pipelines.cli.errors import fail

# The files of a directory given as images (`vit predict`, `vit inspect`) that are read.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


tracking_uri_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    show_envvar=True,
    help="MLflow tracking server [./mlflow.db, the pipeline's default store].",
)


def connect_tracking(tracking_uri: str | None) -> None:
    """Point MLflow at the server, failing fast when it is down: MLflow's own retries take minutes to give up."""
    import urllib.error
    import urllib.request

    import mlflow

    from pipelines.tracking.tracking import TrackingConfig
    from pipelines.tracking.tracking import tracking_uri as resolve

    uri = resolve(TrackingConfig(uri=tracking_uri or ""))  # the same default as the pipeline's: ./mlflow.db
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would create an empty store here and report "no models": say where none was found instead.
        fail(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: run this where `vit run` ran, or point "
            "--tracking-uri (MLFLOW_TRACKING_URI) at the store or server `vit run` printed"
        )
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (perhaps asking for credentials): reachable
        except (urllib.error.URLError, OSError) as err:
            fail(f"cannot reach the MLflow server at {uri}: {getattr(err, 'reason', err)}")


def image_files(paths: Sequence[str]) -> list[str]:
    """Files as given; directories to their image files (sorted, not recursive)."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(
                str(p) for p in sorted(Path(path).iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        elif os.path.isfile(path):
            files.append(path)
        else:
            fail(f"no such file: {path}")
    return files
