"""Log a ViT as an MLflow pyfunc image classifier, register it, promote it by a metric, list and describe it.

    with mlflow.start_run() as run:
        ...                                                      # train, evaluate, log eval/top1
        log_vit_model("model.safetensors", classes, image_size=224)
    register_model(run.info.run_id, "vit-digits")                # new version, alias "challenger"
    promote("vit-digits")                                        # alias "champion", if better on eval/top1
    list_models(); describe_model("vit-digits")                  # plain data, for people and scripts

The model is logged as code (``pipelines/registry/pyfunc_model.py``) with the ``vit`` package as a code path, so it
loads wherever torch, numpy, pillow and safetensors are installed, without this repository or any pickled class.
``pipelines.registry.predict`` loads such a model, and no other kind, to predict with it.

The ``vit registry list|show|promote`` commands (``pipelines.cli.registry``) wrap these functions. mlflow, torch and
pandas are imported inside functions so that ``vit --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

    from pipelines.evaluation.compare import Comparison

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"  # the loader MLflow records for models from code
MODEL_ARTIFACTS = ("weights", "classes", "preprocessing")  # what pyfunc_model.py's load_context reads
# A marker in the MLmodel metadata, the model layout's version. It names the model for people and tools; it proves
# nothing (anyone can write it), so `predict.check_platform_model` goes by the structure of the MLmodel file instead.
PLATFORM_MARKER = "vit_platform"
PLATFORM_FORMAT = "1"
CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG_PREFIX = "metric."  # version tags holding metric values copied from the run at registration
DEFAULT_TOP_K = 5  # the signature's default for the ``top_k`` inference parameter


class RegistryError(Exception):
    """A user-facing registry error: unknown model, version, alias or metric. Its message is the whole story."""


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
    evidence: dict | None = None  # the paired comparison that decided, when one did (``Comparison.as_dict()``)


def promote(
    model_name: str,
    version: str | int | None = None,
    *,
    metric: str = "eval/top1",
    force: bool = False,
    greater_is_better: bool = True,
    evidence: Comparison | None = None,
) -> Promotion:
    """Point alias ``champion`` at ``version`` (default: the ``challenger``) if it beats the current champion.

    "Beats" means strictly better on ``metric`` (higher, unless ``greater_is_better=False``): a tie keeps the champion,
    so serving never switches models for no gain. With ``evidence`` (a paired comparison of the two on the same
    images, ``pipelines.evaluation.compare``), it means better by more than that comparison's confidence margin,
    and the decision, both scores, the margin and the reason are written on the candidate version (tags
    ``promotion.*`` and its description). No champion yet: the candidate becomes one. ``force=True`` promotes
    regardless (a rollback, or a metric that changed meaning).
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
        decided = Promotion(
            promoted,
            candidate.version,
            previous,
            candidate_value,
            champion_value,
            reason,
            evidence.as_dict() if evidence is not None else None,
        )
        if evidence is not None:
            _record_decision(client, model_name, decided)
        return decided

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
    elif evidence is not None:
        if not evidence.better:
            return result(False, f"{evidence.reason()}; version {previous} stays {CHAMPION}")
        reason = f"{evidence.reason()}; replaces version {previous}"
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


def champion_weights(model_name: str, dst: str | os.PathLike) -> tuple[str, Path, dict] | None:
    """The current champion's version, its weights file and its preprocessing (``image_size``, ``resize_size``),
    downloaded into ``dst``: what re-scoring it next to a challenger needs. None when there is no champion. A
    model this platform did not log is refused before anything of it is read (``predict.check_platform_model``)."""
    import mlflow
    from mlflow.models import Model

    from pipelines.registry.predict import check_platform_model

    client = _client()
    champion = _by_alias(client, _registered(client, model_name), CHAMPION)
    if champion is None:
        return None
    uri = f"models:/{model_name}/{champion.version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=os.fspath(dst)))
    mlmodel = Model.load(str(local / "MLmodel"))
    check_platform_model(uri, mlmodel)
    artifacts = mlmodel.flavors["python_function"]["artifacts"]
    weights = local / artifacts["weights"]["path"]
    preprocessing = json.loads((local / artifacts["preprocessing"]["path"]).read_text())
    return str(champion.version), weights, preprocessing


def _record_decision(client: Any, model_name: str, decided: Promotion) -> None:
    """The decision on the candidate version itself: ``vit registry show`` and the MLflow UI explain it."""
    evidence = decided.evidence or {}
    tags = {
        "promotion.decision": "promoted" if decided.promoted else "not promoted",
        "promotion.reason": decided.reason[:5000],
        "promotion.champion_version": decided.previous_champion or "",
    }
    for key in ("champion", "challenger", "gain", "lower", "margin", "confidence", "min_improvement", "images"):
        if key in evidence:
            tags[f"promotion.{key}"] = repr(evidence[key])
    for key, value in tags.items():
        client.set_model_version_tag(model_name, decided.version, key, value)
    version = client.get_model_version(model_name, decided.version)
    summary = f"Promotion: {tags['promotion.decision']}: {decided.reason}"
    description = (version.description or "").split("\n\nPromotion: ")[0]
    client.update_model_version(model_name, decided.version, description=f"{description}\n\n{summary}".strip())


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


def model_card(name: str, version: str | int) -> str | None:
    """The ``model_card.md`` the pipeline logged on the run of version ``version`` of ``name``; None when that run
    has none (a version registered by hand, or before cards) or is gone."""
    import mlflow

    from pipelines.registry.model_card import CARD_FILE

    client = _client()
    found = _version(client, name, version)
    if not found.run_id:
        return None
    try:
        if CARD_FILE not in {a.path for a in client.list_artifacts(found.run_id)}:
            return None
    except Exception as err:
        if _not_found(err):  # the run was deleted: its version outlives it
            return None
        raise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar for one small file is noise
    with tempfile.TemporaryDirectory(prefix="vit-card-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=found.run_id, artifact_path=CARD_FILE, dst_path=tmp)
        return Path(path).read_text()


def describe_model(name: str) -> dict[str, Any]:
    """One registered model and all its versions (newest first) as plain data, metric values included."""
    client = _client()
    model = _registered(client, name)
    aliases = _aliases_by_version(model)
    versions = []
    for v in client.search_model_versions(f"name={_quoted(name, 'model name')}"):
        versions.append(
            {
                "version": str(v.version),  # a string from a server, an int from a local sqlite store
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
