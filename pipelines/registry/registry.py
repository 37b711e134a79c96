"""Log a ViT as an MLflow pyfunc image classifier, register it, promote it by a metric, predict with it.

    with mlflow.start_run() as run:
        ...                                                      # train, evaluate, log eval/top1
        log_vit_model("model.safetensors", classes, image_size=224)
    register_model(run.info.run_id, "vit-digits")                # new version, alias "challenger"
    promote("vit-digits")                                        # alias "champion", if better on eval/top1
    predict_images("models:/vit-digits@champion", ["cat.jpg"])  # one dict per image
    load_pyfunc("models:/vit-digits@champion")                   # the pyfunc model itself

The model is logged as code (``pipelines/registry/pyfunc_model.py``) with the ``vit`` package as a code path, so it
loads wherever torch, numpy, pillow and safetensors are installed, without this repository or any pickled class.
``load_pyfunc`` (which ``predict_images`` and ``vit predict`` use) loads nothing else: it reads the model's MLmodel
file first and refuses any pyfunc that is not such a model, above all a cloudpickled ``python_model``, whose
unpickling alone could run arbitrary code.

The click commands (``vit registry list|show|promote`` and ``vit predict``) wrap these functions. mlflow, torch and
pandas are imported inside functions so that ``vit --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"  # the loader MLflow records for models from code
MODEL_ARTIFACTS = ("weights", "classes", "preprocessing")  # what pyfunc_model.py's load_context reads
# A marker in the MLmodel metadata, the model layout's version. It names the model for people and tools; it proves
# nothing (anyone can write it), so `check_platform_model` goes by the structure of the MLmodel file instead.
PLATFORM_MARKER = "vit_platform"
PLATFORM_FORMAT = "1"
CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG_PREFIX = "metric."  # version tags holding metric values copied from the run at registration
DEFAULT_TOP_K = 5  # the signature's default for the ``top_k`` inference parameter
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class RegistryError(Exception):
    """A user-facing registry error: unknown model, version, alias or metric. Its message is the whole story."""


class ForeignModelError(RegistryError):
    """A model of another kind than ``log_vit_model`` logs (a pickled python_model, say): refused before loading."""


# --- logging --------------------------------------------------------------------------------------------------------


def _signature() -> Any:
    """Input: one ``image`` column of AnyType, the only column type that lets bytes, paths (str) and pixel arrays
    all pass schema enforcement unchanged (``binary`` would refuse paths and arrays). Output: label and scores."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(AnyType(), "image")])
    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("long", "class_id"),
            ColSpec("double", "probability"),
            ColSpec(Array("string"), "top_labels"),
            ColSpec(Array("double"), "top_probabilities"),
        ]
    )
    return ModelSignature(inputs, outputs, params=ParamSchema([ParamSpec("top_k", "long", DEFAULT_TOP_K)]))


def _example_png(size: int) -> bytes:
    """A small real PNG (a smooth colour gradient) for the logged input example, when the caller has no image."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _weights_num_classes(path: str) -> int | None:
    """The class count stored in a vit-platform safetensors checkpoint's config, read from its header only."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
    except Exception:  # not safetensors, or no config: load_model will say so when the model loads
        return None
    return config.get("num_classes")


def _pip_requirements() -> list[str]:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return [f"torch=={major}.{minor}.*", "numpy", "pillow", "safetensors"]


