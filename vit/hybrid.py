"""The ResNet stem of the hybrid models (paper §3.1, "R50+ViT-B/16").

A BiT-style ResNet: weight-standardised convolutions with GroupNorm, post-activation bottleneck
units with the stride on the 3x3 conv, TF "SAME" padding as in the JAX code. Its feature map is
the patch grid: the ViT then embeds 1x1 "patches" of it. Names follow timm's ResNetV2 where they
can (``stages.0.blocks.0.conv1``), so timm hybrid weights map by a prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/JAX 'SAME' padding: output = ceil(size / stride), any extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_padding(x.shape[-2], kernel, stride)
    left, right = _same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (zero mean, unit variance per output filter) and SAME padding."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int, stride: int = 1, eps: float = 1e-8, **factory):
        super().__init__(in_chans, out_chans, kernel, stride=stride, padding=0, bias=False, **factory)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
        w = ((flat - mean) / torch.sqrt(var + self.eps)).reshape_as(w)
        x = _pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def _group_norm(chans: int, **factory) -> nn.GroupNorm:
    return nn.GroupNorm(32, chans, eps=1e-6, **factory)


class Downsample(nn.Module):
    """Projection shortcut: 1x1 StdConv (with the unit's stride) + GroupNorm."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, **factory):
        super().__init__()
        self.conv = StdConv2d(in_chans, out_chans, 1, stride, **factory)
        self.norm = _group_norm(out_chans, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1, GroupNorm after each, ReLU after the sum (post-activation)."""

    def __init__(self, in_chans: int, mid_chans: int, out_chans: int, stride: int, **factory):
        super().__init__()
        needs_projection = stride != 1 or in_chans != out_chans
        self.downsample = Downsample(in_chans, out_chans, stride, **factory) if needs_projection else None
        self.conv1 = StdConv2d(in_chans, mid_chans, 1, **factory)
        self.norm1 = _group_norm(mid_chans, **factory)
        self.conv2 = StdConv2d(mid_chans, mid_chans, 3, stride, **factory)
        self.norm2 = _group_norm(mid_chans, **factory)
        self.conv3 = StdConv2d(mid_chans, out_chans, 1, **factory)
        self.norm3 = _group_norm(out_chans, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(shortcut + y)


class Stage(nn.Module):
    def __init__(self, depth: int, in_chans: int, mid_chans: int, out_chans: int, stride: int, **factory):
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                Bottleneck(in_chans if i == 0 else out_chans, mid_chans, out_chans, stride if i == 0 else 1, **factory)
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """7x7/2 StdConv, GroupNorm, ReLU, 3x3/2 max-pool: stride 4."""

    def __init__(self, in_chans: int, out_chans: int, **factory):
        super().__init__()
        self.conv = StdConv2d(in_chans, out_chans, 7, 2, **factory)
        self.norm = _group_norm(out_chans, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return F.max_pool2d(_pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetStem(nn.Module):
    """Pixels (B, C, H, W) to a feature map (B, 256*w*2^(S-1), H/s, W/s), s = 4 * 2^(S-1)."""

    def __init__(self, layers: tuple[int, ...], width_factor: int = 1, in_chans: int = 3, *, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        base = 64 * width_factor
        self.stem = Stem(in_chans, base, **factory)
        stages = []
        chans = base
        for i, depth in enumerate(layers):
            mid, out = base * 2**i, base * 4 * 2**i
            stages.append(Stage(depth, chans, mid, out, 1 if i == 0 else 2, **factory))
            chans = out
        self.stages = nn.Sequential(*stages)
        self.out_chans = chans

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, param in self.named_parameters():
            self.init_parameter(name, param)

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor) -> None:
        """BiT's initialiser of parameter ``name`` (relative to the stem) into ``tensor``, its full shape: one
        parameter at a time, so a sharded model can initialise each whole and keep its part."""
        owner_name, _, kind = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        if isinstance(owner, StdConv2d):
            nn.init.kaiming_normal_(tensor, mode="fan_out", nonlinearity="relu")
        elif isinstance(owner, nn.GroupNorm):
            parent_name, _, own_name = owner_name.rpartition(".")
            # Each residual branch starts as the identity, as in BiT and the JAX code.
            branch_end = own_name == "norm3" and isinstance(self.get_submodule(parent_name), Bottleneck)
            (nn.init.zeros_ if kind == "bias" or branch_end else nn.init.ones_)(tensor)
        else:
            raise ValueError(f"no initialiser for parameter {name} of a {type(owner).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def flops_per_image(self, img_size: int) -> int:
        """Forward FLOPs of the convolutions at a square input of ``img_size``."""
        flops = 0
        side = img_size

        def conv(c: StdConv2d, size: int) -> tuple[int, int]:
            out = math.ceil(size / c.stride[0])
            return 2 * out * out * c.out_channels * c.in_channels * c.kernel_size[0] ** 2, out

        f, side = conv(self.stem.conv, side)
        flops += f
        side = math.ceil(side / 2)
        for stage in self.stages:
            for block in stage.blocks:
                if block.downsample is not None:
                    flops += conv(block.downsample.conv, side)[0]
                f1, _ = conv(block.conv1, side)
                f2, out = conv(block.conv2, side)
                f3, _ = conv(block.conv3, out)
                flops += f1 + f2 + f3
                side = out
        return flops
