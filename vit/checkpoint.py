"""Save and load ViT weights: our own format and the released ones.

Formats read (detected from the keys, not the file name; layouts and conversions in :mod:`vit.formats`):

* ``vit``   -- ours: ``save_checkpoint`` output (``.safetensors`` or ``.pt``), config included.
* ``timm``  -- timm ``VisionTransformer`` state dicts (``.pth``, ``.bin``, ``.safetensors``). Our
  module names are timm's, so only hybrids (``patch_embed.backbone.*``) are renamed.
* ``npz``   -- the original JAX release (google-research/vision_transformer and big_vision):
  ``Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel``, ``pre_logits/kernel``.
* ``hf``    -- Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (a file or a
  ``save_pretrained`` folder, sharded or not).

Loading adapts what fine-tuning needs: the classifier is dropped and re-initialised when the class
count differs, the pre-logits layer is dropped when the model has none (the paper's fine-tuning),
and position embeddings are resampled when the patch grid differs. Anything else that does not fit
raises :class:`CheckpointMismatchError` naming the missing, unexpected and mis-shaped keys.

Nothing here unpickles arbitrary objects: ``torch.load(weights_only=True)``,
``np.load(allow_pickle=False)`` and safetensors only. A file never makes us allocate more than it
holds: tensors larger than their storage (expanded views) are refused, and :func:`load_model`
checks the config against the tensors in the file before it builds anything (:mod:`vit.safe_read`).

:func:`load_model` builds the model of a file of any format: ours carry their config, and for the
released formats :func:`infer_model_config` reads it off the tensors (the head count from ``.npz``
query kernels, else from the named size of that width; :mod:`vit.infer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vit.formats import FORMAT_NAME, FORMAT_VERSION, StateDict, convert, detect_format, to_hf_state_dict
from vit.infer import UnknownVariantError, config_fields, configure, describe
from vit.model import VisionTransformer, ViTConfig
from vit.posemb import ResampleMethod, infer_grid, resample_pos_embed
from vit.safe_read import CheckpointMismatchError, UnsafeCheckpointError, read_weights

# The errors, the format marker, detect_format and to_hf_state_dict live beside the code that uses them
# and are re-exported here, where they have always been imported from.
__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointContents",
    "CheckpointMismatchError",
    "LoadReport",
    "UnknownVariantError",
    "UnsafeCheckpointError",
    "detect_format",
    "infer_model_config",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "save_state_dict",
    "to_hf_state_dict",
]


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did, for logs and tests."""

    format: str
    resampled_pos_embed: tuple[tuple[int, int], tuple[int, int]] | None = None  # (old grid, new grid)
    reinitialized_head: bool = False
    dropped: list[str] = field(default_factory=list)  # checkpoint keys deliberately not loaded
    missing: list[str] = field(default_factory=list)  # only with strict=False
    unexpected: list[str] = field(default_factory=list)  # only with strict=False
    config: dict | None = None  # the saved ViTConfig (our format only)


@dataclass(frozen=True)
class CheckpointContents:
    """What :func:`read_checkpoint` found: the tensors under the file's own names, its metadata and its format."""

    tensors: dict[str, Any]  # torch tensors, or numpy arrays for .npz
    metadata: dict
    format: str  # 'vit', 'timm', 'npz' or 'hf' (see detect_format)

    @property
    def num_classes(self) -> int:
        """The classifier's output count, off ``head`` (ours, timm), ``classifier`` (Hugging Face) or
        ``head/kernel`` (.npz); 0 without one."""
        for key in ("head.weight", "classifier.weight"):
            if key in self.tensors:
                return int(self.tensors[key].shape[0])
        for key in ("head/kernel", "img/head/kernel", "params/head/kernel"):  # JAX kernels are (in, out)
            if key in self.tensors:
                return int(self.tensors[key].shape[-1])
        return 0


