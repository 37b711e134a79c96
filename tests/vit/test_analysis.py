from __future__ import annotations

import pytest
import torch

import vit
from vit.analysis import (
    attention_rollout,
    fig7_statistics,
    mean_attention_distance,
    patch_embed_components,
    pos_embed_similarity,
    position_structure,
    rollout,
)


def model(**overrides):
    torch.manual_seed(0)
    return vit.create_model("Mu/8", img_size=32, num_classes=3, **overrides).eval()


def test_rollout_is_a_distribution_over_the_grid():
    m = model()
    x = torch.randn(2, 3, 32, 32)
    r = attention_rollout(m, x)
    assert r.shape == (2, 4, 4)
    torch.testing.assert_close(r.sum(dim=(1, 2)), torch.ones(2))
    assert (r >= 0).all()


def test_rollout_follows_attention_to_one_patch():
    """Every token attending only to patch 5 in every layer: all rollout mass lands on patch 5."""
    T = 17
    one_hot = torch.zeros(1, 2, T, T)
    one_hot[..., 1 + 5] = 1.0
    weights = rollout([one_hot, one_hot, one_hot])
    expected = torch.zeros(1, 16)
    expected[0, 5] = 1.0
    torch.testing.assert_close(weights, expected)


def test_rollout_of_uniform_attention_is_uniform():
    uniform = torch.full((1, 2, 17, 17), 1 / 17)
    torch.testing.assert_close(rollout([uniform] * 4), torch.full((1, 16), 1 / 16))


def test_rollout_needs_a_class_token():
    with pytest.raises(ValueError, match="class token"):
        attention_rollout(model(pool="gap"), torch.randn(1, 3, 32, 32))


def test_mean_attention_distance_of_uniform_attention():
    m = model()
    for block in m.blocks:
        with torch.no_grad():
            block.attn.qkv.weight[: 2 * m.config.width] = 0  # q = k = bias: uniform attention
            block.attn.qkv.bias.zero_()
    d = mean_attention_distance(m, torch.randn(2, 3, 32, 32))
    assert d.shape == (m.config.depth, m.config.num_heads)
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2) * 8.0
    expected = torch.cdist(coords, coords).mean()
    torch.testing.assert_close(d, torch.full_like(d, expected.item()))


def test_pos_embed_similarity_diagonal_is_one():
    m = model()
    s = pos_embed_similarity(m)
    assert s.shape == (4, 4, 4, 4)
    for i in range(4):
        for j in range(4):
            assert s[i, j, i, j].item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- known answers


def _with_attention(m, maps):
    """``m`` whose every block attends as ``maps`` (one (B, H, T, T) tensor per block) says, whatever its input."""
    m.get_attention_maps = lambda images: [a.expand(images.shape[0], -1, -1, -1) for a in maps]
    return m


def _mean_pairwise_distance(side: int, stride: float) -> float:
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return torch.cdist(coords * stride, coords * stride).mean().item()


def test_a_head_attending_only_to_itself_has_distance_zero_and_a_uniform_one_the_mean_pairwise_distance():
    m = model()  # 4x4 grid of 8 px patches, 4 heads, 4 blocks
    T, N = 17, 16
    head_maps = torch.zeros(1, 4, T, T)
    head_maps[0, 0] = torch.eye(T)  # head 1: itself only
    head_maps[0, 1] = 1 / T  # head 2: every token alike (class token included: renormalised away)
    head_maps[0, 2, :, 1:] = 1 / N  # head 3: every patch alike
    head_maps[0, 3] = torch.eye(T)
    d = mean_attention_distance(_with_attention(m, [head_maps] * m.config.depth), torch.zeros(3, 3, 32, 32))
    expected = _mean_pairwise_distance(4, 8.0)
    torch.testing.assert_close(d, torch.tensor([[0.0, expected, expected, 0.0]]).expand(m.config.depth, 4))


def test_rollout_of_identity_attention_is_uniform_over_patches():
    """The class token never looks at a patch, so no patch stands out: uniform, not 0/0."""
    identity = torch.eye(17).expand(2, 3, 17, 17)
    torch.testing.assert_close(rollout([identity] * 3), torch.full((2, 16), 1 / 16))


