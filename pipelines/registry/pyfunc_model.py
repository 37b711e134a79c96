"""The registered image classifier: a ViT checkpoint behind MLflow's pyfunc interface, logged as code.

``pipelines.registry.registry.log_vit_model`` logs this file with ``python_model=<its path>`` (MLflow's "models from
code"), so nothing is cloudpickled: loading runs this file again, in an environment that needs only mlflow, torch,
numpy, pillow, safetensors and the ``vit`` package (shipped with the model as a code path). It must therefore import
nothing from ``pipelines``. ``pipelines.registry.predict.load_pyfunc`` (and so ``vit predict``) recognises such a
model by its MLmodel file (models-from-code loader, ``model_code_path`` named after this file, no pickled
``python_model``): keep this file's name.

Artifacts: ``weights`` (a vit-platform safetensors checkpoint, which carries its config), ``classes`` (a JSON list of
class names) and ``preprocessing`` (JSON: ``image_size``, ``resize_size``, ``multi_label``).

Input: a DataFrame with a column ``image`` (or a plain list) whose entries are encoded image bytes, file paths,
base64 strings (how bytes arrive through ``mlflow models serve``), or uint8 pixel arrays (H, W) or (H, W, 3), also as
nested lists (how arrays arrive as JSON). Served by ``mlflow models serve``, the model refuses file paths.
Output: one row per image with ``label``, ``class_id``, ``probability``, ``top_labels`` and ``top_probabilities``.

Device: the GPU when torch sees one, else the CPU; ``VIT_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``) chooses instead.
Precision: fp32, the numbers `vit evaluate` scored; ``VIT_PRECISION=bf16`` runs the forward pass under bf16 autocast
(faster on a GPU; probabilities then move by up to about 1e-2).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    import torch

BATCH_SIZE = 64  # images decoded and run at once: bounds memory for large inputs
DEFAULT_TOP_K = 5  # only for direct calls: through pyfunc, the signature's default (the same) fills in params


class ImageInputError(ValueError):
    """An input row that is not an image we can decode; the message names the row."""


def _array_to_png(array: np.ndarray) -> bytes:
    """Pixels to lossless PNG bytes, so arrays take exactly the decode/resize path that encoded images take."""
    from PIL import Image

    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu" or array.size == 0 or array.min() < 0 or array.max() > 255:
            raise ValueError(f"pixel arrays must be uint8 (0-255), got dtype {array.dtype}")
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"pixel arrays must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _serving() -> bool:
    """Whether this process is ``mlflow models serve``'s scoring server (MLflow sets this variable in it; internal,
    but the only signal there is). A served model reads no file paths: a request could name any file on the host."""
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"


def _string_to_bytes(value: str) -> bytes:
    """A file path, a ``data:`` URI or base64 text to bytes; JSON cannot carry raw bytes, so serving sends base64."""
    serving = _serving()
    if value.startswith("data:") and ";base64," in value[:100]:
        value = value.split(",", 1)[1]
    elif not serving and os.path.isfile(value):
        with open(value, "rb") as f:
            return f.read()
    try:
        # Python's and MLflow's base64 encoders wrap lines every 76 characters; the newlines are not data.
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        if serving:
            raise ValueError(
                f"{value[:80]!r} is not base64-encoded image bytes (a served model reads no files)"
            ) from None
        raise ValueError(f"{value[:80]!r} is not an existing file or base64-encoded image bytes") from None


def image_bytes(value: Any) -> bytes:
    """One input entry (bytes, path, base64 text, pixel array or nested list) to encoded image bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _string_to_bytes(value)
    if isinstance(value, os.PathLike):
        with open(value, "rb") as f:
            return f.read()
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 1 and value.size and np.ndim(value[0]):
        value = np.stack(list(value))  # a JSON list of rows that pandas turned into an object array of arrays
    if isinstance(value, (np.ndarray, list)):
        return _array_to_png(np.asarray(value))
    raise ValueError(f"expected image bytes, a file path, base64 text or a uint8 array, got {type(value).__name__}")


