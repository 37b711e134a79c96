"""The Vision Transformer (Dosovitskiy et al., ICLR 2021) in plain PyTorch.

    import vit
    model = vit.create_model("B/16", num_classes=10, img_size=384)
    vit.load_checkpoint(model, "ViT-B_16.npz")   # original .npz, timm or Hugging Face weights
    model = vit.load_model("ViT-B_16.npz", img_size=384, num_classes=10)   # the variant read off the weights

This package imports neither Ray nor MLflow: parallelism, storage and tracking live in ``pipelines``.
"""

from __future__ import annotations

from vit.checkpoint import (
    CheckpointContents,
    CheckpointMismatchError,
    LoadReport,
    UnknownVariantError,
    infer_model_config,
    load_checkpoint,
    load_model,
    read_checkpoint,
    save_checkpoint,
    save_state_dict,
    to_hf_state_dict,
)
from vit.model import VisionTransformer, ViTConfig
from vit.posemb import resample_pos_embed
from vit.variants import create_model, decode_variant, list_models, model_config

__all__ = [
    "CheckpointContents",
    "CheckpointMismatchError",
    "LoadReport",
    "UnknownVariantError",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "decode_variant",
    "infer_model_config",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_config",
    "read_checkpoint",
    "resample_pos_embed",
    "save_checkpoint",
    "save_state_dict",
    "to_hf_state_dict",
]
