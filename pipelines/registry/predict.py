"""Load a model that ``log_vit_model`` logged, and classify images with it.

    predict_images("models:/vit-digits@champion", ["cat.jpg"])  # one dict per image
    load_pyfunc("models:/vit-digits@champion")                   # the pyfunc model itself

``load_pyfunc`` (which ``predict_images`` and ``vit predict`` use) loads nothing else: it reads the model's MLmodel
file first and refuses any pyfunc that is not such a model, above all a cloudpickled ``python_model``, whose
unpickling alone could run arbitrary code.

mlflow, pandas and tqdm are imported inside functions so that ``vit --help`` stays fast.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from pipelines.registry.registry import (
    CODE_MODEL_LOADER,
    DEFAULT_TOP_K,
    MODEL_ARTIFACTS,
    PYFUNC_MODEL_FILE,
    RegistryError,
)


class ForeignModelError(RegistryError):
    """A model of another kind than ``log_vit_model`` logs (a pickled python_model, say): refused before loading."""


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
