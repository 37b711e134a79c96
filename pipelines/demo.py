"""The laptop demo: a tiny ViT trained on the real handwritten digits bundled with scikit-learn.

1,797 grayscale 8x8 images of 10 digits; a stratified 20% is held out. The model is the paper's
architecture at toy size ("Mu/2": 2x2 patches, so each 8x8 digit is a sequence of 16 tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import vit
from vit.evaluate import topk_accuracy
from vit.train import OptimConfig, build_optimizer, lr_at, train_step


@dataclass(kw_only=True)
class DigitsDemoConfig:
    model: str = "Mu/2"  # a name from vit.list_models(); Mu is the test-sized width
    epochs: int = 20
    batch_size: int = 32
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-3, weight_decay=0.05, warmup_steps=60, schedule="cosine")
    )
    # Augmentation: random translation by up to this many pixels. Off by default: at 8x8 a pixel is
    # 12% of the image, and in this short schedule it costs more accuracy than it buys.
    max_shift: int = 0
    holdout_fraction: float = 0.2
    seed: int = 0
    out_dir: str = "runs/demo"  # where the trained checkpoint is written


@dataclass
class DemoResult:
    top1: float
    top5: float
    train_images: int
    holdout_images: int
    steps: int
    seconds: float
    checkpoint: Path


def load_digits_split(holdout_fraction: float, seed: int):
    """The bundled digits as float tensors in [-1, 1], shape (N, 1, 8, 8), split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=holdout_fraction, stratify=digits.target, random_state=seed
    )

    def to_tensors(x, y):
        return torch.from_numpy(x[:, None]), torch.from_numpy(y.astype(np.int64))

    return to_tensors(x_train, y_train), to_tensors(x_test, y_test)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def run_digits_demo(cfg: DigitsDemoConfig, log=print) -> DemoResult:
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(cfg.holdout_fraction, cfg.seed)
    model = vit.create_model(cfg.model, num_classes=10, img_size=8, in_chans=1)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    log(
        f"training ViT-{cfg.model} ({model.num_params() / 1e3:.0f}k parameters) on {len(x_train)} digits, "
        f"{cfg.epochs} epochs x {steps_per_epoch} steps; holding out {len(x_test)}"
    )

    start = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            images = random_shift(x_train[idx], cfg.max_shift, generator)
            metrics = train_step(
                model,
                optimizer,
                images,
                y_train[idx],
                lr=lr_at(step, total_steps, cfg.optim),
                grad_clip_norm=cfg.optim.grad_clip_norm,
            )
            losses.append(metrics["train/loss"])
            step += 1
        if (epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs:
            acc = topk_accuracy(model, _batches(x_test, y_test, 256))
            log(f"  epoch {epoch + 1:3d}  loss {np.mean(losses):.3f}  held-out top-1 {acc['top1']:.2%}")
    seconds = time.perf_counter() - start

    acc = topk_accuracy(model, _batches(x_test, y_test, 256))
    checkpoint = vit.save_checkpoint(model, Path(cfg.out_dir) / "model.safetensors")
    return DemoResult(acc["top1"], acc["top5"], len(x_train), len(x_test), step, seconds, checkpoint)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]
