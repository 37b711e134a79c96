"""Unit tests of vit/hybrid.py: the BiT ResNet stem of the R50+ViT hybrids."""

from __future__ import annotations

import math

import pytest
import torch

from vit.hybrid import Bottleneck, ResNetStem, StdConv2d, _same_padding
from vit.variants import create_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_r50_b16_grid_and_channels_on_meta():
    model = create_model("R50+B/16", img_size=224, device="meta")
    x = torch.empty(2, 3, 224, 224, device="meta")
    assert model.stem.out_chans == 1024
    assert model.stem(x).shape == (2, 1024, 14, 14)
    assert model.patch_embed.proj.in_channels == 1024
    assert model.patch_embed.proj.kernel_size == (1, 1)
    assert model.grid_size == (14, 14)
    assert model.pos_embed.shape == (1, 197, 768)
    assert model.forward_features(x).shape == (2, 197, 768)
    # The paper's R50 keeps three stages and moves stage 4's blocks into stage 3: (3, 4, 9).
    assert [len(stage.blocks) for stage in model.stem.stages] == [3, 4, 9]
    assert [stage.blocks[0].conv2.stride[0] for stage in model.stem.stages] == [1, 2, 2]


def test_r50_l32_uses_2x2_patches_of_the_feature_map():
    model = create_model("R50+L/32", img_size=384, device="meta")
    assert model.patch_embed.proj.kernel_size == (2, 2)
    assert model.grid_size == (12, 12)
    assert model(torch.empty(1, 3, 384, 384, device="meta")).shape == (1, 1000)


def _effective_weight(conv: StdConv2d) -> torch.Tensor:
    """Read the weights a (bias-free, linear) StdConv2d really applies by probing it with basis images."""
    c, k = conv.in_channels, conv.kernel_size[0]
    basis = torch.eye(c * k * k).reshape(c * k * k, c, k, k)
    with torch.no_grad():
        out = conv(basis)  # (c*k*k, out, k, k) with SAME padding
    centre = (k - 1) // 2  # the output pixel whose window is exactly the unpadded input
    return out[:, :, centre, centre].T.reshape_as(conv.weight)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_stdconv_effective_weights_are_standardised(kernel):
    conv = StdConv2d(4, 6, kernel)
    with torch.no_grad():
        conv.weight.normal_(0.7, 3.0)  # far from standardised
    w = _effective_weight(conv).flatten(1)
    torch.testing.assert_close(w.mean(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(dim=1, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    raw = conv.weight.detach().flatten(1)
    expected = (raw - raw.mean(dim=1, keepdim=True)) / raw.std(dim=1, unbiased=False, keepdim=True)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=1e-5)


def test_stdconv_is_invariant_to_affine_weight_changes():
    conv = StdConv2d(3, 5, 3, stride=2)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(7.0).add_(3.0)
        after = conv(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [7, 8, 15, 16, 31, 224])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (1, 2), (3, 2), (7, 2)])
def test_same_padding_output_size(size, kernel, stride):
    conv = StdConv2d(2, 3, kernel, stride)
    with torch.no_grad():
        out = conv(torch.randn(1, 2, size, size + 1))
    assert out.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    # TF "SAME": total = max((ceil(n/s) - 1) * s + k - n, 0), the smaller half before.
    [(224, 7, 2, (2, 3)), (8, 3, 2, (0, 1)), (7, 3, 2, (1, 1)), (112, 3, 2, (0, 1)), (5, 1, 2, (0, 0)),
     (4, 3, 1, (1, 1)), (6, 7, 1, (3, 3)), (9, 7, 2, (3, 3))],
)  # fmt: skip
def test_same_padding_matches_tensorflow(size, kernel, stride, expected):
    assert _same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("size", [31, 32, 33, 40])
def test_stem_output_is_ceil_of_size_over_stride(size):
    stem = ResNetStem((1, 1))  # stride 4 * 2 = 8, 512 channels
    stem.init_weights()
    with torch.no_grad():
        out = stem(torch.randn(1, 3, size, size + 3))
    assert out.shape == (1, 512, math.ceil(size / 8), math.ceil((size + 3) / 8))


def test_residual_units_start_as_identity():
    stem = ResNetStem((2, 3))
    stem.init_weights()
    units = [m for m in stem.modules() if isinstance(m, Bottleneck)]
    assert all(torch.count_nonzero(u.norm3.weight) == 0 for u in units)
    x = torch.relu(torch.randn(2, 64, 8, 8))  # unit inputs follow a ReLU
    with torch.no_grad():
        for unit in units:
            y = unit(x)
            if unit.downsample is None:
                assert torch.equal(y, x)
            else:
                assert y.shape[1] != x.shape[1] or y.shape[-1] != x.shape[-1]
            x = y
    assert sum(u.downsample is None for u in units) == 3


def test_tiny_hybrid_forward_on_cpu():
    model = create_model("R26+Mu/32", img_size=64, num_classes=3, head_zero_init=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert model.stem.out_chans == 2048
    assert feats.shape == (2, 5, 64)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