def log_vit_model(
    weights_path: str | os.PathLike,
    classes: Sequence[str],
    *,
    image_size: int,
    resize_size: int | None = None,
    multi_label: bool = False,
    name: str = "model",
    example_image: bytes | None = None,
) -> ModelInfo:
    """Log a pyfunc image classifier for a vit-platform checkpoint under the active MLflow run.

    ``image_size`` and ``resize_size`` are those of evaluation (the ``eval`` recipe: resize, central crop), so
    predictions see the same pixels the reported metrics saw. ``multi_label`` models score with a sigmoid, others
    with a softmax. ``example_image`` (encoded bytes) becomes the logged input example; a generated PNG otherwise.
    """
    import mlflow
    import pandas as pd

    import vit

    if mlflow.active_run() is None:
        raise RuntimeError("log_vit_model logs into the active run: call it inside mlflow.start_run()")
    weights_path = os.fspath(weights_path)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"no weights at {weights_path}")
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("classes is empty")
    num_classes = _weights_num_classes(weights_path)
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"{weights_path} has {num_classes} outputs but {len(classes)} class names were given")

    with tempfile.TemporaryDirectory(prefix="vit-pyfunc-") as tmp:
        tmp = Path(tmp)
        (tmp / "classes.json").write_text(json.dumps(classes))
        prep = {"image_size": image_size, "resize_size": resize_size, "multi_label": multi_label}
        (tmp / "preprocessing.json").write_text(json.dumps(prep))
        # A clean copy of the package: the model carries the code it was evaluated with, and no bytecode caches.
        package = Path(vit.__file__).parent
        shutil.copytree(package, tmp / "vit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        example = example_image if example_image is not None else _example_png(image_size)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_MODEL_FILE),
            artifacts={
                "weights": weights_path,
                "classes": str(tmp / "classes.json"),
                "preprocessing": str(tmp / "preprocessing.json"),
            },
            code_paths=[str(tmp / "vit")],
            signature=_signature(),
            input_example=pd.DataFrame({"image": [example]}),
            pip_requirements=_pip_requirements(),
            metadata={PLATFORM_MARKER: PLATFORM_FORMAT},
        )


# --- loading --------------------------------------------------------------------------------------------------------


def _foreign(model_uri: str, reason: str) -> ForeignModelError:
    return ForeignModelError(
        f"{model_uri} is not a model of this platform ({reason}); load it with mlflow directly if you trust it"
    )


def check_platform_model(model_uri: str, mlmodel: Any) -> None:
    """Raise ``ForeignModelError`` unless the MLmodel (an ``mlflow.models.Model``) is one that ``log_vit_model`` logs.

    What decides is what ``mlflow.pyfunc.load_model`` would do with it: load a model from code (the loader
    ``mlflow.pyfunc.loaders.code_model`` running the file ``model_code_path`` names, which must be our
    ``pyfunc_model.py``), with our artifacts, and no cloudpickled ``python_model``. A pickle, a flavor's own loader
    (sklearn, pytorch, ... mostly unpickle too) or someone else's code file is refused. The metadata marker is not
    trusted: a hostile model can carry it. This checks the kind of model, not its contents: a model from code runs
    the ``pyfunc_model.py`` and ``vit/`` it carries, so load only models from a registry you trust.
    """
    import os

    flavor = (mlmodel.flavors or {}).get("python_function")
    if not isinstance(flavor, dict):
        raise _foreign(model_uri, "it has no python_function flavor")
    loader = flavor.get("loader_module")
    code_file = flavor.get("model_code_path")
    if "python_model" in flavor or (loader == "mlflow.pyfunc.model" and not code_file):
        raise _foreign(model_uri, "its pyfunc is a pickled python_model: loading it would run arbitrary code")
    if loader != CODE_MODEL_LOADER:
        raise _foreign(model_uri, f"its pyfunc is loaded by {loader!r}, which may unpickle or run arbitrary code")
    # MLflow runs the model directory's file of this base name (os.path.basename, as in mlflow.pyfunc.model).
    name = os.path.basename(code_file) if isinstance(code_file, str) else None
    if name != PYFUNC_MODEL_FILE.name:
        raise _foreign(model_uri, f"its pyfunc is the code file {name!r}, not this platform's {PYFUNC_MODEL_FILE.name}")
    if "data" in flavor:  # would make MLflow look for the code file in another directory
        raise _foreign(model_uri, f"its pyfunc has a data directory {flavor['data']!r}")
    missing = [a for a in MODEL_ARTIFACTS if a not in (flavor.get("artifacts") or {})]
    if missing:
        raise _foreign(model_uri, f"it has no artifact {', '.join(missing)}")


def load_pyfunc(model_uri: str, *, dst_path: str | None = None) -> Any:
    """Load a model that ``log_vit_model`` logged, as ``mlflow.pyfunc.load_model`` does, refusing any other model.

    The MLmodel file alone is fetched and checked first (``check_platform_model``), so a refused model is neither
    downloaded nor run. The check is repeated on the downloaded copy, which is what loads: an alias moved or a file
    replaced in between cannot slip a model of another kind in. ``dst_path``: where to download (MLflow's default: a
    temporary directory for remote stores, the store's own directory for local ones).
    """
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model

    check_platform_model(model_uri, Model.load(model_uri))
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path)
    check_platform_model(model_uri, Model.load(local))
    return mlflow.pyfunc.load_model(local)