def _column(model_input: Any) -> list[Any]:
    """The image entries of a DataFrame's ``image`` column (or its only column), a Series, a dict or a list."""
    if isinstance(model_input, pd.DataFrame):
        if "image" in model_input.columns:
            return model_input["image"].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise ValueError(f"expected a column 'image', got columns {list(model_input.columns)}")
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, dict) and "image" in model_input:
        images = model_input["image"]
        return list(images) if isinstance(images, (list, tuple)) else [images]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    if isinstance(model_input, np.ndarray) and model_input.dtype == object:
        return list(model_input)
    raise ValueError(
        f"expected a DataFrame with an 'image' column or a list of images, got {type(model_input).__name__}"
    )


def _inference_device() -> torch.device:
    """``VIT_DEVICE`` when set, else ``cuda`` when torch sees a GPU, else ``cpu``. A GPU asked for and absent is an
    error, not a silent CPU run: a served model would otherwise be slow with nothing saying why."""
    import torch

    wanted = os.environ.get("VIT_DEVICE", "").strip()
    if not wanted:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError as err:
        raise ValueError(f"VIT_DEVICE={wanted!r} is not a torch device (cpu, cuda, cuda:1): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"VIT_DEVICE={wanted!r}, but torch sees no CUDA device here")
    return device


def _inference_bf16() -> bool:
    """Whether the forward pass runs under bf16 autocast: ``VIT_PRECISION=bf16``; fp32 (the default) otherwise."""
    precision = os.environ.get("VIT_PRECISION", "fp32").strip().lower() or "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"VIT_PRECISION={precision!r}: expected fp32 or bf16")
    return precision == "bf16"


class ViTClassifier(PythonModel):
    """Softmax (or, for multi-label models, sigmoid) scores of a ViT over the classes, with eval preprocessing."""

    def load_context(self, context: Any) -> None:
        import torch

        from vit import load_model
        from vit.data import build_transform

        with open(context.artifacts["classes"]) as f:
            self.classes: list[str] = json.load(f)
        with open(context.artifacts["preprocessing"]) as f:
            prep = json.load(f)
        self.multi_label = bool(prep.get("multi_label", False))
        # The evaluation recipe, so a served prediction sees exactly the pixels that `vit evaluate` saw.
        self.transform = build_transform("eval", int(prep["image_size"]), prep.get("resize_size"))
        self.device = _inference_device()
        self.bf16 = _inference_bf16()
        self.model = load_model(context.artifacts["weights"], device=self.device).eval()
        num_classes = self.model.config.num_classes
        if num_classes != len(self.classes):
            raise ValueError(f"the weights have {num_classes} outputs but {len(self.classes)} class names were logged")
        self.torch = torch

    def _pixels(self, images: list[Any], offset: int) -> Any:
        """Decode and transform one batch to uint8 (B, 3, S, S); errors name the row (counted over the whole input)."""
        tensors = []
        for i, value in enumerate(images):
            try:
                tensors.append(self.transform(image_bytes(value)))
            except (ValueError, OSError) as err:
                raise ImageInputError(f"row {offset + i}: {err}") from err
        return self.torch.stack(tensors)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        # Annotated as a DataFrame (what schema enforcement hands over): MLflow infers no schema from that hint, so
        # the signature logged with the model, which lets bytes, paths and arrays through, is the one that applies.
        from vit.data import normalize

        torch = self.torch
        images = _column(model_input)
        top_k = max(1, min(int((params or {}).get("top_k", DEFAULT_TOP_K)), len(self.classes)))
        top_probs, top_ids = [], []
        for start in range(0, len(images), BATCH_SIZE):
            batch = self._pixels(images[start : start + BATCH_SIZE], start)
            # uint8 pixels cross to the GPU (a quarter of the bytes of floats) and are normalised there.
            pixels = batch.to(self.device, non_blocking=True)
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
            with torch.inference_mode(), autocast:
                logits = self.model(normalize(pixels)).float().cpu()  # (B, K)
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            p, i = probs.topk(top_k, dim=-1)  # (B, k), best first
            top_probs += p.tolist()
            top_ids += i.tolist()
        columns = {
            "label": [self.classes[ids[0]] for ids in top_ids],
            "class_id": [ids[0] for ids in top_ids],
            "probability": [p[0] for p in top_probs],
            "top_labels": [[self.classes[i] for i in ids] for ids in top_ids],
            "top_probabilities": top_probs,
        }
        return pd.DataFrame(columns)


mlflow.models.set_model(ViTClassifier())
