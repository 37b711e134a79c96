"""Optimisers, learning-rate schedules and the training step: pure functions, no Ray, no DDP (a data-parallel
worker passes its contexts in).

The schedule is a pure function of the step (as in nanoGPT and big_vision), so resuming from a
checkpoint needs only the step number.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
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


class NonFiniteError(FloatingPointError):
    """A step's loss or global gradient norm was not finite; the weights were left as they were.

    ``what`` is ``"loss"`` or ``"gradient norm"``.
    """

    def __init__(self, what: str, value: float):
        super().__init__(f"non-finite {what} {value}; stopping before the weights are corrupted")
        self.what, self.value = what, value


Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W), targets: class ids (B,) or multi-hot (B, K)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    *,
    lr: float,
    grad_clip_norm: float | None = 1.0,
    micro_batches: Iterable[Batch] | None = None,
    accum_steps: int | None = None,
    no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    before_update: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One optimisation step; returns the health figures (loss, lr, global gradient norm).

    One batch (``images``, ``targets``), or ``micro_batches``: ``accum_steps`` of them (default: their number),
    whose gradients add up to those of their mean loss before the one update. The hooks make it the step of a
    data-parallel worker without this module knowing how the model is spread:

    * ``no_sync()`` is entered around the forward and backward passes of every micro-batch but the last, so
      that only the last one reduces gradients across workers (DDP's ``no_sync``, FSDP's gradient sync off);
    * ``autocast()`` around each forward pass and its loss (e.g. ``torch.autocast`` in bf16);
    * ``before_update()`` once the gradients are complete, before they are clipped and applied: a worker can
      agree with the others there on whether to go on, and raise to abandon the step.

    An empty micro-batch (a worker with nothing to learn from) still runs its forward and backward passes,
    which take part in the workers' collectives, with a zero loss. The gradient norm works with gradients
    sharded as DTensors (FSDP2). A non-finite loss or gradient norm raises :class:`NonFiniteError` after the
    backward passes (every worker has taken part in their collectives); it, or any exception before the
    update, leaves the weights as they were and no gradients behind.
    """
    if micro_batches is None:
        if images is None or targets is None:
            raise TypeError("train_step needs images and targets, or micro_batches")
        micro_batches, accum_steps = [(images, targets)], 1
    elif accum_steps is None:
        accum_steps = len(micro_batches)  # type: ignore[arg-type]  # an iterator needs accum_steps
    model.train()
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    try:
        loss_sum, seen = 0.0, 0
        for inputs, labels in micro_batches:
            last = seen == accum_steps - 1
            with contextlib.nullcontext() if last else no_sync():
                with autocast():
                    logits = model(inputs)
                    # An empty batch's loss: zero, yet connected to every parameter through the logits.
                    loss = classification_loss(logits.float(), labels) if len(inputs) else logits.sum() * 0.0
                (loss / accum_steps).backward()
            loss_sum += loss.detach().float().item() if len(inputs) else 0.0
            seen += 1
        if seen != accum_steps:
            raise ValueError(f"train_step: {seen} micro-batches for a step of accum_steps={accum_steps}")
        if before_update is not None:
            before_update()
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = grad_clip_norm if grad_clip_norm is not None else float("inf")
        grad_norm = _replicated(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()
        mean_loss = loss_sum / accum_steps
        if not math.isfinite(mean_loss):
            raise NonFiniteError("loss", mean_loss)
        if not math.isfinite(grad_norm):
            raise NonFiniteError("gradient norm", grad_norm)
        optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
    return {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm}


def _replicated(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor's value: under FSDP2 the global gradient norm is one, the same on every rank."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