def read_checkpoint(src: str | os.PathLike | BinaryIO | Mapping[str, Any]) -> CheckpointContents:
    """Read the weights in ``src`` (a file of any supported format, a ``save_pretrained`` folder, a file object or a
    state dict) without building a model: to look at them first, e.g. to size a model for them.

    Nothing is converted: ``tensors`` keep the file's names and can be handed to :func:`load_checkpoint` as they are,
    so a file is read once. Training checkpoints are unwrapped to their state dict, and DDP or ``torch.compile``
    prefixes dropped, as in :func:`load_checkpoint`. Raises ``FileNotFoundError`` when there are no weights at
    ``src``, and ``ValueError`` for weights it cannot read or recognise (:class:`UnsafeCheckpointError`, a
    ``ValueError``, for a file that loading would have to run as code).
    """
    tensors, metadata = read_weights(src)
    return CheckpointContents(tensors=tensors, metadata=metadata, format=detect_format(tensors, metadata))


# ---------------------------------------------------------------------------- loading


def load_checkpoint(
    model: VisionTransformer,
    src: str | os.PathLike | BinaryIO | Mapping[str, Any],
    *,
    strict: bool = True,
    pos_embed_method: ResampleMethod = "bilinear",
) -> LoadReport:
    """Load weights of any supported format into ``model``, adapting head and position embeddings.

    With ``strict=True`` (the default) nothing is loaded unless every model tensor is accounted
    for; the error names the missing, unexpected and mis-shaped keys. A model on the meta device
    gets the checkpoint's tensors assigned (no copy into empty storage).
    """
    raw, meta = read_weights(src)
    return _load_state(model, raw, meta, strict=strict, pos_embed_method=pos_embed_method)


def _load_state(
    model: VisionTransformer, raw: Mapping[str, Any], meta: Mapping, *, strict: bool, pos_embed_method: ResampleMethod
) -> LoadReport:
    fmt = detect_format(raw, meta)
    return _load_converted(model, fmt, convert(raw, fmt), meta, strict=strict, pos_embed_method=pos_embed_method)


def _load_converted(
    model: VisionTransformer,
    fmt: str,
    state: StateDict,
    meta: Mapping,
    *,
    strict: bool,
    pos_embed_method: ResampleMethod,
) -> LoadReport:
    """:func:`_load_state` for tensors already under our names."""
    report = LoadReport(format=fmt)
    if meta.get("config"):
        report.config = json.loads(meta["config"])

    target = model.state_dict()
    # The paper fine-tunes without the pretraining representation layer.
    if "pre_logits.fc.weight" in state and "pre_logits.fc.weight" not in target:
        report.dropped += [k for k in state if k.startswith("pre_logits.")]
    # A new task: the classifier is replaced by a freshly initialised one.
    head_fits = all(k in state and state[k].shape == target[k].shape for k in target if k.startswith("head."))
    if not head_fits or not any(k.startswith("head.") for k in target):
        report.dropped += [k for k in state if k.startswith("head.")]
        report.reinitialized_head = any(k.startswith("head.") for k in target)
    state = {k: v for k, v in state.items() if k not in report.dropped}

    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        state["pos_embed"], report.resampled_pos_embed = _adapt_pos_embed(
            model, state["pos_embed"], report.config, pos_embed_method
        )

    expected = {k for k in target if not (report.reinitialized_head and k.startswith("head."))}
    missing = sorted(expected - set(state))
    unexpected = sorted(k.removeprefix("__unconverted__/") for k in set(state) - set(target))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in expected & set(state)
        if state[k].shape != target[k].shape
    )
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointMismatchError(fmt, missing, unexpected, mismatched)
    report.missing, report.unexpected = missing, unexpected

    on_meta = any(p.is_meta for p in model.parameters())
    loadable = {k: v.to(dtype=target[k].dtype) for k, v in state.items() if k in target}
    model.load_state_dict(loadable, strict=False, assign=on_meta)
    if report.reinitialized_head and not on_meta:
        model.reset_head()
    return report


