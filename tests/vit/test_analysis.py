from __future__ import annotations

import pytest
import torch

import vit
from vit.analysis import attention_rollout, mean_attention_distance, pos_embed_similarity, rollout


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
