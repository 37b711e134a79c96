"""The paper's analyses of what ViT learns (§4.5, Figs. 6 and 7).

* :func:`attention_rollout` -- Fig. 6: how much each patch contributes to the class token, through
  all layers (Abnar & Zuidema 2020: average heads, add the residual identity, multiply layers).
* :func:`mean_attention_distance` -- Fig. 7 right: per head, the average image-space distance
  between a query patch and the patches it attends to, weighted by attention ("receptive field").
* :func:`pos_embed_similarity` -- Fig. 7 centre: cosine similarity of each patch's position
  embedding with every other's, laid out on the grid.
* :func:`patch_embed_components` -- Fig. 7 left: the principal components of the patch-embedding
  filters, each a (C, P, P) patch, with the share of the filters' variance it explains.
* :func:`position_structure` and :func:`fig7_statistics` -- the findings of Fig. 7 as numbers: similarity
  falling with 2-D distance (a Spearman correlation), rows and columns more alike than other patches as far
  apart, and the attention distance of every block's heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vit.model import VisionTransformer


@torch.no_grad()
def attention_rollout(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Class-token attention to each patch after all layers, (B, h, w), rows summing to 1."""
    if model.num_prefix_tokens != 1:
        raise ValueError("attention rollout follows the class token; this model pools by averaging (pool='gap')")
    h, w = _grid_of(model, images)
    return rollout(model.get_attention_maps(images)).reshape(-1, h, w)


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-block attention maps, each (B, H, T, T) with the class token first, to (B, N) weights."""
    T = maps[0].shape[-1]
    eye = torch.eye(T, device=maps[0].device, dtype=maps[0].dtype)
    flow = eye.expand(maps[0].shape[0], T, T)
    for attn in maps:
        a = attn.mean(dim=1) + eye  # (B, T, T): the residual path carries the token itself
        a = a / a.sum(dim=-1, keepdim=True)
        flow = a @ flow
    to_patches = flow[:, 0, 1:]  # (B, N)
    total = to_patches.sum(dim=-1, keepdim=True)
    # A class token that only ever attends to itself singles out no patch: uniform, rather than 0/0.
    uniform = torch.full_like(to_patches, 1.0 / to_patches.shape[-1])
    return torch.where(total > 0, to_patches / total.clamp_min(torch.finfo(total.dtype).tiny), uniform)


@torch.no_grad()
def mean_attention_distance(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Attention-weighted mean distance in pixels, per block and head, averaged over images: (L, H)."""
    h, w = _grid_of(model, images)
    stride = model.config.feature_stride
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float() * stride  # (N, 2) pixel centres
    distance = torch.cdist(coords, coords).to(images.device)  # (N, N)
    prefix = model.num_prefix_tokens
    out = []
    for attn in model.get_attention_maps(images):
        patch_attn = attn[:, :, prefix:, prefix:]  # (B, H, N, N), patch-to-patch only
        patch_attn = patch_attn / patch_attn.sum(dim=-1, keepdim=True)
        per_query = (patch_attn * distance).sum(dim=-1)  # (B, H, N)
        out.append(per_query.mean(dim=(0, 2)))
    return torch.stack(out)


@torch.no_grad()
def pos_embed_similarity(model: VisionTransformer) -> torch.Tensor:
    """Cosine similarity of patch position embeddings: (h, w, h, w); [i, j] is patch (i, j)'s map."""
    grid = model.pos_embed[0, model.num_prefix_tokens :]  # (N, D)
    normed = F.normalize(grid.float(), dim=-1)
    h, w = model.grid_size
    return (normed @ normed.T).reshape(h, w, h, w)


