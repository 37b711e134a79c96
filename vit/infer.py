"""Which model a checkpoint holds: the :class:`ViTConfig` its tensors describe, checked against them.

Our files carry their config; released weights (``.npz``, timm, Hugging Face) are read off their
tensors, as :func:`vit.checkpoint.infer_model_config` describes. Either way the config and the
tensors are checked against each other before :func:`vit.checkpoint.load_model` builds anything.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vit.formats import StateDict, convert, detect_format
from vit.model import VisionTransformer, ViTConfig
from vit.posemb import infer_grid
from vit.safe_read import CheckpointMismatchError, check_bytes, check_saved_config, source_name
from vit.variants import SIZES, size_of_width


class UnknownVariantError(ValueError):
    """Released weights that do not say how many attention heads their model has: the variant must be named.

    ``format``, ``width`` and ``source`` say which weights, for callers that word their own advice.
    """

    def __init__(self, message: str, *, format: str, width: int, source: str | None):
        super().__init__(message)
        self.format, self.width, self.source = format, width, source


def describe(src: object, raw: Mapping[str, Any], meta: Mapping) -> tuple[str, dict, StateDict]:
    """The format, the config fields the file describes (``num_heads`` None where it does not say) and its
    tensors under our names; fields and tensors are checked against each other before anything is built."""
    fmt = detect_format(raw, meta)
    if fmt == "vit" and meta.get("config"):
        try:
            saved = config_fields(json.loads(meta["config"]))
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{source_name(src)}: its saved config is not readable: {err}") from err
        check_saved_config(src, saved, raw)  # the file's word on sizes is checked before anything is built
        return fmt, saved, convert(raw, fmt)
    state = convert(raw, fmt)
    fields = _released_fields(source_name(src), fmt, raw, state)
    _check_released(src, fmt, fields, state)
    if fmt != "npz":  # np.load's arrays own their memory; torch pickles can share one storage among many tensors
        check_bytes(src, raw)
    return fmt, fields, state


def _released_fields(source: str | None, fmt: str, raw: Mapping[str, Any], state: StateDict) -> dict:
    """The ViTConfig fields that released weights (our names, ``state``) describe.

    How each is read: :func:`vit.checkpoint.infer_model_config`.
    """
    what = f"{fmt} checkpoint{f' {source}' if source is not None else ''}"

    def tensor(key: str, ndim: int, role: str) -> torch.Tensor | None:
        value = state.get(key)
        if value is not None and value.ndim != ndim:
            raise ValueError(f"{what}: {key} ({role}) has shape {tuple(value.shape)}, not {ndim}-D")
        return value

    embed = tensor("patch_embed.proj.weight", 4, "the patch embedding")
    if embed is None or embed.shape[-1] != embed.shape[-2]:
        raise ValueError(f"{what} has no square patch embedding (patch_embed.proj.weight): not a ViT")
    width, patch = int(embed.shape[0]), int(embed.shape[-1])
    depth = len({int(m[1]) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    fc1 = tensor("blocks.0.mlp.fc1.weight", 2, "the first block's MLP")
    if not depth or fc1 is None:
        raise ValueError(f"{what} has no encoder blocks (blocks.0.mlp.fc1.weight): not a ViT")
    units = {(int(m[1]), int(m[2])) for k in state if (m := re.match(r"stem\.stages\.(\d+)\.blocks\.(\d+)\.", k))}
    per_stage = Counter(stage for stage, _ in units)
    layers = tuple(per_stage[i] for i in range(len(per_stage))) or None
    if layers is None:
        in_chans, resnet_width, stride = int(embed.shape[1]), 1, patch
    else:  # a hybrid: the ResNet stem's feature map is the patch grid
        root = tensor("stem.stem.conv.weight", 4, "the ResNet stem's root convolution")
        if root is None:
            raise ValueError(f"{what} has ResNet stages but no root convolution (stem.stem.conv.weight)")
        in_chans, resnet_width = int(root.shape[1]), max(1, int(root.shape[0]) // 64)
        stride = patch * 4 * 2 ** (len(layers) - 1)
    pos = tensor("pos_embed", 3, "the position embeddings")
    if pos is None:
        raise ValueError(f"{what} has no position embeddings (pos_embed)")
    pool = "cls" if "cls_token" in state else "gap"
    try:
        side = infer_grid(int(pos.shape[1]) - (1 if pool == "cls" else 0))[0]
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if side < 1:
        raise ValueError(f"{what}: its position embeddings hold no patch positions")
    head = tensor("head.weight", 2, "the classifier")
    pre_logits = tensor("pre_logits.fc.weight", 2, "the pre-logits layer")
    return dict(
        img_size=side * stride,
        patch_size=patch,
        in_chans=in_chans,
        num_classes=int(head.shape[0]) if head is not None else 0,
        width=width,
        depth=depth,
        num_heads=_npz_heads(what, raw) if fmt == "npz" else None,
        mlp_dim=int(fc1.shape[0]),
        pool=pool,
        representation_size=int(pre_logits.shape[0]) if pre_logits is not None else None,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        resnet_layers=layers,
        resnet_width=resnet_width,
    )


def _npz_heads(what: str, raw: Mapping[str, Any]) -> int | None:
    """The head count of JAX weights: query kernels are (D, heads, D/heads), (L, D, heads, D/heads) when scanned."""
    counts = {int(np.shape(v)[-2]) for k, v in raw.items() if "encoderblock" in k and k.endswith("query/kernel")}
    if len(counts) > 1:
        raise ValueError(f"{what}: its query kernels disagree on the number of heads: {sorted(counts)}")
    return counts.pop() if counts else None


def _check_released(src: object, fmt: str, fields: dict, state: StateDict) -> None:
    """Refuse released weights that do not hold exactly the model their tensors describe (checked on meta)."""
    source = source_name(src)
    try:  # the head count changes no shape
        expected = VisionTransformer(ViTConfig(**{**fields, "num_heads": 1}), device="meta").state_dict()
    except Exception as err:  # ValueError, RuntimeError from sizes that make no model
        where = f" {source}" if source is not None else ""
        raise ValueError(f"{fmt} checkpoint{where}: its tensors describe no model: {err}") from err
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k.removeprefix("__unconverted__/") for k in set(found) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {found[k]} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(found)
        if found[k] != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        problem = "does not hold a whole ViT (the model its patch embedding and blocks describe)"
        raise CheckpointMismatchError(fmt, missing, unexpected, mismatched, source=source, problem=problem)


def configure(src: object, fmt: str, fields: dict, overrides: Mapping[str, Any]) -> ViTConfig:
    """The described fields with ``overrides``; a released model's head count from its width when the file has none."""
    fields = {**fields, **overrides}
    if "num_heads" in fields and fields["num_heads"] is None:
        size = size_of_width(fields["width"])
        if size is None:
            source = source_name(src)
            sizes = ", ".join(f"{name} {w}" for name, (w, *_) in SIZES.items())
            raise UnknownVariantError(
                f"{fmt} checkpoint{f' {source}' if source is not None else ''}: its width {fields['width']} is that "
                f"of no named size ({sizes}) and the {fmt} layout does not say how many attention heads the model "
                "has; name the variant: give num_heads (or build the model with vit.create_model and load the "
                "weights with vit.load_checkpoint)",
                format=fmt,
                width=fields["width"],
                source=source,
            )
        fields["num_heads"] = SIZES[size][3]
    return ViTConfig(**fields)


def config_fields(config: Mapping) -> dict:
    """The ViTConfig fields of a saved config; keys of no field (a newer or older version's) are left out."""
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    return {k: v for k, v in config.items() if k in known}
