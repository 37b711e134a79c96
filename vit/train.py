"""Optimisers, learning-rate schedules and the training step: pure functions, no Ray, no DDP.

The schedule is a pure function of the step (as in nanoGPT and big_vision), so resuming from a
checkpoint needs only the step number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Schedule = Literal["cosine", "linear", "constant"]


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.1  # decoupled; not applied to biases, norms, E_pos, class token
    betas: tuple[float, float] = (0.9, 0.999)  # Adam (paper Table 3)
    momentum: float = 0.9  # SGD (paper Table 4)
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    grad_clip_norm: float | None = 1.0  # global norm; None disables clipping

    def __post_init__(self) -> None:
        # Messages start with the field's name, so a config loader can name the full field.
        if not self.lr > 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must not be negative, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must not be negative, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm: must be positive (or null: no clipping), got {self.grad_clip_norm}")


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup to ``cfg.lr``, then ``cfg.schedule`` decay to ``cfg.lr * cfg.min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with two parameter groups: decayed matrices, undecayed everything else."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if name in no_decay or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.name!r}; expected 'adamw' or 'sgd'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy for class ids (B,), sigmoid cross-entropy for multi-hot targets (B, K)."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets)
    # big_vision sums over classes and averages over the batch for sigmoid pretraining
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").sum(-1).mean()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    grad_clip_norm: float | None = 1.0,
) -> dict[str, float]:
    """One optimisation step; returns the health figures (loss, lr, gradient norm)."""
    model.train()
    set_lr(optimizer, lr)
    loss = classification_loss(model(images), targets)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()}; stopping before the weights are corrupted")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip_norm if grad_clip_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm.item()}