@torch.no_grad()
def patch_embed_components(model: VisionTransformer, k: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` principal components of the D patch-embedding filters, (k, C, P, P), and the
    fraction of the filters' variance each explains, (k,). Fewer than ``k`` when D or C*P*P is smaller."""
    if model.stem is not None:
        raise ValueError("a hybrid's patch embedding filters the ResNet stem's features, not pixels")
    weight = model.patch_embed.proj.weight.float()  # (D, C, P, P): one filter per output channel
    filters = weight.flatten(1)  # (D, C*P*P)
    centred = filters - filters.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # rows of vh: components, strongest first
    variance = s.square()
    ratio = variance / variance.sum().clamp_min(torch.finfo(variance.dtype).tiny)
    k = min(k, vh.shape[0])
    components = vh[:k]
    # An SVD component is defined up to sign; fixing it (largest entry positive) keeps pictures stable across runs.
    peak = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.where(peak < 0, -1.0, 1.0)
    return components.reshape(k, *weight.shape[1:]), ratio[:k]


@torch.no_grad()
def position_structure(similarity: torch.Tensor) -> dict[str, float]:
    """What Fig. 7 centre shows, as numbers, from a (h, w, h, w) similarity (:func:`pos_embed_similarity`).

    ``spearman``: the rank correlation, over all pairs of distinct patches, between their similarity and their
    2-D distance on the grid; the paper's finding (closer patches have more similar embeddings) makes it
    negative, -1 at most. ``row_column_excess``: how much more similar two patches of the same row or column
    are than pairs off the axes as far apart (Euclidean distance rounded to the same whole number of patches),
    averaged over the axis pairs that have such a match; positive is the paper's row-column structure, 0 none.
    NaN where the grid is too small to tell (one patch; no matched distance).
    """
    h, w = similarity.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    first, second = torch.triu_indices(h * w, h * w, offset=1)
    dy, dx = (ys[first] - ys[second]).abs(), (xs[first] - xs[second]).abs()
    squared = (dy.square() + dx.square()).double()  # whole numbers: equal distances tie exactly
    values = similarity.reshape(h * w, h * w)[first, second].double()
    nan = float("nan")
    spearman = _pearson(_ranks(values), _ranks(squared)) if len(values) > 1 else nan
    rounded = squared.sqrt().round()
    on_axis = (dy == 0) | (dx == 0)
    excesses = []
    for d in rounded[on_axis].unique():
        off = ~on_axis & (rounded == d)
        if off.any():
            excesses.append(values[on_axis & (rounded == d)].mean() - values[off].mean())
    return {"spearman": spearman, "row_column_excess": torch.stack(excesses).mean().item() if excesses else nan}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, ties given their average rank (as Spearman's correlation needs)."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    _, group, count = torch.unique(x, return_inverse=True, return_counts=True)
    return torch.zeros(len(count), dtype=x.dtype).index_add_(0, group, ranks)[group] / count[group]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = (a.square().sum() * b.square().sum()).sqrt()
    return (a @ b / denominator).item() if denominator > 0 else float("nan")


@torch.no_grad()
def fig7_statistics(model: VisionTransformer, images: torch.Tensor) -> dict:
    """The numbers behind Fig. 7 centre and right for ``model`` on ``images`` (normalised or not: they are
    normalised here the way the model was trained, from uint8 pixels).

    ``position_spearman`` / ``row_column_excess`` (:func:`position_structure`); ``attention_distance_by_block``
    (pixels, the mean over heads of :func:`mean_attention_distance`, lowest block first) with each block's
    ``attention_distance_range_by_block`` (the nearest- and farthest-looking heads), and
    ``distance_depth_spearman``: the rank correlation of a head's distance with its block's depth (positive: the
    paper's finding that attention distance grows with depth).
    """
    from vit.data import normalize

    pixels = normalize(images) if images.dtype == torch.uint8 else images
    structure = position_structure(pos_embed_similarity(model))
    return {
        "position_spearman": structure["spearman"],
        "row_column_excess": structure["row_column_excess"],
        **distance_by_depth(mean_attention_distance(model, pixels)),
    }


def distance_by_depth(distance: torch.Tensor) -> dict:
    """What Fig. 7 right shows, from (L, H) head distances (:func:`mean_attention_distance`): each block's mean
    over heads and (nearest, farthest) head, lowest block first, and ``distance_depth_spearman``."""
    distance = distance.double()
    depth = torch.arange(distance.shape[0], dtype=torch.float64)[:, None].expand_as(distance)
    return {
        "attention_distance_by_block": distance.mean(dim=1).tolist(),
        "attention_distance_range_by_block": [(row.min().item(), row.max().item()) for row in distance],
        "distance_depth_spearman": _pearson(_ranks(distance.flatten()), _ranks(depth.flatten())),
    }


def _grid_of(model: VisionTransformer, images: torch.Tensor) -> tuple[int, int]:
    stride = model.config.feature_stride
    return images.shape[-2] // stride, images.shape[-1] // stride
