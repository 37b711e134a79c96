"""Evaluation: top-k accuracy over a data iterable."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def topk_accuracy(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Fraction of samples whose label is among the top-k logits, as ``{"top1": ..., "top5": ...}``."""
    model.eval()
    correct = {k: 0 for k in ks}
    total = 0
    for images, labels in batches:
        logits = model(images)
        ranked = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices  # (B, k)
        hits = ranked == labels[:, None]
        for k in ks:
            correct[k] += hits[:, :k].any(dim=-1).sum().item()
        total += labels.shape[0]
    if total == 0:
        raise ValueError("no samples to evaluate")
    return {f"top{k}": correct[k] / total for k in ks}
