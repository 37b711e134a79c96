"""2-D resampling of learned position embeddings (paper §3.2, fine-tuning at higher resolution).

The embeddings are learned as a 1-D sequence but laid out on the patch grid, so a new resolution
(same patch size, more patches) is handled by interpolating them as an image of D channels.
The class token's embedding is not part of the grid and is kept as it is.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

ResampleMethod = Literal["bilinear", "bicubic"]


def infer_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"cannot infer the patch grid of {num_patches} position embeddings: not a square; pass old_grid"
        )
    return side, side


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    method: ResampleMethod = "bilinear",
) -> torch.Tensor:
    """Resample (1, prefix + h*w, D) position embeddings to (1, prefix + h'*w', D).

    ``bilinear`` reproduces the JAX code (``scipy.ndimage.zoom(order=1)``, which maps the corner
    pixels onto each other, i.e. ``align_corners=True``). ``bicubic`` is what the PyTorch ports
    (timm, Hugging Face) do, with ``align_corners=False`` and, as timm, antialiasing on downsampling.
    """
    if method not in ("bilinear", "bicubic"):
        raise ValueError(f"method must be 'bilinear' or 'bicubic', got {method!r}")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected position embeddings of shape (1, T, D), got {tuple(pos_embed.shape)}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = tuple(old_grid) if old_grid is not None else infer_grid(grid.shape[1])
    new_grid = tuple(new_grid)
    if old_grid[0] * old_grid[1] != grid.shape[1]:
        raise ValueError(f"old_grid {old_grid} does not hold {grid.shape[1]} position embeddings")
    if new_grid == old_grid:
        return pos_embed
    D = grid.shape[-1]
    dtype = grid.dtype
    image = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    if method == "bilinear":
        image = F.interpolate(image, size=new_grid, mode="bilinear", align_corners=True)
    else:
        shrinking = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
        image = F.interpolate(image, size=new_grid, mode="bicubic", align_corners=False, antialias=shrinking)
    grid = image.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(dtype)
    return torch.cat([prefix, grid], dim=1)