# --- registry -------------------------------------------------------------------------------------------------------


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _quoted(value: str, what: str) -> str:
    """A value for an MLflow filter string; filter strings cannot escape a single quote, so one is refused."""
    if "'" in value:
        raise RegistryError(f"{what} {value!r} contains a single quote")
    return f"'{value}'"


def _not_found(err: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _logged_model_id(client: Any, run: Any, artifact_name: str) -> str:
    """The id of the model named ``artifact_name`` that the run logged (MLflow 3 keeps models apart from run
    artifacts); the one logged at the latest step if there are several."""
    outputs = sorted(run.outputs.model_outputs if run.outputs else [], key=lambda o: o.step, reverse=True)
    for output in outputs:
        if client.get_logged_model(output.model_id).name == artifact_name:
            return output.model_id
    raise RegistryError(f"run {run.info.run_id} has no logged model named {artifact_name!r}")


def register_model(
    run_id: str, model_name: str, *, artifact_name: str = "model", metric: str = "eval/top1"
) -> ModelVersion:
    """Register the model ``artifact_name`` of run ``run_id`` as a new version of ``model_name``, alias ``challenger``.

    Idempotent: if that run's model is already a version of ``model_name``, that version is returned unchanged, so a
    retried pipeline step never piles up duplicate versions. The run's ``metric`` is copied into the version tag
    ``metric.<metric>``: promotion compares versions without fetching runs, and the value survives run deletion.
    """
    client = _client()
    try:
        run = client.get_run(run_id)
    except Exception as err:
        if _not_found(err):
            raise RegistryError(f"no run {run_id!r}") from None
        raise
    model_id = _logged_model_id(client, run, artifact_name)
    query = f"name={_quoted(model_name, 'model name')} and run_id={_quoted(run_id, 'run id')}"
    # Matched on the source URI: the REST API does not return a version's model_id (MLflow 3.17).
    existing = [v for v in client.search_model_versions(query) if v.source == f"models:/{model_id}"]
    if existing:
        return min(existing, key=lambda v: int(v.version))

    try:
        client.create_registered_model(model_name)
    except Exception as err:
        if getattr(err, "error_code", None) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    value = run.data.metrics.get(metric)
    tags = {METRIC_TAG_PREFIX + metric: repr(float(value))} if value is not None else {}
    try:
        experiment = client.get_experiment(run.info.experiment_id).name
    except Exception:
        experiment = run.info.experiment_id
    shown = f"{metric}={value:.6g}" if value is not None else f"no {metric} logged"
    description = (
        f"Model '{artifact_name}' ({model_id}) of run {run.info.run_name or run_id} ({run_id}) "
        f"in experiment '{experiment}'; {shown} at registration."
    )
    version = client.create_model_version(
        model_name, f"models:/{model_id}", run_id=run_id, tags=tags, description=description, model_id=model_id
    )
    client.set_registered_model_alias(model_name, CHALLENGER, version.version)
    return client.get_model_version(model_name, version.version)


def _registered(client: Any, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except Exception as err:
        if _not_found(err):
            raise RegistryError(f"no registered model {name!r}") from None
        raise


def _version(client: Any, name: str, version: str | int) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except Exception as err:
        if _not_found(err):
            raise RegistryError(f"model {name!r} has no version {version}") from None
        raise


def _by_alias(client: Any, model: Any, alias: str) -> ModelVersion | None:
    """The version an alias points at, or None; read from the model's alias map, since stores disagree on the error
    code of a missing alias."""
    version = (model.aliases or {}).get(alias)
    return None if version is None else _version(client, model.name, version)


def metric_value(version: ModelVersion, metric: str) -> float | None:
    """A version's ``metric``: the value copied at registration, else the source run's (if it still exists)."""
    tagged = version.tags.get(METRIC_TAG_PREFIX + metric)
    if tagged is not None:
        return float(tagged)
    if version.run_id:
        try:
            return _client().get_run(version.run_id).data.metrics.get(metric)
        except Exception:
            return None
    return None


@dataclasses.dataclass(frozen=True)
class Promotion:
    """What ``promote`` decided, and why."""

    promoted: bool
    version: str  # the candidate
    previous_champion: str | None  # the champion before the call
    candidate_value: float | None
    champion_value: float | None
    reason: str


def promote(
    model_name: str,
    version: str | int | None = None,
    *,
    metric: str = "eval/top1",
    force: bool = False,
    greater_is_better: bool = True,
) -> Promotion:
    """Point alias ``champion`` at ``version`` (default: the ``challenger``) if it beats the current champion.

    "Beats" means strictly better on ``metric`` (higher, unless ``greater_is_better=False``): a tie keeps the champion,
    so serving never switches models for no gain. No champion yet: the candidate becomes one. ``force=True``
    promotes regardless (a rollback, or a metric that changed meaning).
    """
    client = _client()
    model = _registered(client, model_name)
    if version is None:
        candidate = _by_alias(client, model, CHALLENGER)
        if candidate is None:
            raise RegistryError(f"model {model_name!r} has no {CHALLENGER!r} alias; name a version")
    else:
        candidate = _version(client, model_name, version)
    champion = _by_alias(client, model, CHAMPION)
    previous = champion.version if champion is not None else None
    candidate_value = metric_value(candidate, metric)
    champion_value = metric_value(champion, metric) if champion is not None else None

    def result(promoted: bool, reason: str) -> Promotion:
        return Promotion(promoted, candidate.version, previous, candidate_value, champion_value, reason)

    if previous == candidate.version:
        return result(False, f"version {candidate.version} is already the {CHAMPION}")
    if candidate_value is None and not force:
        raise RegistryError(
            f"version {candidate.version} of {model_name!r} has no {metric!r} (neither a version tag nor a run metric)"
        )
    if force:
        reason = "forced"
    elif champion is None:
        reason = f"no {CHAMPION} yet"
    elif champion_value is None:
        return result(False, f"the {CHAMPION} (version {previous}) has no {metric!r} to compare with; use force")
    else:
        better = candidate_value > champion_value if greater_is_better else candidate_value < champion_value
        comparison = f"{metric} {candidate_value:.6g} vs {champion_value:.6g} (version {previous})"
        if not better:
            return result(False, f"not better: {comparison}")
        reason = f"better: {comparison}"
    client.set_registered_model_alias(model_name, CHAMPION, candidate.version)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    client.set_model_version_tag(model_name, candidate.version, "promoted_at", stamp)
    return result(True, reason)


def _time(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")


def _aliases_by_version(model: Any) -> dict[str, list[str]]:
    """``{version: [alias, ...]}`` from a registered model's ``aliases`` (``{alias: version}``)."""
    out: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


def list_models() -> list[dict[str, Any]]:
    """Every registered model as plain data: name, description, aliases, latest version, times."""
    client = _client()
    found, token = [], None
    while True:  # results come in pages
        page = client.search_registered_models(max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    models = []
    for model in found:
        latest = max((int(v.version) for v in model.latest_versions or []), default=None)
        models.append(
            {
                "name": model.name,
                "description": model.description or "",
                "aliases": {alias: str(v) for alias, v in (model.aliases or {}).items()},
                "latest_version": str(latest) if latest is not None else None,
                "created": _time(model.creation_timestamp),
                "updated": _time(model.last_updated_timestamp),
            }
        )
    return sorted(models, key=lambda m: m["name"])


def describe_model(name: str) -> dict[str, Any]:
    """One registered model and all its versions (newest first) as plain data, metric values included."""
    client = _client()
    model = _registered(client, name)
    aliases = _aliases_by_version(model)
    versions = []
    for v in client.search_model_versions(f"name={_quoted(name, 'model name')}"):
        versions.append(
            {
                "version": v.version,
                "aliases": sorted(aliases.get(str(v.version), [])),
                "metrics": {
                    k.removeprefix(METRIC_TAG_PREFIX): float(x)
                    for k, x in v.tags.items()
                    if k.startswith(METRIC_TAG_PREFIX)
                },
                "run_id": v.run_id,
                "source": v.source,
                "status": v.status,
                "created": _time(v.creation_timestamp),
                "description": v.description or "",
                "tags": {k: x for k, x in v.tags.items() if not k.startswith(METRIC_TAG_PREFIX)},
            }
        )
    versions.sort(key=lambda v: int(v["version"]), reverse=True)
    return {
        "name": model.name,
        "description": model.description or "",
        "aliases": {alias: str(v) for alias, v in (model.aliases or {}).items()},
        "created": _time(model.creation_timestamp),
        "updated": _time(model.last_updated_timestamp),
        "versions": versions,
    }


# --- prediction -----------------------------------------------------------------------------------------------------


def _input_name(value: Any, index: int) -> str:
    return os.fspath(value) if isinstance(value, (str, os.PathLike)) else f"#{index}"


def _object_column(values: Sequence[Any]) -> Any:
    """A 1-d object array of the inputs: pandas would try to stack same-shaped pixel arrays into one 2-d block."""
    import numpy as np

    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return column


def predict_images(
    model_uri: str,
    images: Sequence[Any],
    *,
    batch_size: int = 64,
    top_k: int = DEFAULT_TOP_K,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Classify images (encoded bytes, file paths or uint8 arrays) with a logged or registered model.

    Returns one dict per image: ``image`` (the path, or ``#i`` for in-memory input), ``label``, ``class_id``,
    ``probability``, ``top_labels``, ``top_probabilities``. A ``ValueError`` names the image that failed to decode.
    Only models that ``log_vit_model`` logged load (``load_pyfunc``); others raise ``ForeignModelError``.
    """
    import pandas as pd
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model = load_pyfunc(model_uri)
    images = list(images)
    names = [_input_name(x, i) for i, x in enumerate(images)]
    results: list[dict[str, Any]] = []
    with tqdm(total=len(images), unit="img", file=sys.stderr, disable=not progress, desc="predict") as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            frame = pd.DataFrame({"image": _object_column(chunk)})
            try:
                out = model.predict(frame, params={"top_k": top_k})
            except ValueError as err:
                # The model numbers rows within the batch; name the input instead.
                match = re.match(r"row (\d+): (.*)", str(err), re.DOTALL)
                if match is None:
                    raise
                raise ValueError(f"{names[start + int(match[1])]}: {match[2]}") from err
            for name, row in zip(names[start:], out.to_dict(orient="records")):
                results.append({"image": name, **row})
            bar.update(len(chunk))
    return results


# --- command line ---------------------------------------------------------------------------------------------------


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


tracking_uri_option = click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    default=None,
    show_envvar=True,
    help="MLflow tracking server [MLflow's default].",
)


def _connect(tracking_uri: str | None) -> None:
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
        _fail(
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
            _fail(f"cannot reach the MLflow server at {uri}: {getattr(err, 'reason', err)}")


def _user_errors() -> tuple[type[Exception], ...]:
    from mlflow.exceptions import MlflowException

    return (RegistryError, MlflowException, ValueError, OSError)


def _message(err: Exception) -> str:
    return getattr(err, "message", None) or str(err)


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
    _connect(tracking_uri)
    try:
        models = list_models()
    except _user_errors() as err:
        _fail(_message(err))
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
def show_command(tracking_uri: str | None, as_json: bool, name: str) -> None:
    """Show model NAME: its versions, aliases, metric values and source runs."""
    _connect(tracking_uri)
    try:
        info = describe_model(name)
    except _user_errors() as err:
        _fail(_message(err))
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
    _connect(tracking_uri)
    try:
        result = promote(name, version, metric=metric, force=force)
    except _user_errors() as err:
        _fail(_message(err))
    verb = "promoted" if result.promoted else "kept"
    subject = f"version {result.version}" if result.promoted else f"version {result.previous_champion} as {CHAMPION}"
    click.echo(f"{verb} {subject}: {result.reason}")


def _expand(paths: Sequence[str]) -> list[str]:
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
            _fail(f"no such file: {path}")
    return files


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
    files = _expand(images)
    if not files:
        _fail("no images found")
    _connect(tracking_uri)
    try:
        results = predict_images(model_uri, files, batch_size=batch_size, top_k=top_k, progress=not as_json)
    except _user_errors() as err:
        _fail(_message(err))
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