def _adapt_pos_embed(
    model: VisionTransformer, pos_embed: torch.Tensor, saved_config: dict | None, method: ResampleMethod
) -> tuple[torch.Tensor, tuple[tuple[int, int], tuple[int, int]]]:
    prefix = model.num_prefix_tokens
    num_patches = pos_embed.shape[1] - prefix
    if saved_config is not None:
        old_grid = ViTConfig(**config_fields(saved_config)).grid_size
    else:
        old_grid = infer_grid(num_patches)
    if old_grid[0] * old_grid[1] != num_patches:
        raise CheckpointMismatchError(
            "pos_embed",
            [],
            [],
            [f"pos_embed: {pos_embed.shape[1]} tokens is not {prefix} prefix token(s) + a {old_grid} grid"],
        )
    new = resample_pos_embed(pos_embed, model.grid_size, old_grid=old_grid, num_prefix_tokens=prefix, method=method)
    return new, (tuple(old_grid), tuple(model.grid_size))


# ---------------------------------------------------------------------------- saving


def save_checkpoint(model: VisionTransformer, path: str | os.PathLike) -> Path:
    """Write weights and config; ``.safetensors`` by suffix, otherwise a weights-only torch file.

    The file is written to a temporary name and renamed, so a crash never leaves half a checkpoint.
    """
    return save_state_dict(model.state_dict(), model.config, path)


def save_state_dict(state: Mapping[str, torch.Tensor], config: ViTConfig, path: str | os.PathLike) -> Path:
    """:func:`save_checkpoint` for weights held apart from a model, e.g. gathered from FSDP shards."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(config)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(
                state,
                tmp,
                metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "config": json.dumps(config)},
            )
        else:
            torch.save({"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config, "state_dict": state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------- a model from a file


def load_model(path: str | os.PathLike, *, device: torch.device | str | None = None, **overrides) -> VisionTransformer:
    """Build the model of a checkpoint of any format and load its weights.

    Ours carry their config; for released weights (``.npz``, timm, Hugging Face) it is read off the
    tensors (:func:`infer_model_config`). ``overrides`` change config fields first, e.g.
    ``img_size=384`` or ``num_classes=10`` for fine-tuning (the position embeddings are resampled
    and the head re-initialised), ``representation_size=None`` to drop a pre-logits layer, or
    ``num_heads`` for released weights whose width is that of no named size. The file is read once,
    and checked against the config before the model is built.
    """
    raw, meta = read_weights(path)
    fmt, fields, state = describe(path, raw, meta)
    del raw  # the converted tensors are what is loaded; for .npz the originals can go
    model = VisionTransformer(configure(path, fmt, fields, overrides), device=device)
    _load_converted(model, fmt, state, meta, strict=True, pos_embed_method="bilinear")
    return model


def infer_model_config(src: str | os.PathLike | BinaryIO | Mapping[str, Any], **overrides) -> ViTConfig:
    """The :class:`ViTConfig` of the weights in ``src`` (a path, a folder, a file object or a state
    dict), with ``overrides`` over its fields.

    Ours carry their config. For the released formats it is read off the tensors: width, patch size
    and input channels from the patch embedding, depth from the number of blocks, MLP width from the
    first block, a hybrid's ResNet stem (stage depths and width) from its units, the resolution from
    the position embeddings, the class count from the head (0 without one), the pre-logits size from
    that layer, the pooling from the class token and ``qkv_bias`` from the biases. The head count
    shows only in the ``.npz`` layout (query kernels are (D, heads, D/heads)); for timm and Hugging
    Face weights it is the head count of the named size of that width (``vit.variants.SIZES``: Ti
    192/3, S 384/6, B 768/12, L 1024/16, H 1280/16), and a width of no named size raises
    :class:`UnknownVariantError` unless ``num_heads`` is given (``overrides`` win over the file).
    LayerNorm eps is 1e-6, that of the JAX code and timm, with which the released weights were
    trained (Hugging Face's configs say 1e-12, a default of the conversion).

    The config is checked against the tensors on a meta-device model (nothing is allocated): a file
    that holds no whole model (missing, unexpected or mis-shaped tensors) is refused here, with the
    same :class:`CheckpointMismatchError` a strict load would raise.
    """
    raw, meta = read_weights(src)
    fmt, fields, _ = describe(src, raw, meta)
    return configure(src, fmt, fields, overrides)
