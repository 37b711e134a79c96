"""Unit tests of vit/posemb.py: 2-D resampling of learned position embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from vit.posemb import infer_grid, resample_pos_embed


def _random_pos_embed(grid: tuple[int, int], dim: int = 6, prefix: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, prefix + grid[0] * grid[1], dim, generator=g)


def _smooth_field(grid: tuple[int, int], dim: int = 4) -> torch.Tensor:
    """(1, h*w, dim): low-frequency functions sampled at pixel centres of a unit square."""
    h, w = grid
    u = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    v = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    U, V = torch.meshgrid(u, v, indexing="ij")
    channels = [
        torch.sin(2 * math.pi * (0.1 * c + 0.3) * U + c) * torch.cos(2 * math.pi * 0.2 * V) + 0.5 * U - 0.3 * V
        for c in range(dim)
    ]
    return torch.stack(channels, dim=-1).reshape(1, h * w, dim).float()


def _grid_part(pos_embed: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> np.ndarray:
    return pos_embed[0, prefix:].reshape(grid[0], grid[1], -1).double().numpy()


@pytest.mark.parametrize(
    "old,new",
    [((7, 7), (12, 12)), ((14, 14), (24, 24)), ((12, 12), (7, 7)), ((5, 7), (9, 4)), ((3, 3), (3, 5))],
)
def test_bilinear_matches_scipy_zoom(old, new):
    pe = _random_pos_embed(old, dim=5)
    out = resample_pos_embed(pe, new, old_grid=old, method="bilinear")
    assert out.shape == (1, 1 + new[0] * new[1], 5)

    grid = _grid_part(pe, old)
    zoom = (new[0] / old[0], new[1] / old[1])
    # What the JAX code does: scipy.ndimage.zoom(order=1) on the grid, channel by channel.
    ref = np.stack([ndimage.zoom(grid[..., c], zoom, order=1) for c in range(grid.shape[-1])], axis=-1)
    assert ref.shape == (*new, 5)
    np.testing.assert_allclose(_grid_part(out, new), ref, atol=1e-5, rtol=0)
    assert torch.equal(out[:, :1], pe[:, :1])  # the class token is not part of the grid


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_prefix_tokens_are_kept(prefix):
    pe = _random_pos_embed((4, 4), prefix=prefix)
    out = resample_pos_embed(pe, (6, 6), num_prefix_tokens=prefix)
    assert out.shape == (1, prefix + 36, 6)
    assert torch.equal(out[:, :prefix], pe[:, :prefix])
    grid = _grid_part(pe, (4, 4), prefix)
    ref = np.stack([ndimage.zoom(grid[..., c], 1.5, order=1) for c in range(6)], axis=-1)
    np.testing.assert_allclose(_grid_part(out, (6, 6), prefix), ref, atol=1e-5, rtol=0)


def test_bicubic_upsample_of_smooth_field():
    old, new = (14, 14), (24, 24)  # 224 -> 384 px at patch 16
    pe = torch.cat([torch.full((1, 1, 4), 7.0), _smooth_field(old)], dim=1)
    out = resample_pos_embed(pe, new, method="bicubic")
    assert out.shape == (1, 1 + 24 * 24, 4)
    assert torch.all(out[:, 0] == 7.0)
    # align_corners=False: the new grid's pixel centres sample the same unit square. PyTorch's cubic
    # kernel (a = -0.75) is only first-order accurate, and the borders are clamped, hence the tolerances.
    error = (out[:, 1:] - _smooth_field(new)).reshape(24, 24, 4)
    assert error.abs().max() < 0.05
    assert error[2:-2, 2:-2].abs().max() < 0.02
    assert error.abs().mean() < 0.007


def test_round_trip_up_then_down_is_close():
    for method in ("bilinear", "bicubic"):
        pe = torch.cat([torch.zeros(1, 1, 4), _smooth_field((8, 8))], dim=1)
        back = resample_pos_embed(resample_pos_embed(pe, (16, 16), method=method), (8, 8), method=method)
        assert back.shape == pe.shape
        torch.testing.assert_close(back, pe, atol=0.04, rtol=0)  # the field spans about +-1.4


def test_same_grid_returns_input():
    pe = _random_pos_embed((5, 5))
    for method in ("bilinear", "bicubic"):
        assert torch.equal(resample_pos_embed(pe, (5, 5), method=method), pe)
    non_square = _random_pos_embed((3, 6))
    assert torch.equal(resample_pos_embed(non_square, [3, 6], old_grid=[3, 6]), non_square)


def test_non_square_old_grid_needs_old_grid():
    pe = _random_pos_embed((6, 4))
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(pe, (12, 8))
    out = resample_pos_embed(pe, (12, 8), old_grid=(6, 4))
    assert out.shape == (1, 1 + 96, 6)
    # The corners map onto each other (align_corners=True, as scipy's zoom).
    torch.testing.assert_close(out[0, 1:].reshape(12, 8, 6)[-1, -1], pe[0, 1:].reshape(6, 4, 6)[-1, -1])


def test_errors_are_clear():
    pe = _random_pos_embed((4, 4))
    with pytest.raises(ValueError, match="method"):
        resample_pos_embed(pe, (6, 6), method="nearest")
    with pytest.raises(ValueError, match=r"\(1, T, D\)"):
        resample_pos_embed(pe[0], (6, 6))
    with pytest.raises(ValueError, match=r"\(1, T, D\)"):
        resample_pos_embed(pe.expand(2, -1, -1), (6, 6))
    with pytest.raises(ValueError, match="does not hold"):
        resample_pos_embed(pe, (6, 6), old_grid=(5, 5))


def test_dtype_and_gradient_preserved():
    pe = _random_pos_embed((4, 4)).to(torch.bfloat16)
    assert resample_pos_embed(pe, (6, 6)).dtype == torch.bfloat16
    # Dynamic-resolution training backpropagates through the resampling into E_pos.
    pe = _random_pos_embed((4, 4)).requires_grad_()
    resample_pos_embed(pe, (6, 6), method="bicubic").sum().backward()
    assert pe.grad is not None and torch.all(pe.grad[0, 1:] != 0)
    assert torch.all(pe.grad[0, 0] == 1.0)


def test_infer_grid():
    assert infer_grid(196) == (14, 14)
    assert infer_grid(1) == (1, 1)
    with pytest.raises(ValueError, match="not a square"):
        infer_grid(195)
