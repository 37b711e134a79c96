"""Shared fixtures for the model tests: a tiny ViT that runs in milliseconds on a laptop CPU."""

from __future__ import annotations

import pytest
import torch

from vit.model import VisionTransformer, ViTConfig

# 32x32 images, 8x8 patches: a 4x4 grid, 17 tokens with the class token.
TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, width=32, depth=3, num_heads=4, mlp_dim=64)


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config(pool="gap", depth=5)`` -> a small ViTConfig."""

    def make(**overrides) -> ViTConfig:
        return ViTConfig(**{**TINY, **overrides})

    return make


@pytest.fixture
def tiny_model(tiny_config):
    """Factory: ``tiny_model(seed=0, **config_overrides)`` -> an initialised CPU model."""

    def make(seed: int = 0, **overrides) -> VisionTransformer:
        torch.manual_seed(seed)
        return VisionTransformer(tiny_config(**overrides))

    return make


@pytest.fixture
def images():
    """Factory: ``images(batch=2, size=32, seed=0)`` -> random (B, 3, size, size) pixels."""

    def make(batch: int = 2, size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
        h, w = (size, size) if isinstance(size, int) else size
        return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """The test models are tiny: intra-op threads cost more in synchronisation than they save, and on a
    busy 2-core machine OpenMP's spin-waiting makes a 1 ms forward take hundreds of ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