def test_rollout_rows_of_random_attention_sum_to_one():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, 4, 17, 17, generator=g).mul(3).softmax(dim=-1) for _ in range(5)]
    weights = rollout(maps)
    assert weights.shape == (3, 16)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3))


def test_filters_in_a_plane_have_two_components_explaining_all_variance():
    m = model()  # D = 64 filters of 3 x 8 x 8 = 192 values
    D, F = 64, 3 * 8 * 8
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(F, 2, generator=g))  # (F, 2) orthonormal: the plane
    coefficients = torch.randn(D, 2, generator=g) * torch.tensor([3.0, 1.0])  # the first direction dominates
    offset = torch.randn(F, generator=g)  # a common mean filter: PCA centres it away
    with torch.no_grad():
        m.patch_embed.proj.weight.copy_((coefficients @ basis.T + offset).reshape(D, 3, 8, 8))
    pcs, ratio = patch_embed_components(m, k=5)
    assert pcs.shape == (5, 3, 8, 8) and ratio.shape == (5,)
    assert ratio[:2].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert ratio[0] > ratio[1]
    flat = pcs.flatten(1)
    # The top two lie in the plane (their projection onto it is themselves) and are orthonormal.
    torch.testing.assert_close(flat[:2] @ basis @ basis.T, flat[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(flat[:2] @ flat[:2].T, torch.eye(2), atol=1e-5, rtol=0)
    # The sign is fixed: each component's largest entry is positive.
    assert (flat.gather(1, flat.abs().argmax(dim=1, keepdim=True)) > 0).all()


def test_filter_components_are_fewer_when_there_are_fewer_filters_and_refused_for_hybrids():
    m = vit.VisionTransformer(vit.ViTConfig(img_size=32, patch_size=8, width=8, depth=1, num_heads=2, mlp_dim=16))
    pcs, ratio = patch_embed_components(m, k=28)
    assert pcs.shape == (8, 3, 8, 8)
    assert ratio.sum().item() == pytest.approx(1.0, abs=1e-5)
    hybrid = vit.create_model("R26+Mu/32", img_size=64, num_classes=0, device="meta")
    with pytest.raises(ValueError, match="stem"):
        patch_embed_components(hybrid)


def _grid_similarity(h: int, w: int, value) -> torch.Tensor:
    """A (h, w, h, w) similarity whose [i, j, k, l] entry is value(dy, dx) of the two patches' offsets."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = (ys.reshape(h, w, 1, 1) - ys.reshape(1, 1, h, w)).abs().double()
    dx = (xs.reshape(h, w, 1, 1) - xs.reshape(1, 1, h, w)).abs().double()
    return value(dy, dx)


def test_similarity_falling_with_distance_has_spearman_minus_one_and_no_row_column_structure():
    falling = position_structure(_grid_similarity(5, 5, lambda dy, dx: 1.0 - (dy**2 + dx**2).sqrt() / 10))
    assert falling["spearman"] == pytest.approx(-1.0)
    assert falling["row_column_excess"] == pytest.approx(0.0, abs=0.02)  # only rounding of distances separates them
    rising = position_structure(_grid_similarity(5, 5, lambda dy, dx: (dy**2 + dx**2).sqrt()))
    assert rising["spearman"] == pytest.approx(1.0)


def test_rows_and_columns_more_alike_than_as_far_off_axis_show_a_positive_excess():
    axes = _grid_similarity(4, 6, lambda dy, dx: ((dy == 0) | (dx == 0)).double() * 0.5)
    structure = position_structure(axes)
    assert structure["row_column_excess"] == pytest.approx(0.5)
    assert structure["spearman"] < 0  # same-row/column pairs are the nearer ones on average


def test_fig7_statistics_of_a_model_report_every_block():
    torch.manual_seed(0)
    model = vit.create_model("Mu/8", num_classes=3, img_size=32).eval()
    stats = fig7_statistics(model, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert len(stats["attention_distance_by_block"]) == 4 == len(stats["attention_distance_range_by_block"])
    for mean, (low, high) in zip(stats["attention_distance_by_block"], stats["attention_distance_range_by_block"]):
        assert 0 <= low <= mean <= high <= 32 * 2**0.5
    assert -1 <= stats["position_spearman"] <= 1 and -1 <= stats["distance_depth_spearman"] <= 1
