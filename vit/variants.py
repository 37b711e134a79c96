"""Named model sizes: "B/16" is ViT-Base with 16x16 patches (paper Table 1), "R50+B/16" its hybrid.

One table holds every size; a name is ``SIZE/PATCH`` or ``R50+SIZE/PATCH``.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from vit.model import VisionTransformer, ViTConfig

# size: (width D, depth L, MLP dim, heads) -- Table 1, with Ti and S from DeiT as the paper does.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Mu": (64, 4, 128, 4),  # a tiny size for tests and the laptop demo (not in the paper)
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
PATCH_SIZES = (32, 16, 14, 8)  # the paper's; any positive patch size is accepted
# Hybrid stems: ResNet stage depths. The paper's R50 hybrid drops stage 4 and moves its blocks
# into stage 3 (3, 4, 9), so the feature map has stride 16 and 1024 channels.
RESNETS: dict[str, tuple[int, ...]] = {"R26": (2, 2, 2, 2), "R50": (3, 4, 9)}

_NAME = re.compile(r"^(?:(?P<resnet>R\d+)\+)?(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def decode_variant(name: str) -> dict:
    """``"B/16"`` -> the ViTConfig fields it fixes. For hybrids the patch is the stem's stride."""
    match = _NAME.match(name.strip())
    if not match or match["size"] not in SIZES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    width, depth, mlp_dim, heads = SIZES[match["size"]]
    fields = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(match["patch"]))
    if match["resnet"]:
        if match["resnet"] not in RESNETS:
            raise ValueError(f"unknown hybrid stem {match['resnet']!r}; known: {', '.join(RESNETS)}")
        layers = RESNETS[match["resnet"]]
        stride = 4 * 2 ** (len(layers) - 1)
        if fields["patch_size"] % stride:
            raise ValueError(f"{name}: patch {fields['patch_size']} is not a multiple of the stem's stride {stride}")
        fields.update(resnet_layers=layers, patch_size=fields["patch_size"] // stride)
    return fields


def size_of_width(width: int) -> str | None:
    """The named size of this width (``"B"`` for 768), or None; each size has a width of its own."""
    return next((size for size, (w, *_) in SIZES.items() if w == width), None)


def list_models() -> list[str]:
    names = [f"{size}/{patch}" for size in SIZES for patch in PATCH_SIZES]
    return names + ["R50+B/16", "R50+L/32", "R26+S/32"]


def model_config(name: str, **overrides) -> ViTConfig:
    """The ViTConfig of a named variant, with any field overridden (``img_size=384``, ...)."""
    fields = decode_variant(name)
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown ViTConfig field(s): {', '.join(sorted(unknown))}")
    return ViTConfig(**{**fields, **overrides})


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    img_size: int = 224,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> VisionTransformer:
    """Build a named variant: ``create_model("B/16", num_classes=10, img_size=384, dropout=0.1)``.

    ``device="meta"`` builds without allocating memory (shapes and parameter counts only, or
    ``to_empty`` + ``init_weights`` later; a sharded model fills its parameters one at a time with
    ``init_parameter``).
    """
    config = model_config(name, num_classes=num_classes, img_size=img_size, **overrides)
    return VisionTransformer(config, device=device, dtype=dtype)
